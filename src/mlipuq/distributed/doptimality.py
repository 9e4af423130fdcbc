"""D-optimality on a Dask cluster: two-level MaxVol and extrapolation grades by row chunks.

The descriptor matrix X (N, D) is a ``dask.array.Array`` chunked by rows (from
:func:`mlipuq.distributed.descriptors.worker_outputs`, or an in-memory array split
into chunks here). Every step is a task per row chunk on a worker, which reads its
chunk only; memory per worker is O(chunk x D) whatever N is.

Active sets, per group of rows (element; or any labels, e.g. cluster/element):

1. Level 1 (a task per chunk): MaxVol (:func:`mlipuq.maxvol.maxvol`, single pass)
   on each group's rows of the chunk gives at most D candidate rows per group
   (all of them when the chunk holds <= D rows of the group).
2. Level 2 (this process): MaxVol over the union of the chunks' candidates
   (n_chunks x D rows at most). With ``split_every`` the union is reduced by a
   tree of merges on the workers first, ``split_every`` candidate sets at a time.
3. Refinement (``refine=True``, default): gamma of every training row against the
   level-2 set, a task per chunk; while a row has gamma > ``tol``, the rows with
   gamma > ``refine_margin * tol`` (the ``refine_rows`` largest) join the active
   set in :func:`mlipuq.maxvol.maxvol_from` (a warm start, so |det| never
   decreases), until no training row has gamma > ``tol``.
   The result is then a dominant set of all N rows, like the single pass.

With one chunk, levels 1-2 are the single pass exactly (same rows, same order, same
inverse). With several chunks the result is another local maximum of the volume:
its |det| is reported against the single pass's by ``benchmarks/dask_doptimality.py``
(docs/distributed.md). A rank-reduced group (numerical rank r < D) gets
its projection from the SVD of the candidate rows, which span the same space as all
rows; gamma of atoms inside that span is the same, outside it may differ.

Extrapolation grades: :func:`grade_chunks` is a lazy task per row chunk
(:func:`mlipuq.maxvol.extrapolation_grade_by_group` with the fitted inverses),
computed on the cluster by :func:`extrapolation_grades`, optionally written as a
chunked on-disk result (:func:`mlipuq.distributed.descriptors.save_chunked`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlipuq.distributed.chunked import DEFAULT_CHUNK_ROWS, as_row_chunks
from mlipuq.doptimality import ActiveSet
from mlipuq.exceptions import InputError
from mlipuq.maxvol import (
    DEFAULT_BATCH_SIZE,
    active_set_inverse,
    extrapolation_grade_by_group,
    maxvol,
    maxvol_from,
)

if TYPE_CHECKING:
    import dask.array as da

DEFAULT_REFINE_ROWS = 1024
"""Most rows added to a group's active set per refinement round."""

DEFAULT_REFINE_MARGIN = 0.8
"""Rows with gamma > margin x tol join a refinement round (3 rounds instead of 6 with
margin 1 on 4e5 x 64 synthetic rows in 25000-row chunks)."""

_ROUNDING = 1e-12  # as mlipuq.maxvol: coefficients within rounding of tol do not count

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "TwoLevelActiveSet",
    "as_row_chunks",
    "extrapolation_grades",
    "grade_chunks",
    "two_level_active_sets",
]


@dataclass(frozen=True)
class TwoLevelActiveSet:
    """One group's active set from :func:`two_level_active_sets`.

    Attributes
    ----------
    active : ActiveSet
        Rows (r, D), inverse (D, r), projection or None, and ``n_swaps`` (the
        swaps of all levels and rounds).
    indices : ndarray of int64, shape (r,)
        Rows of the whole descriptor matrix (0..N-1) forming the active set, in
        the order of ``active.rows``.
    n_rows : int
        Training rows of the group.
    n_chunks : int
        Row chunks holding at least one row of the group.
    n_candidates : int
        Rows in the union of the chunks' active sets (the input of level 2).
    n_rounds : int
        Refinement rounds that changed the active set.
    max_gamma : float or None
        Largest gamma of any training row of the group on the final set (None
        without refinement); <= tol (1 + 1e-12) when ``converged``.
    converged : bool
        Every training row has gamma <= tol (True without refinement when level 2
        converged; then only the candidates are known to be dominated).
    """

    active: ActiveSet
    indices: np.ndarray
    n_rows: int
    n_chunks: int
    n_candidates: int
    n_rounds: int
    max_gamma: float | None
    converged: bool


