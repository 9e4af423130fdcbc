"""Input validation at the API boundary (scikit-learn style: once, with clear messages).

Each checker returns the validated (possibly converted) array and raises
:class:`~mlipuq.exceptions.InputError` with a one-line message naming ``name``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlipuq.exceptions import InputError, NotFittedError


def check_array(
    values: object,
    name: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtype: type | np.dtype | None = np.float64,
    allow_empty: bool = False,
    finite: bool = True,
    nonnegative: bool = False,
) -> np.ndarray:
    """Convert ``values`` to an array and check rank, emptiness, NaN/inf and sign.

    Parameters
    ----------
    values : array-like
        The input.
    name : str
        How the input is called in error messages (e.g. ``"descriptors"``).
    ndim : int or tuple of int, optional
        Allowed number of dimensions.
    dtype : numpy dtype, optional
        Target dtype (``None`` keeps the input's).
    allow_empty, finite, nonnegative : bool
        Which checks to apply.
    """
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as a numeric array ({exc})") from None
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and array.ndim not in allowed:
        expected = " or ".join(f"{d}-d" for d in allowed)
        raise InputError(f"{name}: expected a {expected} array, got shape {array.shape}")
    if not allow_empty and array.size == 0:
        raise InputError(f"{name}: is empty (shape {array.shape})")
    if finite and np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{name}: contains {bad} NaN or infinite value(s)")
    if nonnegative and array.size and np.nanmin(array) < 0:
        raise InputError(f"{name}: contains negative values (min {np.nanmin(array):.6g})")
    return array


def check_consistent_length(**arrays: Sequence | np.ndarray) -> int:
    """Check that all inputs have the same first dimension and return it.

    Examples
    --------
    >>> check_consistent_length(descriptors=np.zeros((3, 2)), species=["H", "H", "O"])
    3
    """
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise InputError(f"inconsistent numbers of atoms: {listed}")
    return next(iter(lengths.values()))


def check_feature_dim(array: np.ndarray, expected: int, name: str) -> None:
    """Check the second dimension of a (n, D) array against the fitted ``expected`` D."""
    if array.shape[1] != expected:
        raise InputError(f"{name}: expected {expected} features per row, got {array.shape[1]}")


def check_config_index(config_index: object, n_atoms: int) -> np.ndarray:
    """Validate a per-atom configuration index: (N,) non-negative integers.

    Integral floats are accepted (extxyz round trips). Returns int64.

    Examples
    --------
    >>> check_config_index([0, 0, 1.0], 3)
    array([0, 0, 1])
    """
    index = check_array(config_index, "config_index", ndim=1, dtype=None)
    if not np.issubdtype(index.dtype, np.integer):
        if not (np.issubdtype(index.dtype, np.floating) and np.all(index == np.round(index))):
            raise InputError(f"config_index: expected integers, got dtype {index.dtype}")
    if len(index) != n_atoms:
        raise InputError(
            f"config_index: expected {n_atoms} entries (one per atom), got {len(index)}"
        )
    if index.min() < 0:
        raise InputError(f"config_index: expected non-negative values, min {int(index.min())}")
    return index.astype(np.int64)


def check_is_fitted(estimator: object, attribute: str) -> None:
    """Raise :class:`NotFittedError` unless ``estimator`` has the fitted ``attribute``."""
    if getattr(estimator, attribute, None) is None:
        raise NotFittedError(
            f"{type(estimator).__name__} is not fitted yet: call fit(...) or load(...) first"
        )


def as_species(species: Sequence | np.ndarray, name: str = "species") -> np.ndarray:
    """Return species as an array of chemical symbols (str), accepting symbols or numbers."""
    from ase.data import chemical_symbols

    array = np.asarray(species)
    if array.ndim != 1:
        raise InputError(f"{name}: expected a 1-d array of elements, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 1 or array.max() >= len(chemical_symbols)):
            raise InputError(f"{name}: atomic numbers out of range [1, {len(chemical_symbols)})")
        return np.asarray([chemical_symbols[z] for z in array], dtype=str)
    symbols = array.astype(str)
    unknown = sorted(set(np.unique(symbols).tolist()) - set(chemical_symbols[1:]))
    if unknown:
        raise InputError(f"{name}: unknown element symbol(s) {unknown}")
    return symbols
