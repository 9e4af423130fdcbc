"""Tests of per-atom error histograms: CDF, expected error, streaming == in-memory."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.atom_table import AtomTable
from mlipuq.distributions import (
    ErrorDistributions,
    distributions_from_errors,
    distributions_from_store,
    shared_bins,
)
from mlipuq.exceptions import InputError
from mlipuq.trajectory_store import TrajectoryStore

N_ATOMS = 400


def trajectories(rng, n_models=2, n_epochs=15):
    scale = rng.lognormal(-3.0, 0.8, size=N_ATOMS)
    noise = rng.lognormal(0.0, 0.5, size=(n_models, n_epochs, N_ATOMS))
    return (scale * noise).astype(np.float32)


def direct_mass(errors: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Reference histogram: a per-atom loop over np.histogram with clipped errors."""
    samples = errors.reshape(-1, errors.shape[-1])  # (S, N)
    clipped = np.clip(samples.astype(np.float64), edges[0], edges[-1])
    rows = [np.histogram(clipped[:, i], bins=edges)[0] for i in range(samples.shape[1])]
    return np.array(rows) / samples.shape[0]


def direct_cdf(errors: np.ndarray, edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """CDF from the raw errors: fraction below the left edge of x's bin plus interpolation."""
    samples = errors.reshape(-1, errors.shape[-1]).astype(np.float64)
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), (samples.shape[1],))
    out = np.empty(samples.shape[1])
    n_bins = len(edges) - 1
    for i in range(samples.shape[1]):
        if x[i] <= edges[0]:
            out[i] = 0.0
            continue
        if x[i] >= edges[-1]:
            out[i] = 1.0
            continue
        k = int(np.nonzero(edges <= x[i])[0][-1])
        e = np.clip(samples[:, i], edges[0], edges[-1])
        below = np.mean(e < edges[k]) if k > 0 else 0.0
        inside = np.mean((e >= edges[k]) & ((e < edges[k + 1]) | (k == n_bins - 1)))
        out[i] = below + inside * (x[i] - edges[k]) / (edges[k + 1] - edges[k])
    return out


@pytest.fixture
def data(rng):
    return trajectories(rng)


@pytest.fixture
def store(tmp_path, data):
    table = AtomTable.from_sizes([N_ATOMS], ["O"] * N_ATOMS)
    store = TrajectoryStore.create(tmp_path / "s", table)
    for m, trajectory in enumerate(data):
        writer = store.writer(f"m{m}")
        for row in trajectory:
            writer.append(row)
    return store