# ---------------------------------------------------------------------- inputs


def _group_codes(groups: Any, n_rows: int) -> tuple[list[str], np.ndarray]:
    """Sorted distinct labels and the code (index into them) of each row."""
    labels = np.asarray(groups).astype(str)
    if labels.shape != (n_rows,):
        raise InputError(f"species: expected shape ({n_rows},), got {labels.shape}")
    names, codes = np.unique(labels, return_inverse=True)
    dtype = np.int16 if len(names) < 2**15 else np.int64
    return [str(n) for n in names], codes.astype(dtype)


def _blocks(array: da.Array) -> tuple[list[Any], list[int]]:
    """Row blocks of a row-chunked dask array (delayed) and their first rows."""
    blocks = list(array.to_delayed().reshape(len(array.chunks[0]), -1)[:, 0])
    starts = np.concatenate([[0], np.cumsum(array.chunks[0])])[:-1]
    return blocks, [int(s) for s in starts]


# ---------------------------------------------------------------------- worker tasks


def _check_block(block: np.ndarray, start: int, width: int | None = None) -> np.ndarray:
    """The chunk as float64, or InputError naming its rows when not finite / wrong width."""
    block = np.asarray(block, dtype=np.float64)
    stop = start + len(block)
    if width is not None and block.shape[1] != width:
        raise InputError(f"descriptors: expected {width} columns, got {block.shape[1]}")
    if not np.all(np.isfinite(block)):
        raise InputError(f"descriptors: rows {start}..{stop - 1} hold NaN or infinite values")
    return block


def _reduce_rows(
    rows: np.ndarray, tol: float, max_iters: int | None, rank_rtol: float
) -> tuple[np.ndarray, int]:
    """(positions of at most D rows of ``rows`` spanning them with maximal volume, swaps)."""
    if len(rows) <= rows.shape[1]:
        return np.arange(len(rows)), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank notes of a chunk: level 2 reports its own
        try:
            result = maxvol(rows, tol=tol, max_iters=max_iters, rank_rtol=rank_rtol, warn=False)
        except InputError:  # all rows zero: nothing to contribute
            return np.zeros(0, dtype=np.int64), 0
    return result.indices, result.n_swaps


def _chunk_candidates(
    block: np.ndarray, codes: np.ndarray, start: int, tol: float, max_iters: int | None,
    rank_rtol: float,
) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Level 1: per group code of the chunk, (global rows, their features, swaps)."""
    block = _check_block(block, start)
    out: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for code in np.unique(codes):
        local = np.flatnonzero(codes == code)
        rows = block[local]
        pick, swaps = _reduce_rows(rows, tol, max_iters, rank_rtol)
        out[int(code)] = (start + local[pick], rows[pick], swaps)
    return out


def _union(parts: list[dict], code: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Concatenated candidates of ``code`` over ``parts``: (rows, features, swaps, parts)."""
    found = [part[code] for part in parts if code in part]
    if not found:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0)), 0, 0
    return (np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]),
            sum(f[2] for f in found), len(found))


def _merge_candidates(
    parts: list[dict], tol: float, max_iters: int | None, rank_rtol: float
) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Tree merge (``split_every``): MaxVol over the union of some chunks' candidates."""
    out: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for code in sorted({c for part in parts for c in part}):
        index, rows, swaps, _ = _union(parts, code)
        pick, more = _reduce_rows(rows, tol, max_iters, rank_rtol)
        out[code] = (index[pick], rows[pick], swaps + more)
    return out


def _chunk_violations(
    block: np.ndarray, codes: np.ndarray, start: int, inverses: Mapping[int, np.ndarray],
    threshold: float, limit: int,
) -> dict[int, tuple[float, np.ndarray, np.ndarray, np.ndarray]]:
    """Refinement: per group code, (max gamma, global rows with gamma above
    ``threshold`` (the ``limit`` largest), their gamma, their features)."""
    block = _check_block(block, start)
    active = {c: inverses[c] for c in np.unique(codes).tolist()}
    gamma = extrapolation_grade_by_group(block, codes, active)
    out = {}
    for code in active:
        local = np.flatnonzero(codes == code)
        values = gamma[local]
        above = np.flatnonzero(values > threshold)
        if above.size > limit:
            above = above[np.argpartition(-values[above], limit - 1)[:limit]]
        out[code] = (float(values.max()), start + local[above], values[above],
                     block[local[above]])
    return out


