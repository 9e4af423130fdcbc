"""LLPR (last-layer prediction rigidity): closed forms, calibration, persistence, inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf
from sklearn.base import clone

from mlipuq import metrics
from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError, NotFittedError
from mlipuq.llpr import (
    DEFAULT_REGULARIZER,
    REGULARIZER_GRID,
    LLPREstimator,
    fit_alpha,
    maxwell_cdf,
    maxwell_nll,
)
from mlipuq.method import load_method
from mlipuq.registry import method_class, method_names

DIM = 6


def outputs(
    rng: np.random.Generator, n_atoms: int, *, spread: float | np.ndarray = 1.0,
    per_config: int = 5, elements: tuple[str, ...] = ("Cu", "O"),
) -> ModelOutputs:
    """Random per-atom features (n_atoms, DIM) in configurations of ``per_config`` atoms."""
    descriptors = rng.normal(size=(n_atoms, DIM)) * spread
    species = np.asarray(elements)[rng.integers(len(elements), size=n_atoms)]
    return ModelOutputs(species=species, config_index=np.arange(n_atoms) // per_config,
                        descriptors=descriptors)


def direct_variances(
    train: ModelOutputs, test: ModelOutputs, regularizer: float, per_element: bool
) -> tuple[np.ndarray, np.ndarray]:
    """sigma_i^2 (N,) and sigma_E^2 (C,) by dense solves of the definition."""
    groups = sorted(set(train.species)) if per_element else [None]
    atom = np.empty(test.n_atoms)
    energy = np.zeros(test.n_configs)
    for group in groups:
        rows = train.descriptors if group is None else train.descriptors[train.species == group]
        mask = np.ones(test.n_atoms, bool) if group is None else test.species == group
        gram = rows.T @ rows
        cov = np.linalg.inv(gram + regularizer * np.trace(gram) / DIM * np.eye(DIM))
        f = test.descriptors[mask]
        atom[mask] = np.einsum("ni,ij,nj->n", f, cov, f)
        sums = np.zeros((test.n_configs, DIM))
        np.add.at(sums, test.config_index[mask], f)
        energy += np.einsum("ci,ij,cj->c", sums, cov, sums)
    return atom, energy


def maxwell_errors(rng: np.random.Generator, scale: np.ndarray) -> np.ndarray:
    """Norms of 3-d Gaussian errors with per-component std ``scale`` (N,)."""
    return np.linalg.norm(rng.normal(size=(len(scale), 3)) * scale[:, None], axis=1)


def assert_same_result(a, b) -> None:
    np.testing.assert_array_equal(a.atom_uncertainty, b.atom_uncertainty)
    np.testing.assert_array_equal(a.config_uncertainty, b.config_uncertainty)
    assert a.threshold == b.threshold and a.unit == b.unit
    assert sorted(a.extras) == sorted(b.extras)
    for key in a.extras:
        np.testing.assert_array_equal(a.extras[key], b.extras[key])


# ---------------------------------------------------------------------------
# registry and the Maxwell helpers
# ---------------------------------------------------------------------------


def test_registered_under_its_name():
    assert "llpr" in method_names()
    assert method_class("llpr") is LLPREstimator
    assert LLPREstimator.calibrates and LLPREstimator.requires == ("descriptors",)


def test_maxwell_cdf_matches_the_erf_form_and_its_mean():
    x = np.array([0.0, 1e-3, 0.3, 1.0, 2.5, 7.0])
    s = np.array([1.0, 0.5, 0.2, 1.0, 3.0, 1.5])
    u = x / s
    closed = erf(u / np.sqrt(2)) - np.sqrt(2 / np.pi) * u * np.exp(-u * u / 2)
    np.testing.assert_allclose(maxwell_cdf(x, s), closed, rtol=1e-9, atol=1e-15)
    assert maxwell_cdf(1.0, 0.0) == 1.0 and maxwell_cdf(0.0, 1.0) == 0.0
    rng = np.random.default_rng(1)
    samples = maxwell_errors(rng, np.full(200_000, 0.7))
    assert np.mean(samples <= 1.0) == pytest.approx(float(maxwell_cdf(1.0, 0.7)), abs=5e-3)


def test_fit_alpha_maximises_the_maxwell_likelihood():
    rng = np.random.default_rng(2)
    variance = rng.uniform(0.5, 2.0, size=500)
    x = maxwell_errors(rng, 0.3 * np.sqrt(variance))
    alpha = fit_alpha(x, variance)
    best = maxwell_nll(x, alpha * np.sqrt(variance))
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert maxwell_nll(x, factor * alpha * np.sqrt(variance)) > best


# ---------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_element", [True, False])
def test_variance_equals_the_direct_formula(rng, per_element):
    train, test = outputs(rng, 80), outputs(rng, 23)
    est = LLPREstimator(per_element=per_element, regularizer=1e-3).fit(train)
    result = est.predict(test)
    atom, energy = direct_variances(train, test, 1e-3, per_element)
    np.testing.assert_allclose(result.atom_uncertainty ** 2, atom, rtol=1e-9)
    np.testing.assert_allclose(result.extras["lpr"], 1 / atom, rtol=1e-9)
    np.testing.assert_allclose(result.extras["config_energy_uncertainty"] ** 2, energy,
                               rtol=1e-9)
    per_config = [result.atom_uncertainty[test.config_index == c].max()
                  for c in range(test.n_configs)]
    np.testing.assert_array_equal(result.config_uncertainty, per_config)
    assert result.config_aggregate == "max" and result.unit == ""
    assert result.threshold is None and result.config_flags is None
    assert "p" not in result.extras  # no atol until calibration (atol=None)
    if per_element:
        assert est.groups_ == ["Cu", "O"]
        assert est.n_train_atoms_ == {el: int(np.sum(train.species == el)) for el in est.groups_}
    else:
        assert est.groups_ == ["all"] and est.n_train_atoms_ == {"all": 80}


def test_training_row_order_does_not_matter(rng):
    train, test = outputs(rng, 120), outputs(rng, 30)
    order = rng.permutation(train.n_atoms)
    shuffled = ModelOutputs(species=train.species[order], config_index=np.zeros(120, int),
                            descriptors=train.descriptors[order])
    a = LLPREstimator().fit(train).predict(test)
    b = LLPREstimator().fit(shuffled).predict(test)
    np.testing.assert_allclose(a.atom_uncertainty, b.atom_uncertainty, rtol=1e-10)
    np.testing.assert_allclose(a.extras["config_energy_uncertainty"],
                               b.extras["config_energy_uncertainty"], rtol=1e-10)


def test_chunk_size_and_atom_order_do_not_matter(rng):
    train = outputs(rng, 150)
    test = outputs(rng, 41, per_config=3)
    reference = LLPREstimator().fit(train).predict(test)
    small = LLPREstimator(batch_size=4).fit(train).predict(test)
    np.testing.assert_allclose(small.atom_uncertainty, reference.atom_uncertainty, rtol=1e-10)
    np.testing.assert_allclose(small.extras["config_energy_uncertainty"],
                               reference.extras["config_energy_uncertainty"], rtol=1e-10)
    order = rng.permutation(test.n_atoms)  # atoms of a configuration need not be adjacent
    mixed = ModelOutputs(species=test.species[order], config_index=test.config_index[order],
                         descriptors=test.descriptors[order])
    result = LLPREstimator(batch_size=4).fit(train).predict(mixed)
    np.testing.assert_allclose(result.atom_uncertainty, reference.atom_uncertainty[order],
                               rtol=1e-10)
    np.testing.assert_allclose(result.extras["config_energy_uncertainty"],
                               reference.extras["config_energy_uncertainty"], rtol=1e-10)


def test_feature_scale_does_not_change_sigma(rng):
    train, test = outputs(rng, 100), outputs(rng, 20)
    scaled = ModelOutputs(species=train.species, config_index=train.config_index,
                          descriptors=train.descriptors * 37.0)
    scaled_test = ModelOutputs(species=test.species, config_index=test.config_index,
                               descriptors=test.descriptors * 37.0)
    a = LLPREstimator().fit(train).predict(test).atom_uncertainty
    b = LLPREstimator().fit(scaled).predict(scaled_test).atom_uncertainty
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_direction_absent_from_training_gets_large_sigma(rng):
    train = outputs(rng, 200)
    descriptors = train.descriptors.copy()
    descriptors[:, -1] = 0.0  # the last feature never varies in training
    train = ModelOutputs(species=train.species, config_index=train.config_index,
                         descriptors=descriptors)
    test = outputs(rng, 40)
    test.descriptors[:, -1] = 1.0  # a unit component along the unseen direction
    inside = test.descriptors.copy()
    inside[:, -1] = 0.0
    est = LLPREstimator().fit(train)
    sigma_in = est.predict(ModelOutputs(species=test.species, config_index=test.config_index,
                                        descriptors=inside)).atom_uncertainty
    sigma_out = est.predict(test).atom_uncertainty
    assert sigma_out.min() > 100 * sigma_in.max()


def test_atoms_far_from_training_rank_above_near_ones(rng):
    train = outputs(rng, 400)
    near, far = outputs(rng, 200), outputs(rng, 200, spread=4.0)
    est = LLPREstimator().fit(train)
    scores = np.concatenate([est.predict(near).atom_uncertainty,
                             est.predict(far).atom_uncertainty])
    labels = np.repeat([False, True], 200)
    assert metrics.roc_auc(scores, labels) > 0.9


def test_rarely_seen_element_is_less_certain(rng):
    train = outputs(rng, 400)
    species = train.species.copy()
    species[:8] = "H"  # 8 H rows against ~200 of each other element
    train = ModelOutputs(species=species, config_index=train.config_index,
                         descriptors=train.descriptors)
    test = outputs(rng, 300, elements=("Cu", "H"))
    result = LLPREstimator().fit(train).predict(test)
    h = test.species == "H"
    assert np.median(result.atom_uncertainty[h]) > 3 * np.median(result.atom_uncertainty[~h])


# ---------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------


def synthetic_calibration(rng, alpha, regularizer):
    """Training outputs, held-out outputs and their Maxwell force errors (scale alpha sigma)."""
    spread = np.array([1.0, 1.0, 1.0, 1.0, 0.1, 0.01])
    train = outputs(rng, 2000, spread=spread)
    held = outputs(rng, 6000)
    sigma = LLPREstimator(regularizer=regularizer).fit(train).predict(held).atom_uncertainty
    return train, held, maxwell_errors(rng, alpha * sigma)


def test_calibration_recovers_alpha_and_improves_nll_and_ece(rng):
    alpha = 0.8
    train, held, errors = synthetic_calibration(rng, alpha, DEFAULT_REGULARIZER)
    est = LLPREstimator(regularizer_grid=None).fit(train)
    before = est.predict(held)
    est.calibrate(held, errors, fpr=0.1)
    assert est.alpha_ == pytest.approx(alpha, rel=0.03)
    assert est.regularizer_ == DEFAULT_REGULARIZER
    assert est.atol_ == pytest.approx(float(np.mean(errors)))
    after = est.predict(held)
    assert after.unit == "eV/Å"
    np.testing.assert_allclose(after.atom_uncertainty, alpha * before.atom_uncertainty, rtol=0.03)
    np.testing.assert_allclose(after.extras["p"], maxwell_cdf(est.atol_, after.atom_uncertainty))
    nll_before = maxwell_nll(errors, before.atom_uncertainty)
    nll_after = maxwell_nll(errors, after.atom_uncertainty)
    assert nll_after < nll_before
    assert est.calibration_["nll_after"] == pytest.approx(nll_after)
    ece_before = metrics.ece(maxwell_cdf(est.atol_, before.atom_uncertainty), errors, est.atol_)
    ece_after = metrics.ece(after.extras["p"], errors, est.atol_)
    assert ece_after < 0.03 < ece_before
    assert est.calibration_["ece_before"] == pytest.approx(ece_before)
    assert est.calibration_["ece_after"] == pytest.approx(ece_after)
    # the threshold flags at most the share fpr of the calibration configurations
    assert after.threshold == est.threshold_ and "FPR 0.1" in est.threshold_source_
    assert np.mean(after.config_flags) <= 0.1
    assert np.mean(after.config_flags) > 0.05
    np.testing.assert_array_equal(after.atom_flags, after.atom_uncertainty > est.threshold_)


def test_calibration_chooses_the_regularizer_of_the_data(rng):
    train, held, errors = synthetic_calibration(rng, 0.5, 1e-2)
    est = LLPREstimator(regularizer_grid=REGULARIZER_GRID).fit(train)
    est.calibrate(held, errors)
    assert est.regularizer_ == 1e-2
    assert est.alpha_ == pytest.approx(0.5, rel=0.03)
    nll = est.calibration_["nll_by_regularizer"]
    assert min(nll, key=nll.get) == repr(1e-2)


def test_atoms_without_force_errors_do_not_enter_the_fit(rng):
    train, held, errors = synthetic_calibration(rng, 0.5, DEFAULT_REGULARIZER)
    errors = errors.copy()
    errors[::3] = np.nan
    est = LLPREstimator(regularizer_grid=None).fit(train)
    variance = est.predict(held).atom_uncertainty ** 2
    est.calibrate(held, errors)
    known = np.isfinite(errors)
    assert est.alpha_ == pytest.approx(fit_alpha(errors[known], variance[known]), rel=1e-12)
    assert est.calibration_["n_atoms"] == int(known.sum())


def test_calibrate_without_errors_sets_only_the_threshold(rng):
    train, held = outputs(rng, 200), outputs(rng, 100)
    est = LLPREstimator().fit(train)
    before = est.predict(held)
    est.calibrate(held, fpr=0.2)
    assert est.alpha_ == 1.0 and est.calibration_ is None
    assert est.threshold_ == np.quantile(before.config_uncertainty, 0.8, method="higher")


def test_failed_calibration_leaves_the_estimator_as_it_was(rng):
    train, held, errors = synthetic_calibration(rng, 0.5, DEFAULT_REGULARIZER)
    est = LLPREstimator().fit(train).calibrate(held, errors)
    state = (est.alpha_, est.regularizer_, est.atol_, est.threshold_)
    with pytest.raises(InputError, match="force_errors"):
        est.calibrate(held, np.full(held.n_atoms, np.nan))
    with pytest.raises(InputError, match="force_errors"):
        est.calibrate(held, errors[:-1])
    with pytest.raises(InputError, match="fpr"):
        est.calibrate(held, errors, fpr=1.5)
    assert (est.alpha_, est.regularizer_, est.atol_, est.threshold_) == state


def test_default_calibration_rescales_without_reordering(rng):
    train, held, errors = synthetic_calibration(rng, 0.5, 1e-2)
    test = outputs(rng, 60, spread=3.0)
    est = LLPREstimator().fit(train)
    before = est.predict(test)
    est.calibrate(held, errors)
    after = est.predict(test)
    assert est.regularizer_ == DEFAULT_REGULARIZER and est.alpha_ != 1.0
    np.testing.assert_allclose(after.atom_uncertainty, est.alpha_ * before.atom_uncertainty,
                               rtol=1e-12)
    np.testing.assert_array_equal(after.extras["config_energy_uncertainty"],
                                  before.extras["config_energy_uncertainty"])


def test_uncalibrated_predicts_as_before_calibration(rng):
    train, held, errors = synthetic_calibration(rng, 0.5, 1e-2)
    est = LLPREstimator(regularizer_grid=REGULARIZER_GRID).fit(train)
    before = est.predict(held)
    est.calibrate(held, errors)
    assert est.regularizer_ == 1e-2
    plain = est.uncalibrated()
    assert plain.regularizer_ == DEFAULT_REGULARIZER and plain.alpha_ == 1.0
    result = plain.predict(held)
    np.testing.assert_array_equal(result.atom_uncertainty, before.atom_uncertainty)
    assert result.threshold is None and result.unit == ""
    assert plain.atol_ == est.atol_
    assert est.alpha_ != 1.0 and est.threshold_ is not None  # the original is untouched
    assert est.predict(held).unit == "eV/Å"


def test_given_atol_is_kept(rng):
    train, held, errors = synthetic_calibration(rng, 0.5, DEFAULT_REGULARIZER)
    est = LLPREstimator(atol=0.25).fit(train)
    assert "p" in est.predict(held).extras  # known before calibration
    est.calibrate(held, errors)
    assert est.atol_ == 0.25 and est.calibration_["atol"] == 0.25


# ---------------------------------------------------------------------------
# persistence, sklearn, inputs
# ---------------------------------------------------------------------------


def test_save_and_load_method_round_trip(rng, tmp_path):
    train, held, errors = synthetic_calibration(rng, 0.5, DEFAULT_REGULARIZER)
    est = LLPREstimator(regularizer_grid=(1e-6, 1e-3)).fit(train).calibrate(held, errors)
    est.save(tmp_path / "llpr", provenance={"backend": "test"})
    loaded = load_method(tmp_path / "llpr")
    assert isinstance(loaded, LLPREstimator)
    assert loaded.get_params() == est.get_params()
    assert loaded.calibration_ == est.calibration_
    assert loaded.threshold_source_ == est.threshold_source_
    assert loaded.provenance_ == {"backend": "test"}
    test = outputs(rng, 50)
    assert_same_result(loaded.predict(test), est.predict(test))
    assert_same_result(loaded.uncalibrated().predict(test), est.uncalibrated().predict(test))


def test_clone_is_unfitted_with_equal_params(rng):
    est = LLPREstimator(per_element=False, regularizer=1e-4, regularizer_grid=(1e-3,),
                        atol=0.1, batch_size=9).fit(outputs(rng, 50))
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    assert not hasattr(copy, "gram_")
    with pytest.raises(NotFittedError):
        copy.predict(outputs(rng, 5))


def test_refit_on_another_size_equals_a_fresh_fit(rng):
    first, second, held = outputs(rng, 300), outputs(rng, 70), outputs(rng, 40)
    errors = maxwell_errors(rng, np.full(40, 0.2))
    refit = LLPREstimator().fit(first).calibrate(held, errors).fit(second)
    fresh = LLPREstimator().fit(second)
    assert_same_result(refit.predict(held), fresh.predict(held))
    assert refit.calibration_ is None and refit.atol_ is None
    assert refit.n_train_atoms_ == fresh.n_train_atoms_


def test_invalid_inputs_raise_input_error(rng):
    train = outputs(rng, 60)
    bad = train.descriptors.copy()
    bad[3, 2] = np.nan
    nan_outputs = ModelOutputs(species=train.species, config_index=train.config_index,
                               descriptors=bad)
    with pytest.raises(InputError, match="NaN"):
        LLPREstimator().fit(nan_outputs)
    est = LLPREstimator().fit(train)
    with pytest.raises(InputError, match="NaN"):
        est.predict(nan_outputs)
    unknown = outputs(rng, 10, elements=("Cu", "Zr"))
    with pytest.raises(InputError, match="Zr"):
        est.predict(unknown)
    shared = LLPREstimator(per_element=False).fit(train).predict(unknown)
    assert np.all(np.isfinite(shared.atom_uncertainty))
    with pytest.raises(InputError, match="features"):
        est.predict(ModelOutputs(species=train.species, config_index=train.config_index,
                                 descriptors=train.descriptors[:, :3]))
    with pytest.raises(InputError, match="descriptors"):
        est.predict(ModelOutputs(species=train.species, config_index=train.config_index))
    for params in ({"regularizer": 0.0}, {"regularizer_grid": ()}, {"atol": -1.0},
                   {"batch_size": 0}, {"per_element": "yes"}):
        with pytest.raises(InputError):
            LLPREstimator(**params).fit(train)


def test_evaluate_reports_llpr_with_an_ece(rng):
    from mlipuq.evaluation import evaluate

    train, held, errors = synthetic_calibration(rng, 0.5, DEFAULT_REGULARIZER)
    est = LLPREstimator().fit(train).calibrate(held, errors)
    test = outputs(rng, 500)
    result = est.predict(test)
    test_errors = maxwell_errors(rng, result.atom_uncertainty)
    out = evaluate({"llpr": result}, config_index=test.config_index, force_errors=test_errors,
                   atol=est.atol_)
    summary = out["methods"]["llpr"]["metrics"]["all"]
    assert out["methods"]["llpr"]["unit"] == "eV/Å"
    assert summary["ece"] < 0.06
    assert summary["spearman_atom"] > 0.2
