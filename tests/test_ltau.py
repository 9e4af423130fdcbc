"""LTAUEstimator against direct numpy formulas (brute-force k-NN, p_i by counting)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlipuq import AtomTable, InputError, NotFittedError
from mlipuq.confidence import confidence
from mlipuq.distributions import ErrorDistributions, distributions_from_errors
from mlipuq.ltau import LTAUEstimator
from mlipuq.trajectory_store import TrajectoryStore

ATOL = 0.1  # eV/Å


def brute_neighbours(train: np.ndarray, queries: np.ndarray, k: int):
    """Exact k-NN (float64): Euclidean distances and indices, shape (n, k)."""
    sq = ((queries[:, None, :].astype(float) - train[None, :, :].astype(float)) ** 2).sum(-1)
    order = np.argsort(sq, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(sq, order, axis=1)), order


def make_data(rng: np.random.Generator, n_train: int = 400, n_test: int = 60, dim: int = 8):
    """Two-model error trajectories (eV/Å), descriptors, species for train and test."""
    errors = [rng.gamma(2.0, 0.05, size=(25, n_train)), rng.gamma(2.0, 0.06, size=(15, n_train))]
    descriptors = rng.normal(size=(n_train + n_test, dim))
    species = rng.choice(["H", "O"], size=n_train + n_test)
    return (
        errors,
        descriptors[:n_train],
        species[:n_train],
        descriptors[n_train:],
        species[n_train:],
    )


def exact_distributions(errors: list[np.ndarray], atol: float) -> ErrorDistributions:
    """Histograms with ``atol`` as a bin edge: their CDF at atol is the exact count fraction."""
    high = max(a.max() for a in errors) * 1.01
    edges = np.union1d(np.geomspace(1e-4, high, 40), [atol])
    return distributions_from_errors(errors, bin_edges=edges)


def test_flat_prediction_equals_brute_force_knn(rng):
    errors, train, train_species, test, test_species = make_data(rng)
    dists = exact_distributions(errors, ATOL)
    est = LTAUEstimator(
        k=4, atol=ATOL, per_element=False, index="flat", transfer="mean"
    ).fit_arrays(dists, train, train_species)
    result = est.predict_arrays(test, test_species, return_distribution=True)

    distance, neighbours = brute_neighbours(train, test, 4)
    # p_i by counting (METHODS.md 1.2), pooled over both models' epochs
    p_train = confidence(np.vstack(errors), ATOL)
    np.testing.assert_allclose(dists.cdf(ATOL), p_train, atol=1e-6)
    np.testing.assert_allclose(result.extras["p"], p_train[neighbours].mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(
        result.atom_uncertainty, 1 - p_train[neighbours].mean(axis=1), atol=1e-6
    )
    np.testing.assert_allclose(result.extras["knn_distance"], distance.mean(axis=1), rtol=1e-5)
    midpoints = 0.5 * (dists.bin_edges[1:] + dists.bin_edges[:-1])
    expected = (dists.mass @ midpoints)[neighbours].mean(axis=1)
    np.testing.assert_allclose(result.extras["expected_error"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        result.extras["distribution"], dists.mass[neighbours].mean(axis=1), atol=1e-6
    )
    assert result.method == "ltau" and est.index_kinds_ == {"all": "flat"}


def test_per_element_search_only_uses_same_element(rng):
    n = 300
    train = rng.normal(size=(n, 6))
    species = np.array(["H", "O", "C"] * (n // 3))
    # H atoms always within tolerance (p=1), O never (p=0), C half the time (p=0.5)
    p = np.select([species == "H", species == "O"], [1.0, 0.0], 0.5)
    dists = ErrorDistributions(np.array([0.0, 1.0, 2.0]), np.stack([p, 1 - p], 1), np.ones(n))
    test = rng.normal(size=(90, 6))
    test_species = np.array(["O", "C", "H"] * 30)
    est = LTAUEstimator(k=5, atol=1.0, transfer="mean").fit_arrays(dists, train, species)
    result = est.predict_arrays(test, test_species)
    expected_p = np.select([test_species == "H", test_species == "O"], [1.0, 0.0], 0.5)
    np.testing.assert_allclose(result.extras["p"], expected_p, atol=1e-7)
    # neighbours' distances are those of the brute-force search within the element
    for element in ("H", "O", "C"):
        rows, test_rows = species == element, test_species == element
        distance, _ = brute_neighbours(train[rows], test[test_rows], 5)
        np.testing.assert_allclose(
            result.extras["knn_distance"][test_rows], distance.mean(axis=1), rtol=1e-5
        )
    assert sorted(est.index_kinds_) == ["C", "H", "O"]
    # one shared index mixes elements: p is no longer exactly the element's value
    mixed = LTAUEstimator(k=5, atol=1.0, per_element=False, transfer="mean").fit_arrays(
        dists, train, species
    )
    assert np.abs(mixed.predict_arrays(test, test_species).extras["p"] - expected_p).max() > 0.1


def test_repeated_species_cache_never_serves_stale_groups(rng):
    """predict caches the grouping of the last species array (MD loops): it must follow
    any change of species and still reject unknown elements."""
    errors, train, train_species, test, _ = make_data(rng, n_test=40)
    est = LTAUEstimator(k=3).fit_arrays(errors, train, train_species)
    fresh = LTAUEstimator(k=3).fit_arrays(errors, train, train_species)
    first = np.array(["H", "O"] * 20)
    second = first[::-1].copy()
    for species in (first, first, second, first, np.where(first == "H", 1, 8)):
        got = est.predict_arrays(test, species).extras["p"]
        fresh.__dict__.pop("_groups_cache", None)
        np.testing.assert_array_equal(got, fresh.predict_arrays(test, species).extras["p"])
    assert not np.array_equal(
        est.predict_arrays(test, first).extras["p"], est.predict_arrays(test, second).extras["p"]
    )
    with pytest.raises(InputError, match=r"element\(s\) C not in the training set"):
        est.predict_arrays(test[:2], ["C", "H"])
    with pytest.raises(InputError, match="species"):
        est.predict_arrays(test, first[:-1])


def test_trajectory_input_default_atol_and_window(rng):
    errors, train, train_species, test, test_species = make_data(rng)
    est = LTAUEstimator(k=3, n_bins=50).fit_arrays(errors, train, train_species)
    # default atol: mean final-epoch error, averaged over the two models
    assert est.atol_ == pytest.approx(np.mean([errors[0][-1].mean(), errors[1][-1].mean()]))
    reference = distributions_from_errors(errors, n_bins=50)
    np.testing.assert_allclose(est.distributions_.mass, reference.mass)
    windowed = LTAUEstimator(k=3, n_bins=50, window=(5, None)).fit_arrays(
        errors, train, train_species
    )
    cut = distributions_from_errors([a[5:] for a in errors], n_bins=50)
    np.testing.assert_allclose(windowed.distributions_.mass, cut.mass)
    # the default atol always comes from the last logged epoch, whatever the window
    assert windowed.atol_ == pytest.approx(est.atol_)
    single = LTAUEstimator(k=3).fit_arrays(errors[0], train, train_species)
    assert single.atol_ == pytest.approx(errors[0][-1].mean())


def test_store_input_matches_arrays(tmp_path, rng):
    errors, train, train_species, test, test_species = make_data(rng, n_train=120)
    sizes = [60, 60]
    force_norm = rng.uniform(0.5, 2.0, size=120)
    table = AtomTable.from_sizes(sizes, train_species, force_norm=force_norm)
    store = TrajectoryStore.create(tmp_path / "store", table)
    for number, trajectory in enumerate(errors):
        writer = store.writer(f"m{number}", seed=number)
        for row in trajectory:
            writer.append(row)
    from_store = LTAUEstimator(k=3, rtol=0.05).fit_arrays(store, train, train_species)
    from_arrays = LTAUEstimator(k=3, rtol=0.05).fit_arrays(
        [a.astype(np.float32) for a in errors],
        train,
        train_species,
        force_norm=force_norm,
        config_index=table.config_index,
    )
    assert from_store.reference_distance_ == pytest.approx(from_arrays.reference_distance_)
    assert from_store.atol_ == pytest.approx(from_arrays.atol_, rel=1e-6)
    np.testing.assert_allclose(from_store.force_norm_, force_norm)
    a = from_store.predict_arrays(test, test_species).extras["p"]
    b = from_arrays.predict_arrays(test, test_species).extras["p"]
    np.testing.assert_allclose(a, b, atol=1e-6)
    by_path = LTAUEstimator(k=3).fit_arrays(str(tmp_path / "store"), train, train_species)
    assert by_path.atol_ == pytest.approx(from_store.atol_)
    with pytest.raises(InputError, match="species: atom 0 is .* but the store's atom table has"):
        swapped = np.where(train_species == "H", "O", "H")
        LTAUEstimator().fit_arrays(store, train, swapped)


def test_scale_rtol_and_per_atom_scale(rng):
    errors, train, train_species, test, test_species = make_data(rng)
    force_norm = rng.uniform(0.1, 3.0, size=len(train))
    dists = distributions_from_errors(errors, n_bins=60)
    est = LTAUEstimator(k=4, atol=ATOL, rtol=0.02, per_element=False, transfer="mean").fit_arrays(
        dists, train, train_species, force_norm=force_norm
    )
    _, neighbours = brute_neighbours(train, test, 4)
    for s in (1.0, 2.5):
        p_train = dists.cdf((ATOL + 0.02 * force_norm) / s)
        result = est.predict_arrays(test, test_species, scale=s)
        np.testing.assert_allclose(result.extras["p"], p_train[neighbours].mean(axis=1), atol=1e-6)
        expected = s * dists.expected_error()[neighbours].mean(axis=1)
        np.testing.assert_allclose(result.extras["expected_error"], expected, rtol=1e-5)
    scales = np.where(np.arange(len(test)) % 2 == 0, 1.0, 2.5)
    mixed = est.predict_arrays(test, test_species, scale=scales).extras["p"]
    one = est.predict_arrays(test, test_species, scale=1.0).extras["p"]
    two = est.predict_arrays(test, test_species, scale=2.5).extras["p"]
    np.testing.assert_allclose(mixed, np.where(scales == 1.0, one, two), atol=1e-6)
    # larger s: test errors are larger than training errors, so p drops
    assert np.all(two <= one) and np.any(two < one - 0.05)
    # a new atol after fitting uses the kept histograms
    p_train = dists.cdf(0.2 + 0.02 * force_norm)
    np.testing.assert_allclose(
        est.predict_arrays(test, test_species, atol=0.2).extras["p"],
        p_train[neighbours].mean(axis=1),
        atol=1e-6,
    )


def test_config_aggregation_and_flags(rng):
    errors, train, train_species, test, test_species = make_data(rng, n_test=60)
    est = LTAUEstimator(k=3, atol=ATOL).fit_arrays(errors, train, train_species)
    configs = np.repeat(np.arange(6), 10)
    result = est.predict_arrays(test, test_species, config_index=configs, threshold=0.6)
    # the configuration uncertainty is the mean of 1 - p (the max saturates at 1)
    per_config = result.atom_uncertainty.reshape(6, 10).mean(axis=1)
    np.testing.assert_allclose(result.config_uncertainty, per_config)
    np.testing.assert_allclose(
        result.extras["config_max_uncertainty"], result.atom_uncertainty.reshape(6, 10).max(axis=1)
    )
    assert result.config_aggregate == "mean"
    np.testing.assert_array_equal(result.atom_flags, result.atom_uncertainty > 0.6)
    np.testing.assert_array_equal(result.config_flags, per_config > 0.6)
    arrays = result.as_arrays()
    assert set(arrays) == {
        "ltau_uncertainty",
        "ltau_flag",
        "ltau_p",
        "ltau_expected_error",
        "ltau_knn_distance",
        "ltau_knn_distance_normalised",
    }


def test_k_larger_than_an_element_is_clamped_with_warning(rng):
    train = rng.normal(size=(23, 4))
    species = np.array(["H"] * 20 + ["O"] * 3)
    p = rng.uniform(size=23)
    dists = ErrorDistributions(np.array([0.0, 1.0, 2.0]), np.stack([p, 1 - p], 1), np.ones(23))
    with pytest.warns(UserWarning, match="k=5 is larger than the 3 training atoms of O"):
        est = LTAUEstimator(k=5, atol=1.0).fit_arrays(dists, train, species)
    with pytest.warns(UserWarning, match="using k=3"):
        result = est.predict_arrays(train[20:], species[20:])
    np.testing.assert_allclose(result.extras["p"], np.full(3, p[20:].mean()), atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, rng, kind):
    errors, train, train_species, test, test_species = make_data(rng)
    force_norm = rng.uniform(size=len(train))
    est = LTAUEstimator(k=4, index=kind, rtol=0.01, window=(2, 10), ef_search=20).fit_arrays(
        errors, train, train_species, force_norm=force_norm
    )
    est.save(tmp_path / "est")
    loaded = LTAUEstimator.load(tmp_path / "est")
    assert loaded.get_params() == est.get_params()
    assert loaded.index_kinds_ == est.index_kinds_ == {"H": kind, "O": kind}
    assert loaded.atol_ == est.atol_
    a = est.predict_arrays(test, test_species, return_distribution=True, scale=1.5)
    b = loaded.predict_arrays(test, test_species, return_distribution=True, scale=1.5)
    for key in ("p", "expected_error", "knn_distance", "distribution"):
        np.testing.assert_array_equal(a.extras[key], b.extras[key])
    with pytest.raises(InputError, match="descriptors: expected 8 features per row, got 16"):
        loaded.predict_arrays(rng.normal(size=(3, 16)), ["H", "H", "O"])
    meta = json.loads((tmp_path / "est" / "estimator.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "est" / "estimator.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="estimator format_version 99 is not supported"):
        LTAUEstimator.load(tmp_path / "est")
    with pytest.raises(InputError, match="not an mlipuq estimator"):
        LTAUEstimator.load(tmp_path)


def test_bad_input(rng):
    errors, train, train_species, test, test_species = make_data(rng, n_train=50)
    with pytest.raises(NotFittedError, match="call fit"):
        LTAUEstimator().predict_arrays(test, test_species)
    with pytest.raises(
        InputError,
        match=r"inconsistent numbers of atoms: errors=50, "
        r"descriptors=49, species=50",
    ):
        LTAUEstimator(atol=0.1).fit_arrays(errors, train[:49], train_species)
    with pytest.raises(
        InputError, match="inconsistent numbers of atoms: errors=50, descriptors=50, species=48"
    ):
        LTAUEstimator(atol=0.1).fit_arrays(errors, train, train_species[:48])
    bad = train.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="descriptors: contains 1 NaN"):
        LTAUEstimator(atol=0.1).fit_arrays(errors, bad, train_species)
    with pytest.raises(InputError, match="errors: contains negative values"):
        LTAUEstimator(atol=0.1).fit_arrays([-errors[0]], train, train_species)
    dists = distributions_from_errors(errors)
    with pytest.raises(InputError, match="atol: required when errors are ErrorDistributions"):
        LTAUEstimator().fit_arrays(dists, train, train_species)
    with pytest.raises(InputError, match="force_norm: required when rtol > 0"):
        LTAUEstimator(atol=0.1, rtol=0.1).fit_arrays(errors, train, train_species)
    with pytest.raises(InputError, match="k: expected a positive integer, got 0"):
        LTAUEstimator(k=0, atol=0.1).fit_arrays(errors, train, train_species)

    est = LTAUEstimator(k=3, atol=0.1).fit_arrays(errors, train, train_species)
    with pytest.raises(InputError, match="descriptors: expected 8 features per row, got 7"):
        est.predict_arrays(test[:, :7], test_species)
    nan_test = test.copy()
    nan_test[0, 0] = np.nan
    with pytest.raises(InputError, match="descriptors: contains 1 NaN"):
        est.predict_arrays(nan_test, test_species)
    with pytest.raises(
        InputError, match="inconsistent numbers of atoms: descriptors=60, species=59"
    ):
        est.predict_arrays(test, test_species[:59])
    with pytest.raises(
        InputError,
        match=r"species: element\(s\) Cu, N not in the training set "
        r"\(trained on H, O\)",
    ):
        est.predict_arrays(test[:3], ["H", "Cu", "N"])
    with pytest.raises(InputError, match="descriptors: is empty"):
        est.predict_arrays(np.empty((0, 8)), [])
    with pytest.raises(InputError, match="scale: expected a positive number, got -1"):
        est.predict_arrays(test, test_species, scale=-1.0)
    with pytest.raises(InputError, match="inconsistent numbers of atoms: scale=3, descriptors=60"):
        est.predict_arrays(test, test_species, scale=np.ones(3))
    with pytest.raises(InputError, match="config_index: expected non-negative values"):
        est.predict_arrays(test, test_species, config_index=np.full(60, -1))
    with pytest.raises(InputError, match="threshold: expected a finite number, got nan"):
        est.predict_arrays(test, test_species, threshold=float("nan"))
    with pytest.raises(InputError, match="species: unknown element symbol"):
        est.predict_arrays(test[:1], ["Xx"])


@pytest.mark.parametrize("second", [60, 600])
def test_refit_on_another_size_equals_a_fresh_fit(rng, second):
    """Caches of the first fit (per-row table, species grouping) must not survive."""
    errors, train, train_species, test, test_species = make_data(rng, n_train=300)
    est = LTAUEstimator(k=3, atol=ATOL).fit_arrays(errors, train, train_species)
    est.predict_arrays(test, test_species)  # fills the caches
    new_errors, new_train, new_species, _, _ = make_data(rng, n_train=second)
    est.fit_arrays(new_errors, new_train, new_species)
    fresh = LTAUEstimator(k=3, atol=ATOL).fit_arrays(new_errors, new_train, new_species)
    a, b = est.predict_arrays(test, test_species), fresh.predict_arrays(test, test_species)
    np.testing.assert_array_equal(a.extras["p"], b.extras["p"])
    np.testing.assert_array_equal(
        a.extras["knn_distance_normalised"], b.extras["knn_distance_normalised"]
    )


def test_zero_atol_is_refused(rng):
    errors, train, train_species, test, test_species = make_data(rng, n_train=50)
    with pytest.raises(InputError, match="atol: expected a positive tolerance in eV/Å, got 0"):
        LTAUEstimator(atol=0.0).fit_arrays(errors, train, train_species)
    est = LTAUEstimator(atol=0.1).fit_arrays(errors, train, train_species)
    with pytest.raises(InputError, match="atol: expected a positive tolerance"):
        est.predict_arrays(test, test_species, atol=0.0)
