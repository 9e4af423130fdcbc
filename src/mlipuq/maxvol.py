"""MaxVol row selection and the D-optimality extrapolation grade (numpy/scipy only).

Given the (n, D) feature matrix X of the training atoms of one element, MaxVol
(Goreinov et al.) finds D rows whose square submatrix A has a (locally) maximal
|det A|: no other training row can be swapped in to grow the volume by more than
a factor ``tol``. Equivalently every training row has coefficients
c = x A^{-1} with max_j |c_j| <= tol. The extrapolation grade of any atom is
gamma = max_j |(x A^{-1})_j|: gamma <= 1 interpolation, > 1 extrapolation.

Algorithm
---------
1. Scaling. The columns are divided by their root-mean-square (MaxVol's choice is
   invariant under X -> X S for an invertible S; the scaling only improves the
   conditioning of A).
2. Start. LU with partial pivoting (LAPACK getrf) of the scaled (n, D) matrix
   picks D rows (pacemaker's start).
3. Swaps. C = X A^{-1}; while max |C_pq| > tol, row p replaces slot q and C is
   updated with one rank-1 update (BLAS ger, O(n D) per swap), fused chunk by
   chunk with the search for the next max |C_pq| so that each swap reads and
   writes C once. Each swap multiplies |det A| by |C_pq| > tol, so the loop
   terminates. At the end max |x A^{-1}| is recomputed from scratch over all rows
   (chunked) and the loop resumes if rounding let a coefficient drift above ``tol``.
4. Numerical rank. The result is accepted without a separate rank computation
   when the final active set certifies full rank: X_s = C A_s with C holding the
   identity in the active rows, so sigma_min(X_s) >= sigma_min(A_s), while
   sigma_max(X_s) <= ||X_s||_F; sigma_min(A_s) > ``rank_rtol`` ||X_s||_F thus
   implies the rank criterion below (a (D, D) SVD instead of a pass over X).
   Otherwise (or when the LU start is singular) the rank is computed: an R factor
   of the scaled X is accumulated chunk by chunk (TSQR, memory O(chunk x D)) and
   its singular values (= those of the scaled X) are compared with ``rank_rtol``
   times the largest. If r < D (fewer rows than features, duplicated or
   constant-zero columns, linear dependencies), the features are projected onto
   the top-r right singular vectors, the projection (D, r) is returned, a warning
   is issued and steps 2-3 run on the projected rows (with a QR-with-column-
   pivoting start when LU misses the rank). Components of a new atom outside the
   span of the training rows are then invisible to gamma (they were never seen,
   so they cannot be graded). When r = D, no projection is used: the grade is
   exactly pacemaker's.
5. Batch mode (``batch_size``): rows are visited in chunks; MaxVol runs on
   [current active rows + chunk], starting from the current active rows (so the
   volume never decreases). A refinement pass then computes gamma over all rows
   chunk by chunk and re-runs MaxVol on [active rows + the worst rows above
   ``tol``] until no row exceeds ``tol`` (pacemaker's ``compute_active_set_by_batches``
   does the same in two stages). Peak memory is O(batch_size x D) on top of X.
   The result is a dominant set of all n rows (every gamma <= tol), like the
   single pass, but in general a different local maximum: on 10^5 x 64 Gaussian
   matrices its |det| was 0.22x-2.8x the single pass's (geometric mean 0.88 over
   3 seeds x 3 batch sizes), the same spread as the single pass's own when only
   the column order of the input changes (0.28x-3.7x); see
   docs/benchmarks_doptimality.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.linalg import get_blas_funcs, get_lapack_funcs, qr

from mlipuq.exceptions import InputError
from mlipuq.validation import check_array

_ROUNDING = 1e-12
"""Relative slack on ``tol``: coefficients within rounding of ``tol`` do not trigger swaps."""

DEFAULT_BATCH_SIZE = 8192
"""Upper bound on the rows per chunk in :func:`extrapolation_grade` (8192 x 64 floats: 4 MiB)."""

_CHUNK_ELEMENTS = 1 << 17
"""Floats per chunk of the swap loop and of the grade (1 MiB: stays in cache)."""

_RANK_CHUNK_ROWS = 2048
"""Rows per TSQR step of the rank computation (small panels factor fastest)."""


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
        Its active set is dominant for all rows as well, but in general a
        different local maximum than the single pass's, with a |det| smaller or
        larger by a factor of a few (see the module docstring).
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
    budget = np.inf if max_iters is None else int(max_iters)
    user_tol, tol = tol, tol * (1.0 + _ROUNDING)
    batched = batch_size is not None and n_rows > batch_size
    scale, frobenius = _column_stats(matrix)
    found = None
    if n_rows >= n_features:  # optimistic: full column rank, certified afterwards
        found = _maxvol_full_rank(matrix, scale, tol, budget, batch_size if batched else None)
    if found is not None and _certified_full_rank(matrix[found[0]] / scale, rank_rtol * frobenius):
        projection, rank = None, n_features
    else:
        projection, rank = _rank_projection(matrix, scale, rank_rtol)
        if rank == 0:
            raise InputError(
                "features: all rows are zero (numerical rank 0), no active set possible"
            )
        if projection is not None and warn:
            warnings.warn(
                f"features: numerical rank {rank} < {n_features} features ({n_rows} rows); "
                f"MaxVol runs on the top-{rank} singular directions (projection stored)",
                stacklevel=2,
            )
        if projection is not None or found is None:
            reduced = _Reduced(matrix, projection, scale)
            if batched:
                found = _maxvol_batched(reduced, tol, budget, batch_size)
            else:
                rows, swaps, coef = _maxvol_dense(reduced.rows(slice(None)), None, tol, budget)
                found = rows, swaps, coef, coef <= tol
    rows, swaps, coef, converged = found
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
    features: np.ndarray,
    active_inverse: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Extrapolation grade gamma_i = max_j |(x_i A^{-1})_j|, computed chunk by chunk.

    One GEMM per chunk of rows into a reused buffer, then |.| and the row maximum
    in place: no (n, r) temporary, and no validation beyond the shape check (the
    callers validate at their boundary).

    Parameters
    ----------
    features : ndarray of float, shape (n, D)
    active_inverse : ndarray of float, shape (D, r)
        From :func:`active_set_inverse` (or pacemaker's pinv of the active set).
    batch_size : int
        At most this many rows per chunk (bounds the temporary memory to
        batch_size x (D + r) floats; chunks of about 1 MiB are used below that).
    rows : ndarray of int, shape (m,), optional
        Grade only these rows of ``features`` (indices in [0, n); gathered chunk by
        chunk, without copying ``features[rows]`` as a whole).

    Returns
    -------
    ndarray of float, shape (n,), or (m,) with ``rows``
        Unitless; <= tol for every row of the set the active set was built on.

    Examples
    --------
    >>> extrapolation_grade(np.array([[2.0, 0.5]]), np.eye(2)).tolist()
    [2.0]
    >>> extrapolation_grade(np.array([[2.0, 0.5], [0.0, 3.0]]), np.eye(2), rows=[1]).tolist()
    [3.0]
    """
    features = np.asarray(features, dtype=np.float64)
    active_inverse = np.asarray(active_inverse, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != active_inverse.shape[0]:
        raise InputError(
            f"features: expected shape (n, {active_inverse.shape[0]}), got {features.shape}"
        )
    if rows is not None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(features))):
            raise InputError(
                f"rows: expected a 1-d array of row indices in [0, {len(features)}), "
                f"got shape {rows.shape}"
                + (f" with values in [{rows.min()}, {rows.max()}]" if rows.size else "")
            )
    n_out = features.shape[0] if rows is None else rows.shape[0]
    gamma = np.empty(n_out)
    _grade_into(features, active_inverse, rows, gamma, max(1, int(batch_size)))
    return gamma


