"""Per-atom loss weights from LTAU confidence (docs/methods.md), and weight files.

With ``mu = mu_M(p_i)`` and ``sigma = sigma_M(p_i)`` (mean and spread over M models
of the fraction of epochs an atom was within tolerance, see
:func:`mlipuq.confidence.ensemble_confidence`):

- up-weight hard atoms: ``w_i = exp(lam * (1 - mu_i + sigma_i))`` (lam = 4.5 in the paper);
- up-weight easy atoms: ``w_i = exp(lam * (mu_i + sigma_i))`` (lam = 2.0 in the paper).

The weights are meant as per-atom force-loss weights when retraining. They are
written as an ``atoms.arrays`` column of an extxyz file
(:func:`write_weighted_extxyz`); how NequIP 0.19 can consume them is described in
``docs/active_learning.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path
from mlipuq.validation import check_array

DEFAULT_LAMBDA: dict[str, float] = {"hard": 4.5, "easy": 2.0}


def loss_weights(
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    scheme: str = "hard",
    lam: float | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """Per-atom loss weights from the LTAU confidence statistics.

    Parameters
    ----------
    mu : ndarray of float, shape (N,)
        Mean confidence ``mu_M(p_i)`` over models, in [0, 1] (unitless).
    sigma : ndarray of float, shape (N,)
        Standard deviation ``sigma_M(p_i)`` over models, in [0, 1] (0 for one model).
    scheme : {"hard", "easy"}
        ``"hard"``: ``exp(lam * (1 - mu + sigma))`` up-weights atoms the models often
        got wrong; ``"easy"``: ``exp(lam * (mu + sigma))`` up-weights atoms they got right.
    lam : float, optional
        Strength lambda > 0; defaults to the paper's 4.5 (hard) or 2.0 (easy).
    normalize : bool
        If True, divide by the mean so the weights average to 1 (keeps the loss scale
        and effective learning rate of an unweighted mean loss). Default False: the
        paper's formula as is (weights between 1 and exp(2 lam)).

    Returns
    -------
    ndarray of float64, shape (N,)
        Weights, all > 0.

    Raises
    ------
    InputError
        Unknown scheme, lam not > 0, mu/sigma not 1-d, of different lengths, NaN, or
        outside [0, 1].

    Examples
    --------
    >>> loss_weights(np.array([1.0, 0.0]), np.array([0.0, 0.0]), scheme="hard", lam=1.0)
    array([1.        , 2.71828183])
    """
    if scheme not in DEFAULT_LAMBDA:
        raise InputError(f"scheme: expected 'hard' or 'easy', got {scheme!r}")
    lam = DEFAULT_LAMBDA[scheme] if lam is None else lam
    if not np.isscalar(lam) or not np.isfinite(lam) or lam <= 0:
        raise InputError(f"lam: expected a finite number > 0, got {lam!r}")
    mu = _check_unit_interval(mu, "mu")
    sigma = _check_unit_interval(sigma, "sigma")
    if len(mu) != len(sigma):
        raise InputError(f"mu and sigma: different numbers of atoms ({len(mu)} vs {len(sigma)})")
    exponent = (1.0 - mu + sigma) if scheme == "hard" else (mu + sigma)
    weights = np.exp(float(lam) * exponent)
    if normalize:
        weights = weights / weights.mean()
    return weights


def _check_unit_interval(values: np.ndarray, name: str) -> np.ndarray:
    array = check_array(values, name, ndim=1)
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InputError(f"{name}: expected values in [0, 1], got range [{low:.6g}, {high:.6g}]")
    return array


def write_weighted_extxyz(
    frames: Sequence[Atoms],
    weights: np.ndarray,
    path: str | os.PathLike,
    *,
    key: str = "per_atom_weight",
) -> None:
    """Write ``frames`` to an extxyz file with per-atom weights as an array column.

    Reference energies/forces/stress attached to the frames (single-point
    calculator results, as read from an extxyz) are kept, so the file can be used
    directly as a training set. The file is written atomically.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        The training configurations, in the order of the atom table.
    weights : ndarray of float, shape (N,)
        One weight per atom, N = total number of atoms of ``frames`` in frame order.
    path : path-like
        Output extxyz file.
    key : str
        Name of the ``atoms.arrays`` column (default ``"per_atom_weight"``).

    Raises
    ------
    InputError
        Wrong number of weights, non-finite or non-positive weights, reserved key.
    """
    from ase.io import write

    if len(frames) == 0:
        raise InputError("frames: no configurations given")
    weights = check_array(weights, "weights", ndim=1)
    if np.any(weights <= 0):
        raise InputError(f"weights: expected values > 0, got minimum {weights.min():.6g}")
    sizes = np.array([len(atoms) for atoms in frames])
    if weights.size != sizes.sum():
        raise InputError(
            f"weights: expected one per atom ({int(sizes.sum())} atoms in {len(frames)} "
            f"frames), got {weights.size}"
        )
    if key in {"positions", "numbers", "forces", "energies", "species", "pos", "Z"}:
        raise InputError(f"key: {key!r} is a reserved extxyz column name")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = [
        _with_array(atoms, key, weights[offsets[c] : offsets[c + 1]])
        for c, atoms in enumerate(frames)
    ]
    with atomic_path(path, suffix=".extxyz") as tmp:
        write(tmp, out, format="extxyz")


def _with_array(atoms: Atoms, key: str, values: np.ndarray) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    copy = atoms.copy()
    copy.arrays[key] = np.asarray(values, dtype=float)
    results = getattr(atoms.calc, "results", None)
    if results:
        copy.calc = SinglePointCalculator(copy, **dict(results))
    return copy
