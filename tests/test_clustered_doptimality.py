"""ClusteredDOptimalityEstimator: min over cluster active sets."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator
from mlipuq.doptimality import DOptimalityEstimator
from mlipuq.exceptions import InputError, NotFittedError


def _two_arms(rng, n=40):
    """Fig. 7c of the uq-ace paper in 2-D: one arm of vectors near (10, 0), one near (0, 10)."""
    a = np.c_[10 + 0.3 * rng.normal(size=n), rng.uniform(-1, 1, n)]
    c = np.c_[rng.uniform(-1, 1, n), 10 + 0.3 * rng.normal(size=n)]
    return np.r_[a, c], np.array(["a"] * n + ["c"] * n)


def _direct_gamma(train, test):
    from mlipuq.maxvol import maxvol

    rows = maxvol(train).indices
    return np.abs(test @ np.linalg.inv(train[rows])).max(axis=1)


def test_point_between_clusters_is_flagged_only_by_clustered(rng):
    features, labels = _two_arms(rng)
    species = ["W"] * len(features)
    point = np.array([[5.0, 5.0]])  # inside the global hull, outside both arms
    global_gamma = DOptimalityEstimator().fit_arrays(features, species).predict_arrays(point, ["W"])
    for est in (
        ClusteredDOptimalityEstimator(method="labels").fit_arrays(features, species, labels=labels),
        ClusteredDOptimalityEstimator(method="kmeans", n_clusters=2).fit_arrays(features, species),
    ):
        result = est.predict_arrays(point, ["W"])
        assert result.method == "clustered_doptimality"
        assert global_gamma.atom_uncertainty[0] <= 1.0
        assert result.atom_uncertainty[0] > 2.0 and result.atom_flags[0]
        expected = min(_direct_gamma(features[labels == name], point)[0] for name in ("a", "c"))
        assert result.atom_uncertainty[0] == pytest.approx(expected, rel=1e-9)


def test_labels_mode_gamma_is_min_over_groups_and_nearest_cluster(rng):
    features, labels = _two_arms(rng)
    species = ["W"] * len(features)
    est = ClusteredDOptimalityEstimator(method="labels").fit_arrays(
        features, species, labels=labels
    )
    assert est.cluster_names_ == ["a", "c"]
    test = np.array([[10.0, 0.5], [0.2, 9.0], [6.0, 4.0], [-3.0, 8.0]])
    per_group = np.stack([_direct_gamma(features[labels == g], test) for g in ("a", "c")], axis=1)
    result = est.predict_arrays(test, ["W"] * 4, config_index=[0, 0, 1, 1])
    np.testing.assert_allclose(result.atom_uncertainty, per_group.min(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(result.extras["nearest_cluster"], per_group.argmin(axis=1))
    np.testing.assert_allclose(
        result.config_uncertainty,
        [per_group.min(axis=1)[:2].max(), per_group.min(axis=1)[2:].max()],
    )
    assert result.extras["nearest_cluster"][0] == 0 and result.extras["nearest_cluster"][1] == 1


def test_one_cluster_equals_global(rng):
    features = rng.normal(size=(400, 6))
    species = np.array(["Cu", "O"] * 200)
    test = rng.normal(size=(50, 6)) * 1.5
    test_species = np.array(["O"] * 25 + ["Cu"] * 25)
    glob = DOptimalityEstimator().fit_arrays(features, species).predict_arrays(test, test_species)
    for method in ("kmeans", "birch", "minibatch_kmeans"):
        est = ClusteredDOptimalityEstimator(method=method, n_clusters=1).fit_arrays(
            features, species
        )
        result = est.predict_arrays(test, test_species)
        np.testing.assert_allclose(result.atom_uncertainty, glob.atom_uncertainty, rtol=1e-12)
        assert np.all(result.extras["nearest_cluster"] == 0)


def test_training_rows_interpolate_in_every_cluster(rng):
    features = np.r_[rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) + 8.0]
    species = ["Si"] * 300
    est = ClusteredDOptimalityEstimator(n_clusters=2).fit_arrays(features, species)
    assert est.n_clusters_ == 2 and sorted(est.group_sizes_.values()) == [150, 150]
    assert est.predict_arrays(features, species).atom_uncertainty.max() <= 1.01 + 1e-9


def test_auto_picks_silhouette_best(rng):
    centers = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], dtype=float)
    features = np.concatenate([c + rng.normal(size=(60, 3)) for c in centers])
    est = ClusteredDOptimalityEstimator(n_clusters="auto", auto_range=(2, 5)).fit_arrays(
        features, ["C"] * 180
    )
    assert est.n_clusters_ == 3
    assert max(est.auto_scores_, key=est.auto_scores_.get) == 3


@pytest.mark.parametrize("policy", ["merge", "project", "skip"])
def test_tiny_clusters_do_not_crash(rng, policy):
    features = rng.normal(size=(100, 6))
    features[:3] += 30.0  # a 3-row cluster, smaller than D = 6
    species = ["Fe"] * 100
    with pytest.warns(UserWarning, match="clustered D-optimality"):
        est = ClusteredDOptimalityEstimator(n_clusters=2, small_clusters=policy).fit_arrays(
            features, species
        )
    gamma = est.predict_arrays(features, species).atom_uncertainty
    if policy == "merge":
        assert sorted(est.group_sizes_.values()) == [100]
        assert gamma.max() <= 1.01 + 1e-9
    elif policy == "project":
        assert sorted(est.group_sizes_.values()) == [3, 97]
        assert gamma.max() <= 1.01 + 1e-9
    else:
        assert sorted(est.group_sizes_.values()) == [97]
        assert gamma[:3].min() > 1.0  # the skipped rows are outside the remaining set


def test_element_without_large_cluster_is_merged(rng):
    features = rng.normal(size=(60, 3))
    species = np.array(["Cu"] * 56 + ["H"] * 4)
    labels = np.r_[np.repeat(["g0", "g1", "g2", "g3"], 14), ["g0", "g1", "g2", "g3"]]
    with pytest.warns(UserWarning, match="no cluster has >= 3 H rows: merged into 0"):
        est = ClusteredDOptimalityEstimator(method="labels").fit_arrays(
            features, species, labels=labels
        )
    h_groups = {k: v for k, v in est.group_sizes_.items() if k.endswith("/H")}
    assert h_groups == {"0/H": 4}
    assert est.predict_arrays(features[56:], ["H"] * 4).atom_uncertainty.max() <= 1.01 + 1e-9


def test_save_load_roundtrip(tmp_path, rng):
    features, labels = _two_arms(rng)
    est = ClusteredDOptimalityEstimator(method="labels").fit_arrays(
        features, ["W"] * len(features), labels=labels
    )
    est.save(tmp_path / "c.npz")
    loaded = ClusteredDOptimalityEstimator.load(tmp_path / "c.npz")
    test = rng.normal(size=(10, 2)) * 6
    a, b = est.predict_arrays(test, ["W"] * 10), loaded.predict_arrays(test, ["W"] * 10)
    np.testing.assert_array_equal(a.atom_uncertainty, b.atom_uncertainty)
    np.testing.assert_array_equal(a.extras["nearest_cluster"], b.extras["nearest_cluster"])
    assert loaded.cluster_names_ == ["a", "c"]
    with pytest.raises(InputError, match="expected 'clustered_doptimality'"):
        est_d = DOptimalityEstimator().fit_arrays(features, ["W"] * len(features))
        est_d.save(tmp_path / "d.npz")
        ClusteredDOptimalityEstimator.load(tmp_path / "d.npz")


def test_bad_inputs(rng):
    features, labels = _two_arms(rng)
    species = ["W"] * len(features)
    with pytest.raises(NotFittedError):
        ClusteredDOptimalityEstimator().predict_arrays(features, species)
    with pytest.raises(InputError, match="labels: required by method='labels'"):
        ClusteredDOptimalityEstimator(method="labels").fit_arrays(features, species)
    with pytest.raises(InputError, match="labels: expected 80 labels"):
        ClusteredDOptimalityEstimator(method="labels").fit_arrays(
            features, species, labels=labels[:5]
        )
    with pytest.raises(InputError, match="method: expected one of"):
        ClusteredDOptimalityEstimator(method="dbscan").fit_arrays(features, species)
    with pytest.raises(InputError, match="n_clusters: expected a positive integer"):
        ClusteredDOptimalityEstimator(n_clusters=0).fit_arrays(features, species)
    with pytest.raises(InputError, match="n_clusters: 100 clusters for only 80 rows"):
        ClusteredDOptimalityEstimator(n_clusters=100).fit_arrays(features, species)
    est = ClusteredDOptimalityEstimator(n_clusters=2).fit_arrays(features, species)
    with pytest.raises(InputError, match="features: expected 2 features per row, got 3"):
        est.predict_arrays(np.ones((2, 3)), ["W", "W"])
    with pytest.raises(InputError, match=r"\['Mo'\] have no active set"):
        est.predict_arrays(np.ones((1, 2)), ["Mo"])