def _grade_block(
    block: np.ndarray, codes: np.ndarray, start: int, inverses: Mapping[int, np.ndarray],
    width: int, batch_size: int,
) -> np.ndarray:
    """gamma of one chunk's rows, each with the inverse of its group (shape (rows,))."""
    block = _check_block(block, start, width)
    return extrapolation_grade_by_group(block, codes, inverses, batch_size=batch_size)


# ---------------------------------------------------------------------- active sets


def two_level_active_sets(
    descriptors: Any,
    groups: Any,
    client: Any,
    *,
    tol: float = 1.01,
    max_iters: int | None = None,
    rank_rtol: float = 1e-10,
    refine: bool = True,
    refine_rows: int = DEFAULT_REFINE_ROWS,
    refine_margin: float = DEFAULT_REFINE_MARGIN,
    max_rounds: int = 20,
    split_every: int | None = None,
    chunk_rows: int | None = None,
    name: str = "features of element",
) -> dict[str, TwoLevelActiveSet]:
    """MaxVol active set of each group's rows, per row chunk on the workers, then merged.

    Parameters
    ----------
    descriptors : dask.array.Array or array_like, shape (N, D)
        Training-atom feature rows (see :func:`as_row_chunks`).
    groups : array_like, shape (N,)
        Group of each row (chemical symbols, or e.g. ``"cluster/element"`` labels).
    client : distributed.Client
        Cluster to run the chunk tasks on.
    tol, max_iters, rank_rtol
        As in :func:`mlipuq.maxvol.maxvol` (``max_iters`` caps each MaxVol call).
    refine : bool
        Grade every training row and merge the rows above ``tol`` until none is
        (the module notes); False stops after level 2.
    refine_rows : int
        Most rows merged into a group's set per round (the largest gamma first).
    refine_margin : float
        In (0, 1]: while some row has gamma > ``tol``, the rows with gamma >
        ``refine_margin * tol`` are candidates too (rows about to exceed ``tol``
        after the swaps: fewer rounds, each a pass over all rows).
    max_rounds : int
        Cap on refinement rounds (a warning if rows above ``tol`` remain).
    split_every : int, optional
        Merge the chunks' candidate sets in a tree, this many at a time, on the
        workers before level 2 (default: all at once in this process).
    chunk_rows : int, optional
        Rows per chunk for an in-memory ``descriptors``.
    name : str
        Prefix of messages (``"features of element Cu: ..."``).

    Returns
    -------
    dict of str -> TwoLevelActiveSet
        Per group label (sorted).

    Raises
    ------
    InputError
        Bad shapes or parameters, rows that are not finite, or a group whose rows
        are all zero.
    """
    import dask

    if tol < 1.0:
        raise InputError(f"tol: expected a value >= 1, got {tol}")
    if int(refine_rows) < 1 or int(max_rounds) < 0 or not 0 < refine_margin <= 1:
        raise InputError(f"refine_rows, refine_margin, max_rounds: expected >= 1, in (0, 1] "
                         f"and >= 0, got {refine_rows}, {refine_margin}, {max_rounds}")
    if split_every is not None and int(split_every) < 2:
        raise InputError(f"split_every: expected an integer >= 2, got {split_every}")
    array = as_row_chunks(descriptors, chunk_rows)
    labels, codes = _group_codes(groups, array.shape[0])
    blocks, starts = _blocks(array)
    stops = [*starts[1:], array.shape[0]]
    level1 = [dask.delayed(_chunk_candidates, pure=True)(
        block, codes[a:b], a, tol, max_iters, rank_rtol) for block, a, b in
        zip(blocks, starts, stops, strict=True)]
    parts = client.compute(level1)
    if split_every is not None:
        while len(parts) > 1 and len(parts) > int(split_every):
            step = int(split_every)
            parts = [client.submit(_merge_candidates, parts[k:k + step], tol, max_iters,
                                   rank_rtol, pure=False)
                     for k in range(0, len(parts), step)]
    parts = client.gather(parts)
    found: dict[str, dict[str, Any]] = {}
    for code, label in enumerate(labels):
        index, rows, swaps, _ = _union(parts, code)
        found[label] = _level2(index, rows, swaps, tol, max_iters, rank_rtol,
                               f"{name} {label}")
        found[label].update(
            n_rows=int(np.count_nonzero(codes == code)), n_candidates=len(index),
            n_chunks=sum(int(np.any(codes[a:b] == code))
                         for a, b in zip(starts, stops, strict=True)))
    if refine:
        _refine(found, labels, blocks, codes, starts, stops, client, tol=tol,
                max_iters=max_iters, refine_rows=int(refine_rows),
                margin=float(refine_margin), max_rounds=int(max_rounds), name=name)
    return {label: TwoLevelActiveSet(
        active=ActiveSet(item["rows"], active_set_inverse(item["rows"], item["projection"]),
                         item["projection"], int(item["swaps"])),
        indices=np.asarray(item["index"], dtype=np.int64), n_rows=item["n_rows"],
        n_chunks=item["n_chunks"], n_candidates=item["n_candidates"],
        n_rounds=item.get("rounds", 0), max_gamma=item.get("max_gamma"),
        converged=bool(item["converged"]),
    ) for label, item in found.items()}


