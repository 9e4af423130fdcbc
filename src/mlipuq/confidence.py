"""LTAU confidence p_i from error trajectories (LTAU step 2), as pure functions.

p_i is the fraction of the logged epochs (inside an optional epoch window) at which
the force error of training atom i was within tolerance::

    p_i = #{e : eps_i^e <= atol + rtol * |F_ref,i|} / E

The uncertainty is ``1 - p_i``. With M models, ``mu_M(p_i)`` and ``sigma_M(p_i)``
are the mean and the **population** standard deviation (``ddof=0``) over models.
Functions taking a :class:`~mlipuq.trajectory_store.TrajectoryStore` stream it one
epoch (or one block of atoms) at a time and never hold an (E, N) array.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.trajectory_store import TrajectoryStore, Window, check_trajectories, window_slice
from mlipuq.validation import check_array

ErrorSource = TrajectoryStore | np.ndarray | Sequence[np.ndarray]


def _check_tolerance(atol: float, rtol: float) -> tuple[float, float]:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not np.isscalar(value) or not np.isfinite(value) or value < 0:
            raise InputError(f"{name}: expected a finite non-negative number, got {value!r}")
    return float(atol), float(rtol)


def tolerance(
    atol: float, n_atoms: int, *, rtol: float = 0.0, force_norm: np.ndarray | None = None
) -> np.ndarray:
    """Per-atom tolerance ``atol + rtol * |F_ref,i|`` in eV/Å, float64 array of shape (N,).

    Raises
    ------
    InputError
        ``rtol > 0`` without ``force_norm``, or ``force_norm`` of the wrong length / NaN.
    """
    atol, rtol = _check_tolerance(atol, rtol)
    if rtol == 0.0:
        return np.full(n_atoms, atol)
    if force_norm is None:
        raise InputError("force_norm: required when rtol > 0 (reference force norms |F_ref|)")
    norms = check_array(force_norm, "force_norm", ndim=1, nonnegative=True)
    if len(norms) != n_atoms:
        raise InputError(f"force_norm: has {len(norms)} atoms but the errors have {n_atoms}")
    return atol + rtol * norms


def confidence(
    errors: np.ndarray,
    atol: float,
    *,
    rtol: float = 0.0,
    force_norm: np.ndarray | None = None,
    window: Window | None = None,
) -> np.ndarray:
    """Confidence p_i from an in-memory error trajectory.

    Parameters
    ----------
    errors : ndarray, shape (E, N)
        Force-error norms eps_i^e in eV/Å, one row per logged epoch.
    atol : float
        Absolute tolerance in eV/Å.
    rtol : float
        Relative tolerance (multiplies ``force_norm``).
    force_norm : ndarray, shape (N,), optional
        Reference force norms |F_ref,i| in eV/Å; required if ``rtol > 0``.
    window : (start, size), optional
        Epoch window by position in the rows (see :func:`window_slice`).

    Returns
    -------
    ndarray of float64, shape (N,)
        p_i in [0, 1].

    Examples
    --------
    >>> confidence(np.array([[0.1, 0.5], [0.2, 0.05]]), atol=0.15)
    array([0.5, 0.5])
    """
    values = check_array(errors, "errors", ndim=2, dtype=None, nonnegative=True)
    rows = values[window_slice(len(values), window)]
    limit = tolerance(atol, values.shape[1], rtol=rtol, force_norm=force_norm)
    counts = np.zeros(values.shape[1], dtype=np.int64)
    for row in rows:  # one epoch at a time: no (E, N) boolean temporary
        counts += row <= limit
    return counts / len(rows)


def store_confidence(
    store: TrajectoryStore,
    model_id: str,
    atol: float,
    *,
    rtol: float = 0.0,
    window: Window | None = None,
) -> np.ndarray:
    """Confidence p_i of one model, streamed from a store one epoch at a time.

    Reference force norms for ``rtol`` come from ``store.atom_table.force_norm``.
    Component stores are reduced to norms. Memory O(N).

    Returns
    -------
    ndarray of float64, shape (N,)
    """
    force_norm = _store_force_norm(store, rtol)
    limit = tolerance(atol, store.n_atoms, rtol=rtol, force_norm=force_norm)
    counts = np.zeros(store.n_atoms, dtype=np.int64)
    n_epochs = 0
    for _, errors in store.iter_epochs(model_id, window=window, norm=True):
        counts += errors <= limit
        n_epochs += 1
    return counts / n_epochs


def _store_force_norm(store: TrajectoryStore, rtol: float) -> np.ndarray | None:
    if rtol == 0:
        return None
    norms = store.atom_table.force_norm
    if np.any(np.isnan(norms)):
        raise InputError(
            f"rtol: the atom table of {store.path} has no reference forces for "
            f"{int(np.isnan(norms).sum())} atom(s); use rtol=0"
        )
    return norms


def ensemble_confidence(
    store: TrajectoryStore,
    atol: float,
    *,
    rtol: float = 0.0,
    window: Window | None = None,
    model_ids: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence of each model and its mean / spread over the M models.

    Returns
    -------
    mu : ndarray of float64, shape (N,)
        mu_M(p_i), mean over models.
    sigma : ndarray of float64, shape (N,)
        sigma_M(p_i), population standard deviation over models (``ddof=0``; 0 for M=1).
    p : ndarray of float64, shape (M, N)
        p_i of each model, in the order of ``model_ids`` (default: ``store.model_ids()``).
    """
    ids = _model_ids(store, model_ids)
    p = np.stack([store_confidence(store, m, atol, rtol=rtol, window=window) for m in ids])
    return p.mean(axis=0), p.std(axis=0), p