def extrapolation_grade_by_group(
    features: np.ndarray,
    groups: np.ndarray,
    inverses: Mapping[object, np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """gamma_i = max_j |(x_i B_{g_i})_j|, each row graded with the inverse of its group.

    The per-element grade of :class:`~mlipuq.doptimality.DOptimalityEstimator` in
    one call: a single group is graded in place; several groups are gathered chunk
    by chunk (no ``features[mask]`` copies).

    Parameters
    ----------
    features : ndarray of float, shape (n, D)
    groups : ndarray, shape (n,)
        Group label of each row (e.g. chemical symbols).
    inverses : mapping of label -> ndarray of float, shape (D, r_label)
        Active-set inverse of each label present in ``groups``.
    batch_size : int
        Rows per chunk.

    Returns
    -------
    ndarray of float, shape (n,)

    Raises
    ------
    InputError
        If a label of ``groups`` has no entry in ``inverses``, or the shapes disagree.

    Examples
    --------
    >>> x = np.array([[2.0, 0.5], [0.0, 3.0], [1.0, 1.0]])
    >>> inv = {"H": np.eye(2), "O": 0.5 * np.eye(2)}
    >>> extrapolation_grade_by_group(x, np.array(["H", "O", "H"]), inv).tolist()
    [2.0, 1.5, 1.0]
    """
    groups = np.asarray(groups)
    if groups.shape != (len(features),):
        raise InputError(f"groups: expected shape ({len(features)},), got {groups.shape}")
    members = _group_rows(groups)
    missing = sorted({str(label) for label, _ in members if label not in inverses})
    if missing:
        raise InputError(f"groups: label(s) {missing} have no inverse (known: {list(inverses)})")
    if len(members) == 1:
        return extrapolation_grade(features, inverses[members[0][0]], batch_size=batch_size)
    features = np.asarray(features, dtype=np.float64)
    gamma = np.empty(len(groups))
    for label, index in members:
        gamma[index] = extrapolation_grade(
            features, inverses[label], batch_size=batch_size, rows=index
        )
    return gamma


def _group_rows(groups: np.ndarray, max_scans: int = 32) -> list[tuple[object, np.ndarray]]:
    """(label, row indices) for each distinct label of ``groups``.

    One vectorised comparison per label (O(n K) for K labels, no sort: faster than
    ``np.unique`` for the few elements of a chemical system); after ``max_scans``
    labels the remaining rows are grouped with one ``np.unique``.
    """
    if groups.size == 0:
        return []
    hit = groups == groups[0]
    if hit.all():
        return [(_python_scalar(groups[0]), np.arange(groups.size))]
    members: list[tuple[object, np.ndarray]] = []
    remaining = np.arange(groups.size)
    while remaining.size:
        if len(members) == max_scans:
            labels, codes = np.unique(groups[remaining], return_inverse=True)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(labels) + 1))
            for k, label in enumerate(labels):
                members.append((_python_scalar(label), remaining[order[bounds[k] : bounds[k + 1]]]))
            break
        label = groups[remaining[0]]
        hit = groups[remaining] == label
        hit[0] = True  # a label unequal to itself (NaN) still leaves the scan
        members.append((_python_scalar(label), remaining[hit]))
        remaining = remaining[~hit]
    return members