def _level2(
    index: np.ndarray, rows: np.ndarray, swaps: int, tol: float, max_iters: int | None,
    rank_rtol: float, name: str,
) -> dict[str, Any]:
    """MaxVol over the union of candidates, warnings and errors named like the single pass."""
    if len(index) == 0:
        raise InputError(f"{name}: all rows are zero (numerical rank 0), no active set possible")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = maxvol(rows, tol=tol, max_iters=max_iters, rank_rtol=rank_rtol)
        except InputError as exc:
            raise InputError(f"{name}: {str(exc).removeprefix('features: ')}") from None
    for item in caught:
        message = str(item.message).removeprefix("features: ")
        warnings.warn(f"{name}: {message} (two-level MaxVol, {len(index)} candidate rows)",
                      item.category, stacklevel=3)
    return {"index": index[result.indices], "rows": np.array(rows[result.indices]),
            "projection": result.projection, "swaps": swaps + result.n_swaps,
            "converged": result.converged}


def _refine(
    found: dict[str, dict[str, Any]], labels: list[str], blocks: list[Any], codes: np.ndarray,
    starts: list[int], stops: list[int], client: Any, *, tol: float, max_iters: int | None,
    refine_rows: int, margin: float, max_rounds: int, name: str,
) -> None:
    """Merge the training rows above ``tol`` into the active sets until none is left."""
    import dask

    threshold = tol * (1.0 + _ROUNDING)
    pending = set(labels)
    for label in labels:
        found[label]["rounds"] = 0
    for round_number in range(max_rounds + 1):
        inverses = dask.delayed({code: active_set_inverse(found[label]["rows"],
                                                          found[label]["projection"])
                                 for code, label in enumerate(labels)}, pure=True)
        tasks = [dask.delayed(_chunk_violations, pure=True)(
            block, codes[a:b], a, inverses, margin * tol, refine_rows)
            for block, a, b in zip(blocks, starts, stops, strict=True)]
        reports = client.gather(client.compute(tasks))
        for code, label in enumerate(labels):
            if label not in pending:
                continue
            item = found[label]
            mine = [r[code] for r in reports if code in r]
            item["max_gamma"] = max(m[0] for m in mine)
            if item["max_gamma"] <= threshold:
                item["converged"] = True
                pending.discard(label)
                continue
            index = np.concatenate([m[1] for m in mine])
            gamma = np.concatenate([m[2] for m in mine])
            rows = np.concatenate([m[3] for m in mine])
            if round_number == max_rounds:
                item["converged"] = False
                warnings.warn(f"{name} {label}: {np.count_nonzero(gamma > threshold)}+ "
                              f"training rows still have gamma > tol={tol} after "
                              f"max_rounds={max_rounds} refinement rounds (max "
                              f"{item['max_gamma']:.4g})", stacklevel=3)
                continue
            if index.size > refine_rows:
                top = np.argpartition(-gamma, refine_rows - 1)[:refine_rows]
                index, rows = index[top], rows[top]
            width = len(item["index"])
            result = maxvol_from(np.concatenate([item["rows"], rows]), np.arange(width),
                                 tol=tol, max_iters=max_iters, projection=item["projection"])
            merged = np.concatenate([item["index"], index])[result.indices]
            if np.array_equal(np.sort(merged), np.sort(item["index"])):
                item["converged"] = False  # rounding-level violations only: stop here
                pending.discard(label)
                continue
            item["index"] = merged
            item["rows"] = np.concatenate([item["rows"], rows])[result.indices]
            item["swaps"] += result.n_swaps
            item["rounds"] += 1
        if not pending:
            return


