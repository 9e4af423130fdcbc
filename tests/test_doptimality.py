"""DOptimalityEstimator: per-element active sets, gamma, filters, persistence, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mlipuq.doptimality import DOptimalityEstimator
from mlipuq.exceptions import InputError, NotFittedError
from mlipuq.maxvol import maxvol


@pytest.fixture
def two_elements(rng):
    features = rng.normal(size=(300, 5))
    species = np.array(["Cu"] * 180 + ["O"] * 120)
    features[species == "O"] *= 3.0
    return features, species


def test_gamma_matches_direct_formula_per_element(rng, two_elements):
    features, species = two_elements
    est = DOptimalityEstimator().fit_arrays(features, species)
    test = rng.normal(size=(40, 5)) * 2
    test_species = np.array(["O", "Cu"] * 20)
    result = est.predict_arrays(test, test_species)
    for element in ("Cu", "O"):
        train = features[species == element]
        rows = maxvol(train).indices
        mask = test_species == element
        direct = np.abs(test[mask] @ np.linalg.inv(train[rows])).max(axis=1)
        np.testing.assert_allclose(result.atom_uncertainty[mask], direct, rtol=1e-9)
        assert est.active_sets_[element].shape == (5, 5)
    train_gamma = est.predict_arrays(features, species).atom_uncertainty
    assert train_gamma.max() <= 1.01 + 1e-9
    assert result.method == "doptimality" and result.unit == ""
    np.testing.assert_array_equal(result.atom_flags, result.atom_uncertainty > 1.0)


def test_config_gamma_and_thresholds(rng, two_elements):
    features, species = two_elements
    est = DOptimalityEstimator(threshold=1.2, select_threshold=1.5, stop_threshold=3.0)
    est.fit_arrays(features, species)
    test = rng.normal(size=(12, 5)) * np.repeat([0.2, 1.0, 5.0], 4)[:, None]
    config_index = np.repeat([0, 1, 2], 4)
    result = est.predict_arrays(test, ["Cu"] * 12, config_index=config_index)
    gamma = result.atom_uncertainty
    expected = np.array([gamma[config_index == c].max() for c in range(3)])
    np.testing.assert_allclose(result.config_uncertainty, expected)
    np.testing.assert_array_equal(result.config_flags, expected > 1.2)
    np.testing.assert_array_equal(result.extras["config_select"], expected > 1.5)
    np.testing.assert_array_equal(result.extras["config_stop"], expected > 3.0)
    np.testing.assert_array_equal(result.extras["select"], gamma > 1.5)
    assert result.config_flags[2] and not result.config_flags[0]


def test_outlier_filter_force_error(rng, two_elements):
    features, species = two_elements
    errors = rng.uniform(0.0, 0.1, size=len(species))
    errors[:3] = 5.0  # three Cu outliers
    features[:3] *= 50.0  # ... which would dominate the active set
    est = DOptimalityEstimator(outlier_filter="force_error").fit_arrays(
        features, species, force_errors=errors
    )
    cu = errors[species == "Cu"]
    q1, q3 = np.percentile(cu, [25, 75])
    assert est.outlier_fences_["Cu"] == pytest.approx(q3 + 1.5 * (q3 - q1))
    assert est.n_outliers_["Cu"] == 3 and est.n_outliers_["O"] == 0
    gamma = est.predict_arrays(features[:3], ["Cu"] * 3).atom_uncertainty
    assert gamma.min() > 10.0  # the dropped outliers are now extrapolations
    unfiltered = DOptimalityEstimator().fit_arrays(features, species)
    assert unfiltered.predict_arrays(features[:3], ["Cu"] * 3).atom_uncertainty.max() <= 1.01 + 1e-9
    with pytest.raises(InputError, match="force_errors: required by outlier_filter"):
        DOptimalityEstimator(outlier_filter="force_error").fit_arrays(features, species)
    with pytest.raises(InputError, match="force_norm: expected a 1-d array"):
        DOptimalityEstimator(outlier_filter="force_norm").fit_arrays(
            features, species, force_norm=np.ones((300, 3))
        )


def test_too_few_rows_are_projected(rng):
    features = rng.normal(size=(3, 6))
    with pytest.warns(UserWarning, match="element H: numerical rank 3 < 6"):
        est = DOptimalityEstimator().fit_arrays(features, ["H"] * 3)
    assert est.active_sets_["H"].shape == (3, 6)
    assert est.active_inverse_["H"].shape == (6, 3)
    assert est.projections_["H"].shape == (6, 3)
    np.testing.assert_allclose(
        est.predict_arrays(features, ["H"] * 3).atom_uncertainty, 1.0, atol=1e-10
    )
    combo = 2.5 * features[1] - 0.5 * features[2]
    assert est.predict_arrays(combo[None], ["H"]).atom_uncertainty[0] == pytest.approx(2.5)


def test_save_load_roundtrip(tmp_path, rng, two_elements):
    features, species = two_elements
    features = np.c_[features, features[:, 0]]  # rank-deficient: projection is stored too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = DOptimalityEstimator(select_threshold=2.0).fit_arrays(features, species)
    path = tmp_path / "dopt.npz"
    est.save(path)
    with np.load(path / "arrays.npz", allow_pickle=False) as data:
        assert {"Cu/active_set", "Cu/inverse", "Cu/projection", "O/inverse"} <= set(data.files)
    loaded = DOptimalityEstimator.load(path)
    test = rng.normal(size=(20, 6))
    a = est.predict_arrays(test, ["Cu"] * 20)
    b = loaded.predict_arrays(test, ["Cu"] * 20)
    np.testing.assert_array_equal(a.atom_uncertainty, b.atom_uncertainty)
    assert loaded.select_threshold == 2.0 and loaded.elements_ == ["Cu", "O"]


def test_from_active_sets(rng):
    active = rng.normal(size=(4, 4))
    est = DOptimalityEstimator.from_active_sets({"W": active}, threshold=2.0)
    test = rng.normal(size=(10, 4))
    direct = np.abs(test @ np.linalg.pinv(active)).max(axis=1)
    result = est.predict_arrays(test, [74] * 10)  # atomic numbers are accepted
    np.testing.assert_allclose(result.atom_uncertainty, direct, rtol=1e-9)
    assert result.threshold == 2.0
    inv = np.linalg.pinv(active)
    est2 = DOptimalityEstimator.from_active_sets({"W": active}, inverses={"W": inv})
    np.testing.assert_allclose(est2.predict_arrays(test, ["W"] * 10).atom_uncertainty, direct)
    with pytest.raises(InputError, match="inverse of W: expected shape"):
        DOptimalityEstimator.from_active_sets({"W": active}, inverses={"W": inv[:, :2]})


def test_bad_inputs(rng, two_elements):
    features, species = two_elements
    with pytest.raises(NotFittedError, match="call fit"):
        DOptimalityEstimator().predict_arrays(features, species)
    bad = features.copy()
    bad[5, 2] = np.nan
    with pytest.raises(InputError, match="features: contains 1 NaN"):
        DOptimalityEstimator().fit_arrays(bad, species)
    with pytest.raises(InputError, match="inconsistent numbers of atoms"):
        DOptimalityEstimator().fit_arrays(features, species[:-1])
    with pytest.raises(InputError, match="unknown element symbol"):
        DOptimalityEstimator().fit_arrays(features, np.array(["Xx"] * 300))
    with pytest.raises(InputError, match="outlier_filter: expected one of"):
        DOptimalityEstimator(outlier_filter="energy").fit_arrays(features, species)
    est = DOptimalityEstimator().fit_arrays(features, species)
    with pytest.raises(InputError, match=r"element\(s\) \['Zn'\] have no active set"):
        est.predict_arrays(features[:2], ["Cu", "Zn"])
    with pytest.raises(InputError, match="features: expected 5 features per row, got 4"):
        est.predict_arrays(features[:2, :4], ["Cu", "Cu"])
    with pytest.raises(InputError, match="config_index: expected 2 entries"):
        est.predict_arrays(features[:2], ["Cu", "Cu"], config_index=[0, 0, 1])
    with pytest.raises(InputError, match="features of element H: all rows are zero"):
        DOptimalityEstimator().fit_arrays(np.zeros((10, 3)), ["H"] * 10)
    with pytest.raises(InputError, match="not found"):
        DOptimalityEstimator.load("/nonexistent/x.npz")


def test_agrees_with_pacemaker_when_available(rng):
    activelearning = pytest.importorskip("pyace.activelearning", reason="needs python-ace")
    features = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    pace_sets = activelearning.compute_active_set({0: features.copy()}, tol=1.01, max_iters=1000)
    pace_inv = activelearning.compute_A_active_inverse(pace_sets)
    test = rng.normal(size=(30, 6)) * 3
    pace_gamma = activelearning.compute_extrapolation_grade({0: test}, pace_inv)[0]
    imported = DOptimalityEstimator.from_active_sets({"Al": pace_sets[0]})
    np.testing.assert_allclose(
        imported.predict_arrays(test, ["Al"] * 30).atom_uncertainty, pace_gamma
    )
    ours = DOptimalityEstimator().fit_arrays(features, ["Al"] * 400)
    ours_det = abs(np.linalg.det(ours.active_sets_["Al"]))
    pace_det = abs(np.linalg.det(pace_sets[0]))
    # both are dominant (all training gamma <= 1.01): volumes within the Hadamard bound
    assert (1.01 * np.sqrt(6)) ** -6 <= ours_det / pace_det <= (1.01 * np.sqrt(6)) ** 6


def test_outlier_filter_through_model_outputs_points_to_fit_arrays(rng):
    from mlipuq.backends.base import ModelOutputs
    from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator

    X = ModelOutputs(species=np.array(["Cu"] * 30), config_index=np.repeat(np.arange(6), 5),
                     descriptors=rng.normal(size=(30, 4)))
    for cls in (DOptimalityEstimator, ClusteredDOptimalityEstimator):
        with pytest.raises(InputError, match="use fit_arrays"):
            cls(outlier_filter="force_error").fit(X)