def _python_scalar(value: object) -> object:
    """``value.item()`` for numpy scalars (np.str_ -> str, np.int64 -> int), else ``value``."""
    return value.item() if isinstance(value, np.generic) else value


def _grade_into(
    features: np.ndarray,
    inverse: np.ndarray,
    rows: np.ndarray | None,
    gamma: np.ndarray,
    step: int,
) -> None:
    """gamma[k] = max_j |(features[rows[k]] @ inverse)_j| (all rows when ``rows`` is None)."""
    n_out = gamma.shape[0]
    if n_out == 0:
        return
    width = inverse.shape[1]
    if width == 0:
        gamma.fill(0.0)
        return
    # chunks of ~1 MiB of features stay in cache between the gather, the GEMM and the max
    step = min(step, n_out, max(256, _CHUNK_ELEMENTS // max(1, features.shape[1])))
    product = np.empty((step, width))
    gathered = None if rows is None else np.empty((step, features.shape[1]))
    for start in range(0, n_out, step):
        stop = min(start + step, n_out)
        if rows is None:
            block = features[start:stop]
        else:
            block = gathered[: stop - start]
            # indices checked by the caller; mode="clip" lets take write ``out`` unbuffered
            np.take(features, rows[start:stop], axis=0, out=block, mode="clip")
        out = product[: stop - start]
        np.matmul(block, inverse, out=out)
        np.abs(out, out=out)
        out.max(axis=1, out=gamma[start:stop])


# --------------------------------------------------------------------------- rank


def _column_scale(matrix: np.ndarray) -> np.ndarray:
    """Root-mean-square of each column (1 for all-zero columns)."""
    rms = np.sqrt(np.mean(matrix * matrix, axis=0))
    rms[rms == 0] = 1.0
    return rms


def _column_stats(matrix: np.ndarray, step: int = 65536) -> tuple[np.ndarray, float]:
    """Column RMS (1 for all-zero columns) and the Frobenius norm of the scaled matrix."""
    n_rows, n_features = matrix.shape
    sumsq = np.zeros(n_features)
    for start in range(0, n_rows, step):
        chunk = matrix[start : start + step]
        sumsq += np.einsum("ij,ij->j", chunk, chunk)
    scale = np.sqrt(sumsq / n_rows)
    scale[scale == 0] = 1.0
    return scale, float(np.sqrt(np.sum(sumsq / scale**2)))


def _certified_full_rank(active_scaled: np.ndarray, threshold: float) -> bool:
    """True if sigma_min of the (D, D) scaled active rows exceeds ``threshold``.

    With X_s = C A_s (C = X_s A_s^{-1} contains the identity, so sigma_min(C) >= 1),
    sigma_min(X_s) >= sigma_min(A_s); with ``threshold`` = rank_rtol ||X_s||_F >=
    rank_rtol sigma_max(X_s) this implies numerical rank D.
    """
    singular = np.linalg.svd(active_scaled, compute_uv=False)
    return bool(singular.size and singular[-1] > threshold)


def _rank_projection(
    matrix: np.ndarray, scale: np.ndarray, rank_rtol: float
) -> tuple[np.ndarray | None, int]:
    """Numerical rank r of the column-scaled matrix and a (D, r) projection if r < D."""
    n_rows, n_features = matrix.shape
    step = max(_RANK_CHUNK_ROWS, 4 * n_features)
    r_factor = np.zeros((0, n_features))
    for start in range(0, n_rows, step):
        stacked = np.vstack([r_factor, matrix[start : start + step] / scale])
        r_factor = np.linalg.qr(stacked, mode="r")
    _, singular, vt = np.linalg.svd(r_factor, full_matrices=False)
    if singular.size == 0 or singular[0] == 0:
        return None, 0
    rank = int(np.count_nonzero(singular > rank_rtol * singular[0]))
    if rank == n_features:
        return None, rank
    return vt[:rank].T / scale[:, None], rank


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


def _maxvol_full_rank(
    matrix: np.ndarray,
    scale: np.ndarray,
    tol: float,
    budget: float,
    batch_size: int | None,
) -> tuple[np.ndarray, int, float, bool] | None:
    """MaxVol on ``matrix / scale`` assuming full column rank; None if the start is singular."""
    if batch_size is not None:
        return _maxvol_batched(
            _Reduced(matrix, None, scale), tol, budget, batch_size, dense_fallback=False
        )
    start = _lu_rows(matrix, scale)
    if start is None:
        return None
    try:
        rows, swaps, coef = _maxvol_dense(matrix, start, tol, budget, scale)
    except np.linalg.LinAlgError:
        return None
    return rows, swaps, coef, coef <= tol


def _lu_rows(
    block: np.ndarray, scale: np.ndarray | None = None, rtol: float = 1e-12
) -> np.ndarray | None:
    """Rows picked by LU with partial pivoting of ``block / scale``, or None if singular."""
    rows, singular, _ = _lu_factor_rows(block, scale, rtol)
    return None if singular else rows


def _lu_factor_rows(
    block: np.ndarray, scale: np.ndarray | None, rtol: float
) -> tuple[np.ndarray, bool, np.ndarray]:
    """(first r pivot rows, whether |diag U| reveals a singular start, |diag U|)."""
    n_cols = block.shape[1]
    work = np.empty(block.shape, order="F")
    if scale is None:
        work[...] = block
    else:
        np.divide(block, scale, out=work)
    getrf = get_lapack_funcs("getrf", (work,))
    lu, piv, _ = getrf(work, overwrite_a=True)
    order = np.arange(block.shape[0])
    for k, p in enumerate(piv[:n_cols]):
        order[k], order[p] = order[p], order[k]
    diag = np.abs(np.diag(lu[:n_cols, :n_cols]))
    singular = not diag.min() > rtol * max(diag.max(), 1e-300)
    return order[:n_cols], singular, diag


def _initial_rows(block: np.ndarray, rtol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Pivoted choice of r rows of an (m, r) block; returns (rows, numerical rank of the choice)."""
    n_cols = block.shape[1]
    rows, singular, _ = _lu_factor_rows(block, None, rtol)
    if not singular:
        return rows, n_cols
    # LU partial pivoting may miss the rank: QR with column pivoting on the transpose reveals it.
    r_factor, pivots = qr(block.T, mode="r", pivoting=True)
    r_diag = np.abs(np.diag(r_factor))
    rank = int(np.count_nonzero(r_diag > rtol * max(r_diag[0], 1e-300))) if r_diag.size else 0
    return pivots[:n_cols], rank


def _scaled_inverse(block: np.ndarray, rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """B with block @ B = (block / scale) @ inv(block[rows] / scale), shape (r, r)."""
    if scale is None:
        return np.linalg.inv(block[rows])
    return np.linalg.inv(block[rows] / scale) / scale[:, None]


def _max_abs_product(block: np.ndarray, inverse: np.ndarray) -> float:
    """max |block @ inverse| over all entries, chunk by chunk (no (m, r) temporary)."""
    gamma = np.empty(block.shape[0])
    _grade_into(block, inverse, None, gamma, max(1, _CHUNK_ELEMENTS // inverse.shape[1]))
    return float(gamma.max())


def _abs_argmax(coef: np.ndarray, buffer: np.ndarray) -> tuple[float, int]:
    """(max |coef|, flat index of its first occurrence), chunk by chunk through ``buffer``."""
    step = buffer.shape[0]
    best, where = -1.0, 0
    for start in range(0, coef.shape[0], step):
        block = coef[start : start + step]
        out = buffer[: block.shape[0]]
        np.abs(block, out=out)
        flat = int(out.argmax())
        value = float(out.reshape(-1)[flat])
        if value > best:
            best, where = value, start * coef.shape[1] + flat
    return best, where


def _swap_rows(
    coef: np.ndarray, rows: np.ndarray, tol: float, budget: float, swaps: int
) -> tuple[int, float]:
    """Swap rows into the active set while max |coef| > tol; updates ``coef`` and ``rows``.

    Each swap's rank-1 update (BLAS ger on ``coef.T``, in place) and the search for
    the next largest |coefficient| run chunk by chunk, so ``coef`` is read and
    written once per swap. Returns (swaps, max |coefficient|).
    """
    n_cols = coef.shape[1]
    step = max(1, min(coef.shape[0], _CHUNK_ELEMENTS // n_cols))
    buffer = np.empty((step, n_cols))
    ger = get_blas_funcs("ger", (coef,))
    value, flat = _abs_argmax(coef, buffer)
    while value > tol and swaps < budget:
        p, q = divmod(flat, n_cols)
        rows[q] = p
        alpha = -1.0 / coef[p, q]
        row = coef[p].copy()
        row[q] -= 1.0
        value, flat = -1.0, 0
        for start in range(0, coef.shape[0], step):
            block = coef[start : start + step]
            column = block[:, q].copy()  # this chunk's part of column q, before its update
            # block.T is Fortran-contiguous (r, m): block -= column (x) row / pivot in place
            ger(alpha, row, column, a=block.T, overwrite_a=True)
            out = buffer[: block.shape[0]]
            np.abs(block, out=out)
            local = int(out.argmax())
            found = float(out.reshape(-1)[local])
            if found > value:
                value, flat = found, start * n_cols + local
        swaps += 1
    return swaps, value


def _maxvol_dense(
    block: np.ndarray,
    start: np.ndarray | None,
    tol: float,
    budget: float,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, int, float]:
    """MaxVol on the (m, r) matrix ``block / scale`` of full column rank.

    Returns (rows, swaps, max |coefficient|).
    """
    m_rows, n_cols = block.shape
    if m_rows <= n_cols:
        return np.arange(m_rows), 0, 1.0
    if start is None:
        start, _ = _initial_rows(block if scale is None else block / scale)
    rows = np.array(start, dtype=np.int64)
    swaps = 0
    value = np.inf
    for _ in range(8):  # fresh restarts guard against drift of the rank-1 updates
        coef = np.ascontiguousarray(block @ _scaled_inverse(block, rows, scale))
        before = swaps
        swaps, value = _swap_rows(coef, rows, tol, budget, swaps)
        del coef
        if swaps == before or swaps >= budget:
            return rows, swaps, value
        value = _max_abs_product(block, _scaled_inverse(block, rows, scale))
        if value <= tol:
            return rows, swaps, value
    return rows, swaps, value


# --------------------------------------------------------------------------- batch MaxVol


def _maxvol_batched(
    reduced: _Reduced,
    tol: float,
    budget: float,
    batch_size: int,
    *,
    dense_fallback: bool = True,
) -> tuple[np.ndarray, int, float, bool] | None:
    """Chunked MaxVol: cumulative pass over chunks, then refinement until all gamma <= tol.

    Returns None (without ``dense_fallback``) if the chunks never reach full rank.
    """
    n_rows = reduced.n_rows
    rank = reduced.rows(slice(0, 1)).shape[1]
    active = np.zeros(0, dtype=np.int64)
    swaps = 0
    for start in range(0, n_rows, batch_size):
        candidates = np.concatenate([active, np.arange(start, min(start + batch_size, n_rows))])
        active, used = _merge_step(reduced, candidates, len(active), rank, tol, budget - swaps)
        swaps += used
    if len(active) < rank:  # chunks never reached full rank on their own: fall back to one pass
        if not dense_fallback:
            return None
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
        gamma = extrapolation_grade(reduced.rows(slice(start, start + batch_size)), inverse)
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


# --------------------------------------------------------------------------- warm start


def maxvol_from(
    matrix: np.ndarray,
    start: np.ndarray,
    *,
    tol: float = 1.01,
    max_iters: int | None = None,
    projection: np.ndarray | None = None,
) -> MaxVolResult:
    """MaxVol on ``matrix`` (or ``matrix @ projection``) starting from the rows ``start``.

    The merge step of chunked active-set searches: the current active set plus new
    candidate rows, swapped until no row has a coefficient above ``tol``. Every swap
    multiplies |det| by more than ``tol``, so the result's volume is at least the
    start's (unlike :func:`maxvol`, which starts from its own pivoted choice).

    Parameters
    ----------
    matrix : ndarray of float, shape (m, D)
        Candidate rows.
    start : ndarray of int, shape (r,)
        Rows of ``matrix`` forming a non-singular start (r = D, or r = the width
        of ``projection``).
    tol : float
        As in :func:`maxvol` (>= 1).
    max_iters : int, optional
        Cap on the number of swaps.
    projection : ndarray of float, shape (D, r), optional
        Run in the reduced space ``matrix @ projection`` (a rank-reduced active
        set, :attr:`MaxVolResult.projection`); returned unchanged.

    Returns
    -------
    MaxVolResult
        ``rank`` is r; ``converged`` False when ``max_iters`` stopped the swaps.

    Raises
    ------
    InputError
        ``tol`` < 1, ``start`` of the wrong length or out of range, or its rows singular.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 0.1]])
    >>> sorted(maxvol_from(x, [0, 1]).indices.tolist())
    [1, 3]
    """
    matrix = check_array(matrix, "features", ndim=2)
    if tol < 1.0:
        raise InputError(f"tol: expected a value >= 1, got {tol}")
    scale = _column_scale(matrix) if projection is None else None
    reduced = _Reduced(matrix, projection, scale).rows(slice(None))
    start = np.asarray(start, dtype=np.int64).ravel()
    width = reduced.shape[1]
    if start.shape != (width,) or (start.size and (start.min() < 0
                                                    or start.max() >= len(matrix))):
        raise InputError(f"start: expected {width} row indices in [0, {len(matrix)}), "
                         f"got {start.tolist()[:8]}{'...' if start.size > 8 else ''}")
    budget = np.inf if max_iters is None else int(max_iters)
    threshold = tol * (1.0 + _ROUNDING)
    try:
        rows, swaps, coef = _maxvol_dense(reduced, start, threshold, budget)
    except np.linalg.LinAlgError:
        raise InputError("start: the starting rows are linearly dependent") from None
    return MaxVolResult(
        indices=np.asarray(rows, dtype=np.int64),
        n_swaps=int(swaps),
        projection=projection,
        max_coefficient=float(coef),
        converged=bool(coef <= threshold),
        rank=width,
    )
