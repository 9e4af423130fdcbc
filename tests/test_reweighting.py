"""Loss weights from LTAU confidence (METHODS.md §1.6) and the weighted extxyz file."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from mlipuq.exceptions import InputError
from mlipuq.reweighting import loss_weights, write_weighted_extxyz


@pytest.fixture
def mu_sigma(rng):
    mu = rng.uniform(0, 1, 200)
    sigma = rng.uniform(0, 0.5, 200)
    return mu, sigma


def test_hard_weights_follow_formula(mu_sigma):
    mu, sigma = mu_sigma
    np.testing.assert_allclose(loss_weights(mu, sigma, scheme="hard"),
                               np.exp(4.5 * (1 - mu + sigma)), rtol=1e-14)
    np.testing.assert_allclose(loss_weights(mu, sigma, scheme="hard", lam=1.7),
                               np.exp(1.7 * (1 - mu + sigma)), rtol=1e-14)


def test_easy_weights_follow_formula(mu_sigma):
    mu, sigma = mu_sigma
    np.testing.assert_allclose(loss_weights(mu, sigma, scheme="easy"),
                               np.exp(2.0 * (mu + sigma)), rtol=1e-14)
    np.testing.assert_allclose(loss_weights(mu, sigma, scheme="easy", lam=0.3),
                               np.exp(0.3 * (mu + sigma)), rtol=1e-14)


def test_normalized_weights_have_mean_one_and_same_ratios(mu_sigma):
    mu, sigma = mu_sigma
    raw = np.exp(4.5 * (1 - mu + sigma))
    weights = loss_weights(mu, sigma, normalize=True)
    assert weights.mean() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(weights, raw / raw.mean(), rtol=1e-13)


def test_hard_weights_rank_hard_atoms_first():
    # an atom never within tolerance (mu = 0) outweighs one always within (mu = 1)
    weights = loss_weights(np.array([0.0, 1.0]), np.zeros(2), scheme="hard")
    assert weights[0] / weights[1] == pytest.approx(np.exp(4.5))


@pytest.mark.parametrize(
    ("mu", "sigma", "kwargs", "match"),
    [
        ([0.5, 1.2], [0.0, 0.0], {}, r"mu: expected values in \[0, 1\]"),
        ([0.5, -0.1], [0.0, 0.0], {}, r"mu: expected values in \[0, 1\]"),
        ([0.5, 0.5], [0.0, 1.5], {}, r"sigma: expected values in \[0, 1\]"),
        ([0.5, np.nan], [0.0, 0.0], {}, "mu: contains 1 NaN"),
        ([0.5, 0.5], [0.0], {}, "different numbers of atoms"),
        ([0.5], [0.0], {"lam": 0.0}, "lam: expected a finite number > 0"),
        ([0.5], [0.0], {"lam": -2.0}, "lam: expected a finite number > 0"),
        ([0.5], [0.0], {"lam": np.inf}, "lam: expected a finite number > 0"),
        ([0.5], [0.0], {"scheme": "medium"}, "scheme: expected 'hard' or 'easy'"),
    ],
)
def test_bad_inputs(mu, sigma, kwargs, match):
    with pytest.raises(InputError, match=match):
        loss_weights(np.array(mu), np.array(sigma), **kwargs)


def _frames():
    frames = []
    for n in (2, 3):
        atoms = Atoms("H" * n, positions=np.arange(3 * n, dtype=float).reshape(n, 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-1.5 * n,
                                           forces=np.full((n, 3), 0.1 * n))
        frames.append(atoms)
    return frames


def test_weighted_extxyz_round_trip(tmp_path):
    frames = _frames()
    weights = np.array([1.0, 2.0, 3.0, 4.0, 5.5])
    path = tmp_path / "weighted.extxyz"
    write_weighted_extxyz(frames, weights, path)
    back = read(path, ":")
    assert [len(a) for a in back] == [2, 3]
    np.testing.assert_allclose(np.concatenate([a.arrays["per_atom_weight"] for a in back]),
                               weights)
    # reference labels are kept, so the file is a training set
    assert back[1].get_potential_energy() == pytest.approx(-4.5)
    np.testing.assert_allclose(back[1].get_forces(), np.full((3, 3), 0.3))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (np.ones(4), r"expected one per atom \(5 atoms in 2 frames\), got 4"),
        (np.array([1.0, 1.0, 0.0, 1.0, 1.0]), "weights: expected values > 0"),
        (np.array([1.0, 1.0, np.nan, 1.0, 1.0]), "weights: contains 1 NaN"),
    ],
)
def test_weighted_extxyz_bad_weights(tmp_path, weights, match):
    with pytest.raises(InputError, match=match):
        write_weighted_extxyz(_frames(), weights, tmp_path / "w.extxyz")
    assert not (tmp_path / "w.extxyz").exists()


def test_weighted_extxyz_reserved_key(tmp_path):
    with pytest.raises(InputError, match="reserved extxyz column"):
        write_weighted_extxyz(_frames(), np.ones(5), tmp_path / "w.extxyz", key="forces")