def _model_ids(store: TrajectoryStore, model_ids: Sequence[str] | None) -> list[str]:
    ids = store.model_ids() if model_ids is None else list(model_ids)
    if not ids:
        raise InputError(f"model_ids: the store {store.path} holds no models")
    return ids


def default_atol(source: ErrorSource, *, model_ids: Sequence[str] | None = None) -> float:
    """Default tolerance: the mean force-error norm |F_ref - F_pred| of the final model(s)
    over the training atoms, in eV/Å (not the per-component MAE training logs print).

    The mean force-error norm at the last logged epoch of each model, averaged over
    models.

    Parameters
    ----------
    source : TrajectoryStore, ndarray (N,), or sequence of ndarray (N,)
        A store (last epoch of each model in ``model_ids``) or the final-epoch errors
        of one or several models.
    """
    if isinstance(source, TrajectoryStore):
        finals = [source.final_errors(m, norm=True) for m in _model_ids(source, model_ids)]
    elif isinstance(source, np.ndarray) and source.ndim == 1:
        finals = [source]
    else:
        finals = list(source)
        if not finals:
            raise InputError("final errors: no models given")
    maes = [
        float(np.mean(check_array(f, "final errors", ndim=1, nonnegative=True), dtype=np.float64))
        for f in finals
    ]
    return float(np.mean(maes))