def test_shared_bins():
    np.testing.assert_allclose(shared_bins(1e-3, 1.0, n_bins=3), [1e-3, 1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(shared_bins(0.0, 1.0, n_bins=4), np.geomspace(1e-8, 1, 5))
    np.testing.assert_allclose(
        shared_bins(0.0, 1.0, n_bins=4, spacing="linear"), [0, 0.25, 0.5, 0.75, 1]
    )
    with pytest.raises(InputError, match="spacing: expected 'log' or 'linear'"):
        shared_bins(0.1, 1.0, spacing="sqrt")
    with pytest.raises(InputError, match="max_error: must exceed the first edge"):
        shared_bins(0.5, 0.5)


def test_histogram_matches_direct_formula(data):
    dist = distributions_from_errors(list(data), n_bins=30)
    edges = np.geomspace(data.min(), data.max(), 31)
    np.testing.assert_allclose(dist.bin_edges, edges, rtol=1e-12)
    assert dist.mass.shape == (N_ATOMS, 30) and dist.mass.dtype == np.float32
    np.testing.assert_allclose(dist.mass, direct_mass(data, dist.bin_edges), atol=1e-7)
    np.testing.assert_allclose(dist.mass.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(dist.n_samples, np.full(N_ATOMS, 30))


def test_cdf_against_direct_formula(data):
    dist = distributions_from_errors(list(data), n_bins=20)
    edges = dist.bin_edges
    thresholds = [
        edges[0] / 2,
        edges[0],
        edges[3],
        0.5 * (edges[7] + edges[8]),
        0.05,
        edges[-1],
        2 * edges[-1],
    ]
    for x in thresholds:
        np.testing.assert_allclose(dist.cdf(x), direct_cdf(data, edges, x), atol=1e-6)
    # per-atom thresholds (e.g. atol + rtol |F|)
    per_atom = np.random.default_rng(1).uniform(edges[0], edges[-1] / 3, N_ATOMS)
    np.testing.assert_allclose(dist.cdf(per_atom), direct_cdf(data, edges, per_atom), atol=1e-6)
    # at a bin edge the CDF is the empirical fraction of errors below that edge
    np.testing.assert_allclose(
        dist.cdf(edges[10]), np.mean(data.reshape(-1, N_ATOMS) < edges[10], axis=0), atol=1e-6
    )


def test_expected_error_against_direct_formula(data):
    dist = distributions_from_errors(list(data), n_bins=25, spacing="linear")
    mids = 0.5 * (dist.bin_edges[:-1] + dist.bin_edges[1:])
    expected = direct_mass(data, dist.bin_edges) @ mids
    np.testing.assert_allclose(dist.expected_error(), expected, rtol=1e-6)
    # with fine bins it approaches the mean error
    fine = distributions_from_errors(list(data), n_bins=2000, spacing="linear")
    mean = data.reshape(-1, N_ATOMS).astype(np.float64).mean(axis=0)
    width = fine.bin_edges[1] - fine.bin_edges[0]
    assert np.max(np.abs(fine.expected_error() - mean)) <= width


def test_streaming_equals_in_memory(store, data):
    streamed = distributions_from_store(store, n_bins=40)
    in_memory = distributions_from_errors(list(data), n_bins=40)
    np.testing.assert_array_equal(streamed.bin_edges, in_memory.bin_edges)
    np.testing.assert_allclose(streamed.mass, in_memory.mass, atol=1e-6)
    np.testing.assert_array_equal(streamed.n_samples, in_memory.n_samples)
    windowed = distributions_from_store(
        store, window=(5, 5), model_ids=["m1"], bin_edges=streamed.bin_edges
    )
    np.testing.assert_allclose(
        windowed.mass, direct_mass(data[1, 5:10], streamed.bin_edges), atol=1e-7
    )
    ranged = distributions_from_store(store, error_range=(1e-3, 1.0), n_bins=10)
    np.testing.assert_allclose(ranged.bin_edges, np.geomspace(1e-3, 1.0, 11))
    np.testing.assert_allclose(ranged.mass, direct_mass(data, ranged.bin_edges), atol=1e-7)


def test_confidence_relation(store, data):
    """At an interior bin edge, the CDF equals p_i (no logged error sits exactly on it)."""
    dist = distributions_from_store(store, n_bins=50)
    atol = dist.bin_edges[20]
    samples = data.reshape(-1, N_ATOMS)
    np.testing.assert_allclose(dist.cdf(atol), np.mean(samples <= atol, axis=0), atol=1e-6)


def test_take_mean_over_save_load(tmp_path, data):
    dist = distributions_from_errors(list(data), n_bins=12)
    neighbours = np.array([[0, 5, 7], [3, 3, 9]])
    mean = dist.mean_over(neighbours)
    np.testing.assert_allclose(mean.mass[0], dist.mass[[0, 5, 7]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(mean.mass[1], dist.mass[[3, 3, 9]].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(mean.n_samples, [90, 90])
    np.testing.assert_allclose(mean.cdf(0.05), dist.cdf(0.05)[neighbours].mean(axis=1), atol=1e-6)
    part = dist.take([4, 2])
    np.testing.assert_array_equal(part.mass, dist.mass[[4, 2]])
    dist.save(tmp_path / "d.npz")
    loaded = ErrorDistributions.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(loaded.mass, dist.mass)
    np.testing.assert_array_equal(loaded.bin_edges, dist.bin_edges)
    np.testing.assert_array_equal(loaded.n_samples, dist.n_samples)


def test_bad_inputs(tmp_path, data):
    dist = distributions_from_errors(list(data), n_bins=12)
    with pytest.raises(InputError, match=r"neighbours: row indices must lie in \[0, 400\)"):
        dist.mean_over(np.array([[0, 400]]))
    with pytest.raises(InputError, match="x: has 3 values but the distributions have 400"):
        dist.cdf(np.ones(3))
    with pytest.raises(InputError, match="errors: contains negative values"):
        distributions_from_errors(-data[0])
    with pytest.raises(InputError, match="errors: trajectories have 10 and 400 atoms"):
        distributions_from_errors([data[0], data[1][:, :10]])
    with pytest.raises(InputError, match="mass: has 3 bins but bin_edges define 2"):
        ErrorDistributions(np.array([0.0, 1.0, 2.0]), np.ones((2, 3)) / 3, np.ones(2))
    np.savez(tmp_path / "x.npz", a=np.ones(2))
    with pytest.raises(InputError, match="not mlipuq error distributions"):
        ErrorDistributions.load(tmp_path / "x.npz")


def test_constant_errors_do_not_crash():
    dist = distributions_from_errors(np.full((3, 4), 0.2), n_bins=5)
    np.testing.assert_allclose(dist.mass.sum(axis=1), 1.0)
    np.testing.assert_allclose(dist.mass[:, 0], 1.0)
    assert dist.bin_edges[0] == pytest.approx(0.2)


def test_cdf_at_pairs_equals_cdf_per_row():
    rng = np.random.default_rng(3)
    dists = distributions_from_errors([rng.gamma(2.0, 0.05, size=(30, 50))], n_bins=20)
    rows = rng.integers(0, 50, size=400)
    x = np.concatenate([rng.uniform(0, 0.5, 396), [0.0, 1e-9, 10.0, dists.bin_edges[3]]])
    expected = np.array([dists.take([r]).cdf(np.array([v]))[0]
                         for r, v in zip(rows, x, strict=True)])
    np.testing.assert_allclose(dists.cdf_at(rows, x), expected, atol=1e-6)
    assert dists.cdf_at(rows[-2:-1], x[-2:-1])[0] == pytest.approx(1.0)
