"""MaxVol row selection and the D-optimality extrapolation grade (numpy/scipy only).

Given the (n, D) feature matrix X of the training atoms of one element, MaxVol
(Goreinov et al.) finds D rows whose square submatrix A has a (locally) maximal
|det A|: no other training row can be swapped in to grow the volume by more than
a factor ``tol``. Equivalently every training row has coefficients
c = x A^{-1} with max_j |c_j| <= tol. The extrapolation grade of any atom is
gamma = max_j |(x A^{-1})_j|: gamma <= 1 interpolation, > 1 extrapolation.

Algorithm
---------
1. Numerical rank. The rows are reduced to their numerical rank r first: the
   columns are scaled by their root-mean-square, an R factor is accumulated
   chunk by chunk (TSQR, memory O(batch x D)), and the singular values of R
   (= those of the scaled X) are compared with ``rank_rtol`` times the largest.
   If r < D (fewer rows than features, duplicated or constant-zero columns,
   linear dependencies), the features are projected onto the top-r right
   singular vectors, the projection (D, r) is returned and a warning is issued.
   Components of a new atom outside the span of the training rows are then
   invisible to gamma (they were never seen, so they cannot be graded).
   When r = D, no projection is used: the grade is exactly pacemaker's.
2. Start. LU with partial pivoting (LAPACK getrf) of the (n, r) matrix picks r
   rows; if its pivots reveal a (numerically) singular start, QR with column
   pivoting of the transposed matrix is used instead.
3. Swaps. C = X A^{-1}; while max |C_pq| > tol, row p replaces slot q and C is
   updated with one rank-1 update (BLAS ger, O(n r) per swap). Each swap
   multiplies |det A| by |C_pq| > tol, so the loop terminates. C is recomputed
   from scratch at the end and the loop resumes if rounding let a coefficient
   drift above ``tol``.
4. Batch mode (``batch_size``): rows are visited in chunks; MaxVol runs on
   [current active rows + chunk], starting from the current active rows (so the
   volume never decreases). A refinement pass then computes gamma over all rows
   chunk by chunk and re-runs MaxVol on [active rows + the worst rows above
   ``tol``] until no row exceeds ``tol`` (pacemaker's ``compute_active_set_by_batches``
   does the same in two stages). Peak memory is O(batch_size x D) on top of X.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg import get_blas_funcs, get_lapack_funcs, qr

from mlipuq.exceptions import InputError
from mlipuq.validation import check_array

_ROUNDING = 1e-12
"""Relative slack on ``tol``: coefficients within rounding of ``tol`` do not trigger swaps."""

DEFAULT_BATCH_SIZE = 8192
"""Rows per chunk in :func:`extrapolation_grade` (an 8192 x 64 float64 chunk is 4 MiB)."""


@dataclass(frozen=True)
class MaxVolResult:
    """Outcome of :func:`maxvol`.

    Attributes
    ----------
    indices : ndarray of int64, shape (r,)
        Rows of the input matrix forming the active set (r = D unless rank-reduced).
    n_swaps : int
        Row swaps performed after the initial pivoted choice (all stages).
    projection : ndarray, shape (D, r), or None
        Map from input features to the reduced space in which MaxVol ran
        (``features @ projection``); None when the input had full column rank.
    max_coefficient : float
        Largest |coefficient| of any input row on the final active set (<= tol
        when converged).
    converged : bool
        False if ``max_iters`` stopped the swaps before every coefficient was <= tol.
    rank : int
        Numerical rank r of the input.
    """

    indices: np.ndarray
    n_swaps: int
    projection: np.ndarray | None
    max_coefficient: float
    converged: bool
    rank: int


def maxvol(
    matrix: np.ndarray,
    *,
    tol: float = 1.01,
    max_iters: int | None = None,
    batch_size: int | None = None,
    rank_rtol: float = 1e-10,
    warn: bool = True,
) -> MaxVolResult:
    """Select r rows of ``matrix`` with (locally) maximal |determinant| by MaxVol.

    Parameters
    ----------
    matrix : ndarray of float, shape (n, D)
        Feature rows (e.g. ACE B-projections or NequIP node features of one element).
    tol : float
        Stop when no row has a coefficient above ``tol`` (>= 1; pacemaker uses 1.01).
    max_iters : int, optional
        Cap on the number of swaps (default: none; the loop always terminates).
    batch_size : int, optional
        Process rows in chunks of this many rows (memory-bounded mode for large n).
    rank_rtol : float
        Singular values below ``rank_rtol`` times the largest (after column RMS
        scaling) count as zero.
    warn : bool
        Issue a :class:`UserWarning` when the input is rank-reduced.

    Returns
    -------
    MaxVolResult

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 0.1]])
    >>> sorted(maxvol(x).indices.tolist())
    [1, 3]
    """
    matrix = check_array(matrix, "features", ndim=2)
    if tol < 1.0:
        raise InputError(f"tol: expected a value >= 1, got {tol}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
    n_rows, n_features = matrix.shape
    projection, rank, scale = _rank_projection(matrix, rank_rtol, batch_size)
    if rank == 0:
        raise InputError("features: all rows are zero (numerical rank 0), no active set possible")
    if projection is not None and warn:
        warnings.warn(
            f"features: numerical rank {rank} < {n_features} features ({n_rows} rows); "
            f"MaxVol runs on the top-{rank} singular directions (projection stored)",
            stacklevel=2,
        )
    reduced = _Reduced(matrix, projection, scale)
    budget = np.inf if max_iters is None else int(max_iters)
    user_tol, tol = tol, tol * (1.0 + _ROUNDING)
    if batch_size is None or n_rows <= batch_size:
        rows, swaps, coef = _maxvol_dense(reduced.rows(slice(None)), None, tol, budget)
        converged = coef <= tol
    else:
        rows, swaps, coef, converged = _maxvol_batched(reduced, tol, budget, batch_size)
    if not converged:
        warnings.warn(
            f"MaxVol stopped after max_iters={max_iters} swaps with a coefficient {coef:.4g} > "
            f"tol={user_tol}",
            stacklevel=2,
        )
    return MaxVolResult(
        indices=np.asarray(rows, dtype=np.int64),
        n_swaps=int(swaps),
        projection=projection,
        max_coefficient=float(coef),
        converged=bool(converged),
        rank=rank,
    )


def active_set_inverse(active_set: np.ndarray, projection: np.ndarray | None = None) -> np.ndarray:
    """The (D, r) matrix B with gamma = max_j |(x @ B)_j| for an (r, D) active set.

    With a projection P (D, r): B = P (A P)^{-1}. Without: A^{-1} for a square A,
    else a column-scaled pseudo-inverse (pacemaker uses ``np.linalg.pinv``; the two
    agree on the span of the active rows).

    Parameters
    ----------
    active_set : ndarray, shape (r, D)
    projection : ndarray, shape (D, r), optional

    Returns
    -------
    ndarray, shape (D, r)
    """
    active_set = check_array(active_set, "active set", ndim=2)
    if projection is not None:
        square = active_set @ projection
        return projection @ np.linalg.inv(square)
    scale = _column_scale(active_set)
    scaled = active_set / scale
    if scaled.shape[0] == scaled.shape[1]:
        try:
            inverse = np.linalg.inv(scaled)
        except np.linalg.LinAlgError:
            inverse = np.linalg.pinv(scaled)
    else:
        inverse = np.linalg.pinv(scaled)
    return inverse / scale[:, None]


def extrapolation_grade(
    features: np.ndarray, active_inverse: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Extrapolation grade gamma_i = max_j |(x_i A^{-1})_j|, computed chunk by chunk.

    Parameters
    ----------
    features : ndarray of float, shape (n, D)
    active_inverse : ndarray of float, shape (D, r)
        From :func:`active_set_inverse` (or pacemaker's pinv of the active set).
    batch_size : int
        Rows per chunk (bounds the temporary memory to batch_size x r floats).

    Returns
    -------
    ndarray of float, shape (n,)
        Unitless; <= tol for every row of the set the active set was built on.

    Examples
    --------
    >>> extrapolation_grade(np.array([[2.0, 0.5]]), np.eye(2)).tolist()
    [2.0]
    """
    features = np.asarray(features, dtype=np.float64)
    active_inverse = np.asarray(active_inverse, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != active_inverse.shape[0]:
        raise InputError(
            f"features: expected shape (n, {active_inverse.shape[0]}), got {features.shape}"
        )
    n_rows = features.shape[0]
    gamma = np.empty(n_rows)
    step = max(1, int(batch_size))
    buffer = np.empty((min(step, n_rows), active_inverse.shape[1]))
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        out = buffer[: stop - start]
        np.matmul(features[start:stop], active_inverse, out=out)
        np.abs(out, out=out)
        out.max(axis=1, out=gamma[start:stop])
    return gamma


# --------------------------------------------------------------------------- rank


def _column_scale(matrix: np.ndarray) -> np.ndarray:
    """Root-mean-square of each column (1 for all-zero columns)."""
    rms = np.sqrt(np.mean(matrix * matrix, axis=0))
    rms[rms == 0] = 1.0
    return rms


def _rank_projection(
    matrix: np.ndarray, rank_rtol: float, batch_size: int | None
) -> tuple[np.ndarray | None, int, np.ndarray]:
    """Numerical rank of the column-scaled matrix, a (D, r) projection if deficient, the scale."""
    n_rows, n_features = matrix.shape
    step = batch_size or max(65536, 4 * n_features)
    sumsq = np.zeros(n_features)
    for start in range(0, n_rows, step):
        chunk = matrix[start : start + step]
        sumsq += np.einsum("ij,ij->j", chunk, chunk)
    scale = np.sqrt(sumsq / n_rows)
    scale[scale == 0] = 1.0
    r_factor = np.zeros((0, n_features))
    for start in range(0, n_rows, step):
        stacked = np.vstack([r_factor, matrix[start : start + step] / scale])
        r_factor = np.linalg.qr(stacked, mode="r")
    _, singular, vt = np.linalg.svd(r_factor, full_matrices=False)
    if singular.size == 0 or singular[0] == 0:
        return None, 0, scale
    rank = int(np.count_nonzero(singular > rank_rtol * singular[0]))
    if rank == n_features:
        return None, rank, scale
    return vt[:rank].T / scale[:, None], rank, scale


class _Reduced:
    """Rows of X @ P (projection) or X / scale (full rank), computed on demand per chunk.

    MaxVol's choice is invariant under X -> X B for invertible B (A -> A B and
    x B (A B)^{-1} = x A^{-1}), so scaling the columns only improves conditioning.
    """

    def __init__(
        self, matrix: np.ndarray, projection: np.ndarray | None, scale: np.ndarray
    ) -> None:
        self.matrix = matrix
        self.projection = projection
        self.scale = scale

    @property
    def n_rows(self) -> int:
        return self.matrix.shape[0]

    def rows(self, index: np.ndarray | slice) -> np.ndarray:
        block = self.matrix[index]
        block = block @ self.projection if self.projection is not None else block / self.scale
        return np.ascontiguousarray(block, dtype=np.float64)


# --------------------------------------------------------------------------- dense MaxVol


def _initial_rows(block: np.ndarray, rtol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Pivoted choice of r rows of an (m, r) block; returns (rows, numerical rank of the choice)."""
    n_cols = block.shape[1]
    getrf = get_lapack_funcs("getrf", (block,))
    lu, piv, _ = getrf(np.array(block, order="F"), overwrite_a=True)
    order = np.arange(block.shape[0])
    for k, p in enumerate(piv[:n_cols]):
        order[k], order[p] = order[p], order[k]
    diag = np.abs(np.diag(lu[:n_cols, :n_cols]))
    if diag.min() > rtol * max(diag.max(), 1e-300):
        return order[:n_cols], n_cols
    # LU partial pivoting may miss the rank: QR with column pivoting on the transpose reveals it.
    r_factor, pivots = qr(block.T, mode="r", pivoting=True)
    r_diag = np.abs(np.diag(r_factor))
    rank = int(np.count_nonzero(r_diag > rtol * max(r_diag[0], 1e-300))) if r_diag.size else 0
    return pivots[:n_cols], rank


def _coefficients(block: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """C = block @ inv(block[rows]), shape (m, r), C-contiguous (one GEMM)."""
    return np.ascontiguousarray(block @ np.linalg.inv(block[rows]))


def _maxvol_dense(
    block: np.ndarray, start: np.ndarray | None, tol: float, budget: float
) -> tuple[np.ndarray, int, float]:
    """MaxVol on an (m, r) block of full column rank. Returns (rows, swaps, max |coefficient|)."""
    m_rows, n_cols = block.shape
    if m_rows <= n_cols:
        return np.arange(m_rows), 0, 1.0
    if start is None:
        start, _ = _initial_rows(block)
    rows = np.array(start, dtype=np.int64)
    swaps = 0
    for _ in range(8):  # fresh restarts guard against drift of the rank-1 updates
        coef = _coefficients(block, rows)
        abs_buffer = np.empty_like(coef)
        ger = get_blas_funcs("ger", (coef,))
        np.abs(coef, out=abs_buffer)
        p, q = divmod(int(abs_buffer.argmax()), n_cols)
        first = abs(coef[p, q])
        if first <= tol:
            return rows, swaps, float(first)
        while abs(coef[p, q]) > tol and swaps < budget:
            rows[q] = p
            pivot = coef[p, q]
            row = coef[p].copy()
            row[q] -= 1.0
            column = coef[:, q].copy()
            # coef.T is Fortran-contiguous (r, m): in-place update coef -= column (x) row / pivot
            ger(-1.0 / pivot, row, column, a=coef.T, overwrite_a=True)
            swaps += 1
            np.abs(coef, out=abs_buffer)
            p, q = divmod(int(abs_buffer.argmax()), n_cols)
        if swaps >= budget:
            return rows, swaps, float(abs(coef[p, q]))
    coef = _coefficients(block, rows)
    return rows, swaps, float(np.abs(coef).max())


# --------------------------------------------------------------------------- batch MaxVol


def _maxvol_batched(
    reduced: _Reduced, tol: float, budget: float, batch_size: int
) -> tuple[np.ndarray, int, float, bool]:
    """Chunked MaxVol: cumulative pass over chunks, then refinement until all gamma <= tol."""
    n_rows = reduced.n_rows
    rank = reduced.rows(slice(0, 1)).shape[1]
    active = np.zeros(0, dtype=np.int64)
    swaps = 0
    for start in range(0, n_rows, batch_size):
        candidates = np.concatenate([active, np.arange(start, min(start + batch_size, n_rows))])
        active, used = _merge_step(reduced, candidates, len(active), rank, tol, budget - swaps)
        swaps += used
    if len(active) < rank:  # chunks never reached full rank on their own: fall back to one pass
        rows, used, coef = _maxvol_dense(reduced.rows(slice(None)), None, tol, budget)
        return rows, swaps + used, coef, coef <= tol
    while True:
        inverse = np.linalg.inv(reduced.rows(active))
        worst, worst_gamma = _worst_rows(reduced, inverse, tol, batch_size)
        if worst.size == 0 or swaps >= budget:
            return active, swaps, worst_gamma, worst.size == 0
        before = active.copy()
        candidates = np.concatenate([active, np.setdiff1d(worst, active)])
        active, used = _merge_step(reduced, candidates, rank, rank, tol, budget - swaps)
        swaps += used
        if np.array_equal(np.sort(before), np.sort(active)):  # rounding-level violation only
            return active, swaps, worst_gamma, False


def _merge_step(
    reduced: _Reduced,
    candidates: np.ndarray,
    n_active: int,
    rank: int,
    tol: float,
    budget: float,
) -> tuple[np.ndarray, int]:
    """MaxVol on ``candidates`` rows, starting from the first ``n_active`` ones when they are r."""
    block = reduced.rows(candidates)
    if n_active == rank:
        start = np.arange(rank)
    else:
        start, found = _initial_rows(block)
        if found < rank:  # not yet full rank: keep the independent rows, wait for more chunks
            keep = np.sort(start[:found])
            return candidates[keep], 0
    rows, used, _ = _maxvol_dense(block, start, tol, budget)
    return candidates[rows], used


def _worst_rows(
    reduced: _Reduced, inverse: np.ndarray, tol: float, batch_size: int
) -> tuple[np.ndarray, float]:
    """Up to ``batch_size`` rows with the largest gamma above ``tol``, and the overall max gamma."""
    found_rows: list[np.ndarray] = []
    found_gamma: list[np.ndarray] = []
    max_gamma = 0.0
    for start in range(0, reduced.n_rows, batch_size):
        gamma = np.abs(reduced.rows(slice(start, start + batch_size)) @ inverse).max(axis=1)
        max_gamma = max(max_gamma, float(gamma.max()))
        above = np.flatnonzero(gamma > tol)
        if above.size:
            found_rows.append(above + start)
            found_gamma.append(gamma[above])
            rows, values = np.concatenate(found_rows), np.concatenate(found_gamma)
            if rows.size > batch_size:
                top = np.argpartition(-values, batch_size - 1)[:batch_size]
                rows, values = rows[top], values[top]
            found_rows, found_gamma = [rows], [values]
    if not found_rows:
        return np.zeros(0, dtype=np.int64), max_gamma
    return found_rows[0], max_gamma