def _error_chunks(
    source: ErrorSource,
    *,
    window: Window | None,
    model_ids: Sequence[str] | None,
    chunk_size: int,
) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Yield (atoms, [errors (E_m, n) per model]) blocks of atoms from any source."""
    if isinstance(source, TrajectoryStore):
        ids = _model_ids(source, model_ids)
        for start in range(0, source.n_atoms, chunk_size):
            atoms = slice(start, min(start + chunk_size, source.n_atoms))
            yield atoms, [source.read_atoms(m, atoms, window=window, norm=True) for m in ids]
        return
    arrays = check_trajectories(source, window)
    n_atoms = arrays[0].shape[1]
    for start in range(0, n_atoms, chunk_size):
        atoms = slice(start, min(start + chunk_size, n_atoms))
        yield atoms, [a[:, atoms] for a in arrays]


def _error_range(source: ErrorSource, **kwargs: object) -> tuple[float, float]:
    low, high = np.inf, -np.inf
    for _, blocks in _error_chunks(source, **kwargs):
        for block in blocks:
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    return low, high


def dispersion_curve(
    source: ErrorSource,
    candidates: np.ndarray,
    *,
    window: Window | None = None,
    model_ids: Sequence[str] | None = None,
    chunk_size: int = 50_000,
) -> np.ndarray:
    """Spread of the confidence over the training set for each candidate ``atol``.

    For each candidate a, the population standard deviation over atoms of
    mu_M(p_i(a)) (p_i from :func:`confidence` with ``rtol=0``, averaged over models).
    Streams blocks of ``chunk_size`` atoms (memory O(E x chunk_size x M)).

    Parameters
    ----------
    source : TrajectoryStore, ndarray (E, N), or sequence of ndarray (E_m, N)
    candidates : ndarray, shape (K,)
        Tolerances in eV/Å.

    Returns
    -------
    ndarray of float64, shape (K,)
    """
    grid = check_array(candidates, "candidates", ndim=1, nonnegative=True)
    order = np.argsort(grid)
    sorted_grid = grid[order]
    total = np.zeros(len(grid))
    total_sq = np.zeros(len(grid))
    n_atoms = 0
    for _, blocks in _error_chunks(
        source, window=window, model_ids=model_ids, chunk_size=chunk_size
    ):
        mu = np.zeros((len(grid), blocks[0].shape[1]))
        for block in blocks:
            mu += _confidence_on_grid(block, sorted_grid)
        mu /= len(blocks)
        total += mu.sum(axis=1)
        total_sq += (mu**2).sum(axis=1)
        n_atoms += mu.shape[1]
    mean = total / n_atoms
    spread = np.sqrt(np.maximum(total_sq / n_atoms - mean**2, 0.0))
    out = np.empty_like(spread)
    out[order] = spread
    return out


def _confidence_on_grid(block: np.ndarray, sorted_grid: np.ndarray) -> np.ndarray:
    """p_i(a) for every a of an increasing grid: (K, n) from errors (E, n)."""
    n_epochs, n_atoms = block.shape
    # first grid position with a >= eps: the error counts for that candidate and above
    position = np.searchsorted(sorted_grid, block, side="left")
    counts = np.zeros((len(sorted_grid) + 1, n_atoms), dtype=np.int64)
    columns = np.arange(n_atoms)
    for row in position:  # (row[i], i) pairs are unique within an epoch
        counts[row, columns] += 1
    return np.cumsum(counts[:-1], axis=0) / n_epochs


def dispersion_maximising_atol(
    source: ErrorSource,
    *,
    candidates: np.ndarray | None = None,
    n_grid: int = 40,
    window: Window | None = None,
    model_ids: Sequence[str] | None = None,
    chunk_size: int = 50_000,
) -> float:
    """The ``atol`` (eV/Å) that maximises the spread (std over atoms) of mu_M(p_i).

    With ``candidates`` given, the best of them is returned. Otherwise a log-spaced
    grid of ``n_grid`` values between the smallest positive and the largest logged
    error is evaluated, then a second log grid of ``n_grid`` values between the two
    neighbours of the best candidate refines it. Ties go to the smallest tolerance.

    Parameters
    ----------
    source : TrajectoryStore, ndarray (E, N), or sequence of ndarray (E_m, N)
        Error trajectories (norms, eV/Å).
    """
    kwargs = {"window": window, "model_ids": model_ids, "chunk_size": chunk_size}
    if candidates is not None:
        grid = np.sort(check_array(candidates, "candidates", ndim=1, nonnegative=True))
        return float(grid[np.argmax(dispersion_curve(source, grid, **kwargs))])
    if n_grid < 3:
        raise InputError(f"n_grid: expected at least 3, got {n_grid}")
    low, high = _error_range(source, **kwargs)
    if high <= 0:
        raise InputError("errors: all logged errors are 0, no tolerance can spread them")
    low = low if low > 0 else high * 1e-8
    if high <= low:
        return float(high)
    grid = np.geomspace(low, high, n_grid)
    best = int(np.argmax(dispersion_curve(source, grid, **kwargs)))
    fine = np.geomspace(grid[max(best - 1, 0)], grid[min(best + 1, n_grid - 1)], n_grid)
    fine = np.union1d(fine, grid[best : best + 1])
    return float(fine[np.argmax(dispersion_curve(source, fine, **kwargs))])
