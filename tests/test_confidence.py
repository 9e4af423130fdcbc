"""Tests of LTAU confidence p_i, ensembles, default and dispersion-maximising atol."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.atom_table import AtomTable
from mlipuq.confidence import (
    confidence,
    default_atol,
    dispersion_curve,
    dispersion_maximising_atol,
    ensemble_confidence,
    store_confidence,
)
from mlipuq.exceptions import InputError
from mlipuq.trajectory_store import TrajectoryStore

N_ATOMS = 500


def trajectories(rng, n_models=3, n_epochs=20):
    """Decaying log-normal errors with per-atom scales, float32 (M, E, N)."""
    scale = rng.lognormal(-3.0, 0.7, size=N_ATOMS)
    decay = np.exp(-np.arange(n_epochs) / 8.0)[:, None]
    noise = rng.lognormal(0.0, 0.4, size=(n_models, n_epochs, N_ATOMS))
    return (scale * (0.3 + decay) * noise).astype(np.float32)


@pytest.fixture
def store(tmp_path, rng):
    force_norm = rng.uniform(0.0, 2.0, N_ATOMS)
    table = AtomTable.from_sizes([N_ATOMS // 5] * 5, ["C"] * N_ATOMS, force_norm=force_norm)
    store = TrajectoryStore.create(tmp_path / "s", table)
    data = trajectories(rng)
    for m, trajectory in enumerate(data):
        writer = store.writer(f"m{m}", seed=m)
        for row in trajectory:
            writer.append(row)
    store.data = data  # keep the raw arrays for the checks
    return store


def test_confidence_matches_numpy(rng):
    errors = trajectories(rng, n_models=1)[0].astype(np.float64)
    atol = 0.04
    np.testing.assert_array_equal(confidence(errors, atol), np.mean(errors <= atol, axis=0))
    window = confidence(errors, atol, window=(5, 10))
    np.testing.assert_array_equal(window, np.mean(errors[5:15] <= atol, axis=0))
    norms = rng.uniform(0, 2, N_ATOMS)
    relative = confidence(errors, atol, rtol=0.02, force_norm=norms, window=(-6, None))
    np.testing.assert_array_equal(
        relative, np.mean(errors[-6:] <= atol + 0.02 * norms[None, :], axis=0)
    )
    assert 0 < relative.mean() < 1  # the thresholds are not trivial


def test_confidence_hand_example():
    errors = np.array([[0.1, 0.3], [0.2, 0.05], [0.1, 0.1], [0.5, 0.2]])
    np.testing.assert_array_equal(confidence(errors, 0.15), [0.5, 0.5])
    np.testing.assert_array_equal(confidence(errors, 0.15, window=(1, 2)), [0.5, 1.0])
    force_norm = np.array([0.0, 10.0])
    np.testing.assert_array_equal(
        confidence(errors, 0.15, rtol=0.02, force_norm=force_norm), [0.5, 1.0]
    )


def test_store_confidence_streaming_equals_in_memory(store):
    for m in range(3):
        expected = np.mean(store.data[m] <= np.float64(0.03), axis=0)
        np.testing.assert_array_equal(store_confidence(store, f"m{m}", 0.03), expected)
    norms = store.atom_table.force_norm
    expected = np.mean(store.data[1][3:13] <= 0.03 + 0.01 * norms, axis=0)
    got = store_confidence(store, "m1", 0.03, rtol=0.01, window=(3, 10))
    np.testing.assert_array_equal(got, expected)


def test_ensemble_confidence_matches_numpy(store):
    norms = store.atom_table.force_norm
    p = np.stack([np.mean(t[2:] <= 0.03 + 0.005 * norms, axis=0) for t in store.data])
    mu, sigma, p_got = ensemble_confidence(store, 0.03, rtol=0.005, window=(2, None))
    np.testing.assert_array_equal(p_got, p)
    np.testing.assert_allclose(mu, p.mean(axis=0), atol=1e-15)
    np.testing.assert_allclose(sigma, p.std(axis=0, ddof=0), atol=1e-15)
    assert sigma.max() > 0.05  # models disagree somewhere: the test is not vacuous
    mu2, sigma2, p2 = ensemble_confidence(store, 0.03, model_ids=["m2", "m0"])
    np.testing.assert_array_equal(p2[0], np.mean(store.data[2] <= np.float64(0.03), axis=0))
    np.testing.assert_allclose(sigma2, np.abs(p2[0] - p2[1]) / 2, atol=1e-15)


def test_default_atol(store):
    expected = np.mean([t[-1].astype(np.float64).mean() for t in store.data])
    assert default_atol(store) == pytest.approx(expected, rel=1e-12)
    assert default_atol([t[-1] for t in store.data]) == pytest.approx(expected, rel=1e-12)
    assert default_atol(store.data[0][-1]) == pytest.approx(
        store.data[0][-1].astype(np.float64).mean(), rel=1e-12
    )


def brute_dispersion(data, candidates):
    return np.array(
        [np.mean([np.mean(t <= a, axis=0) for t in data], axis=0).std() for a in candidates]
    )


def test_dispersion_curve_and_argmax(store):
    candidates = np.geomspace(0.005, 0.2, 15)
    expected = brute_dispersion(store.data, candidates)
    np.testing.assert_allclose(
        dispersion_curve(store, candidates, chunk_size=77), expected, atol=1e-12
    )
    np.testing.assert_allclose(
        dispersion_curve(list(store.data), candidates[::-1]), expected[::-1], atol=1e-12
    )
    best = dispersion_maximising_atol(store, candidates=candidates)
    assert best == candidates[np.argmax(expected)]


def test_dispersion_maximising_atol_refines(store):
    best = dispersion_maximising_atol(store, n_grid=25)
    data = store.data
    dense = np.geomspace(data.min(), data.max(), 2000)
    reference = brute_dispersion(data, dense)
    # the refined optimum is within 1% of the best spread found by a dense scan
    assert brute_dispersion(data, [best])[0] >= 0.99 * reference.max()
    assert data.min() <= best <= data.max()


def test_bad_inputs(store, rng):
    errors = rng.random((4, 10))
    with pytest.raises(InputError, match="atol: expected a finite non-negative number"):
        confidence(errors, -0.1)
    with pytest.raises(InputError, match="force_norm: required when rtol > 0"):
        confidence(errors, 0.1, rtol=0.1)
    with pytest.raises(InputError, match="force_norm: has 3 atoms but the errors have 10"):
        confidence(errors, 0.1, rtol=0.1, force_norm=np.ones(3))
    with pytest.raises(InputError, match="errors: contains negative values"):
        confidence(-errors, 0.1)
    with pytest.raises(InputError, match="errors: expected a 2-d array"):
        confidence(errors[0], 0.1)
    with pytest.raises(InputError, match="window: .* needs 9 logged epochs, only 4"):
        confidence(errors, 0.1, window=(1, 8))
    with pytest.raises(InputError, match="'m9' is not in the store"):
        store_confidence(store, "m9", 0.1)
    with pytest.raises(InputError, match="n_grid: expected at least 3"):
        dispersion_maximising_atol(errors, n_grid=2)


def test_rtol_needs_reference_forces(tmp_path):
    table = AtomTable.from_sizes([3], ["H", "H", "O"])  # no force norms (NaN)
    store = TrajectoryStore.create(tmp_path / "s", table)
    store.writer("m0").append(np.array([0.1, 0.2, 0.3]))
    assert store_confidence(store, "m0", 0.15).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(InputError, match="no reference forces for 3 atom"):
        store_confidence(store, "m0", 0.15, rtol=0.1)