# ---------------------------------------------------------------------- grades


def grade_chunks(
    descriptors: Any,
    groups: Any,
    inverses: Mapping[str, np.ndarray],
    *,
    chunk_rows: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> da.Array:
    """Lazy extrapolation grade gamma (N,), a task per row chunk of ``descriptors``.

    Parameters
    ----------
    descriptors : dask.array.Array or array_like, shape (N, D)
    groups : array_like, shape (N,)
        Group (element) of each row; each must have an entry in ``inverses``.
    inverses : mapping of str -> ndarray, shape (D, r)
        Active-set inverse per group (``DOptimalityEstimator.active_inverse_``).
    chunk_rows : int, optional
        Rows per chunk for an in-memory ``descriptors``.
    batch_size : int
        Rows per GEMM inside a chunk.

    Returns
    -------
    dask.array.Array of float64, shape (N,)
        Unitless; chunked like the rows of ``descriptors``. Nothing runs until it is
        computed (``client.compute``, :func:`extrapolation_grades`).
    """
    import dask
    import dask.array as da

    array = as_row_chunks(descriptors, chunk_rows)
    labels, codes = _group_codes(groups, array.shape[0])
    missing = sorted(set(labels) - {str(k) for k in inverses})
    if missing:
        raise InputError(f"species: element(s) {missing} have no active set "
                         f"(fitted: {sorted(map(str, inverses))})")
    lookup = {str(k): np.asarray(v, dtype=np.float64) for k, v in inverses.items()}
    widths = {v.shape[0] for v in lookup.values()}
    if widths != {array.shape[1]}:
        raise InputError(f"descriptors: expected {sorted(widths)} columns, got {array.shape[1]}")
    by_code = dask.delayed({code: lookup[label] for code, label in enumerate(labels)},
                           pure=True)
    blocks, starts = _blocks(array)
    parts = []
    for block, start, rows in zip(blocks, starts, array.chunks[0], strict=True):
        task = dask.delayed(_grade_block, pure=True)(
            block, codes[start:start + rows], start, by_code, array.shape[1], int(batch_size))
        parts.append(da.from_delayed(task, shape=(rows,), dtype=np.float64))
    if not parts:
        return da.zeros((0,), dtype=np.float64)
    return da.concatenate(parts)


def extrapolation_grades(
    descriptors: Any,
    groups: Any,
    inverses: Mapping[str, np.ndarray],
    client: Any,
    *,
    out: str | Path | None = None,
    chunk_rows: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Any:
    """gamma (N,) computed on the cluster, in memory or as a chunked result on disk.

    Parameters
    ----------
    descriptors, groups, inverses, chunk_rows, batch_size
        As in :func:`grade_chunks`.
    client : distributed.Client
    out : path-like, optional
        Directory for the result (:func:`mlipuq.distributed.descriptors.save_chunked`:
        one .npy per chunk + ``chunks.json``, swapped in atomically); the workers
        write their chunks there, nothing is gathered here.

    Returns
    -------
    ndarray of float64, shape (N,), or (with ``out``) a dask array reading ``out``
    """
    gamma = grade_chunks(descriptors, groups, inverses, chunk_rows=chunk_rows,
                         batch_size=batch_size)
    if out is not None:
        from mlipuq.distributed.descriptors import save_chunked

        return save_chunked(gamma, out, client)
    return np.asarray(client.compute(gamma).result())
