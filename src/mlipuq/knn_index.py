"""Nearest-neighbour search in descriptor space with FAISS, with the index choice visible.

Four FAISS index kinds are offered, named as FAISS names them:

``"flat"``
    ``IndexFlatL2``: exact brute force. Used by default below
    :data:`FLAT_MAX_ROWS` (1 000) rows.
``"ivfflat"``
    ``IndexIVFFlat``: k-means inverted lists (``sqrt(n)`` lists by default) holding
    the full vectors; a query scans the ``nprobe`` nearest lists (default
    ``max(4, nlist // 16)``). Used by default from 1 000 up to
    :data:`IVFFLAT_MAX_ROWS` (50 000) rows: inside an MD step, right after the
    model's forward pass (cold caches), scanning a few contiguous lists is the
    cheapest search (``docs/benchmarks_calculator.md``: 108 Cu atoms against 3 888
    training rows, 0.80 ms per step vs 2.0 ms flat and 1.4 ms HNSW).
``"hnsw"``
    ``IndexHNSWFlat(d, M)`` with ``efConstruction`` / ``efSearch``: approximate
    graph search (M=32, efConstruction=40, efSearch=16 as in the LTAU paper).
    Used by default from 50 000 up to :data:`HNSW_MAX_ROWS` (5 000 000) rows.
``"ivfpq"``
    ``IndexIVFPQ`` (inverted lists over a k-means coarse quantizer, product-quantised
    codes of 8 bits): compressed, for very large sets. Used by default from
    5 000 000 rows.

``kind="auto"`` applies this rule "by size" (:func:`choose_kind`) and logs the
choice at INFO level on the ``mlipuq.knn_index`` logger; estimators record it.

FAISS returns *squared* L2 distances; :func:`search` passes them on as such and
callers report Euclidean distances (their square root).

Threads: FAISS uses OpenMP threads process-wide. Functions here take ``n_threads``
and set it only for the duration of the call (:func:`faiss_threads`), never at
import.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from mlipuq.exceptions import InputError

logger = logging.getLogger(__name__)

FLAT_MAX_ROWS = 1_000
"""Below this many rows ``kind="auto"`` builds an exact ``IndexFlatL2``."""

IVFFLAT_MAX_ROWS = 50_000
"""Below this many rows (and from :data:`FLAT_MAX_ROWS`) ``"auto"`` builds ``IndexIVFFlat``."""

HNSW_MAX_ROWS = 5_000_000
"""Below this many rows (and from :data:`IVFFLAT_MAX_ROWS`) ``"auto"`` builds ``IndexHNSWFlat``."""

INDEX_KINDS = ("flat", "ivfflat", "hnsw", "ivfpq")


def choose_kind(n_rows: int) -> str:
    """The index kind ``"auto"`` picks for ``n_rows`` training vectors.

    ``"flat"`` below 1 000 rows, ``"ivfflat"`` below 50 000, ``"hnsw"`` below
    5 000 000, ``"ivfpq"`` above.

    Examples
    --------
    >>> choose_kind(540), choose_kind(13_500), choose_kind(400_000), choose_kind(14_600_000)
    ('flat', 'ivfflat', 'hnsw', 'ivfpq')
    """
    if n_rows < FLAT_MAX_ROWS:
        return "flat"
    if n_rows < IVFFLAT_MAX_ROWS:
        return "ivfflat"
    if n_rows < HNSW_MAX_ROWS:
        return "hnsw"
    return "ivfpq"


@contextmanager
def faiss_threads(n_threads: int | None) -> Iterator[None]:
    """Set FAISS's OpenMP thread count for the duration of a block, then restore it.

    ``None`` leaves the current setting alone.
    """
    import faiss

    if n_threads is None:
        yield
        return
    if int(n_threads) < 1:
        raise InputError(f"n_threads: expected a positive integer, got {n_threads}")
    previous = faiss.omp_get_max_threads()
    if previous == int(n_threads):  # nothing to switch (the common case inside MD loops)
        yield
        return
    faiss.omp_set_num_threads(int(n_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def default_nlist(n_rows: int, per_sqrt: float = 4.0) -> int:
    """Number of IVF inverted lists by default: ``per_sqrt * sqrt(n)`` (4 for IVF-PQ, 1 for
    IVF-flat), at least 1, at most n // 39 (FAISS's minimum of 39 points per list)."""
    return int(max(1, min(round(per_sqrt * math.sqrt(n_rows)), n_rows // 39)))


def default_nprobe(kind: str, nlist: int) -> int:
    """Inverted lists scanned per query by default: 16 (IVF-PQ), ``max(4, nlist // 16)``
    (IVF-flat), never more than ``nlist``."""
    wanted = 16 if kind == "ivfpq" else max(4, nlist // 16)
    return int(min(wanted, nlist))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantizers by default: the largest divisor of D that is at most D / 4 (>= 1)."""
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _as_float32(vectors: Any, name: str) -> np.ndarray:
    from mlipuq.validation import check_array

    array = check_array(vectors, name, ndim=2, dtype=np.float32)
    return np.ascontiguousarray(array)


def build_index(
    vectors: np.ndarray,
    *,
    kind: str = "auto",
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 16,
    ivf_nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int | None = None,
    n_threads: int | None = 1,
    seed: int = 0,
) -> Any:
    """Build a FAISS index over ``vectors``.

    Parameters
    ----------
    vectors : ndarray, shape (n, D)
        Training descriptors (converted to contiguous float32).
    kind : {"auto", "flat", "ivfflat", "hnsw", "ivfpq"}
        Index kind; ``"auto"`` applies :func:`choose_kind`.
    hnsw_m, ef_construction, ef_search : int
        ``IndexHNSWFlat`` graph degree M, ``efConstruction`` and ``efSearch``.
    ivf_nlist : int, optional
        IVF inverted lists (default ``sqrt(n)`` for IVF-flat, :func:`default_nlist`
        for IVF-PQ).
    pq_m : int, optional
        PQ sub-quantizers; must divide D (default :func:`default_pq_m`).
    nprobe : int, optional
        Inverted lists visited per query (IVF; default :func:`default_nprobe`).
    n_threads : int or None
        OpenMP threads for building (None: leave FAISS's setting).
    seed : int
        Seed of the k-means / PQ training and its subsample (IVF-PQ).

    Returns
    -------
    faiss.Index
        The filled index (``index.d == D``, ``index.ntotal == n``).

    Examples
    --------
    >>> index = build_index(np.eye(3, dtype=np.float32), kind="flat")
    >>> index.ntotal, type(index).__name__
    (3, 'IndexFlatL2')
    """
    import faiss

    data = _as_float32(vectors, "descriptors")
    n_rows, dim = data.shape
    if kind == "auto":
        kind = choose_kind(n_rows)
        logger.debug("index 'auto' -> %s for %d rows x %d features", kind, n_rows, dim)
    if kind not in INDEX_KINDS:
        raise InputError(f"index: expected one of auto, {', '.join(INDEX_KINDS)}, got {kind!r}")
    with faiss_threads(n_threads):
        if kind == "flat":
            index = faiss.IndexFlatL2(dim)
        elif kind == "hnsw":
            _check_positive(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
            index = faiss.IndexHNSWFlat(dim, int(hnsw_m))
            index.hnsw.efConstruction = int(ef_construction)
            index.hnsw.efSearch = int(ef_search)
        elif kind == "ivfflat":
            index = _train_ivfflat(data, ivf_nlist, nprobe, seed)
        else:
            index = _train_ivfpq(data, ivf_nlist, pq_m, nprobe, seed)
        index.add(data)
    return index


def train_sample(n_rows: int, kind: str, *, ivf_nlist: int | None = None,
                 seed: int = 0) -> np.ndarray | None:
    """Rows an IVF index of ``n_rows`` vectors is trained on (None: every row).

    The rule of :func:`build_index` for IVF-PQ: a seeded sample of
    ``max(64 * nlist, 65 536)`` rows (all rows below that), sorted. IVF-flat trains on
    every row in :func:`build_index`; a sharded build (:mod:`mlipuq.distributed`) that
    cannot hold every row uses the same sample rule, which keeps every row below
    65 536 rows (so the trained index is the same there).
    """
    if kind not in ("ivfflat", "ivfpq"):
        return None
    per_sqrt = 1.0 if kind == "ivfflat" else 4.0
    nlist = default_nlist(n_rows, per_sqrt=per_sqrt) if ivf_nlist is None else int(ivf_nlist)
    n_train = min(n_rows, max(64 * nlist, 65_536))
    if n_train == n_rows:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, n_train, False))


def train_index(
    sample: np.ndarray,
    n_rows: int,
    *,
    kind: str,
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 16,
    ivf_nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int | None = None,
    n_threads: int | None = 1,
    seed: int = 0,
) -> Any:
    """An empty index of ``kind`` trained on ``sample`` for ``n_rows`` vectors in all.

    Defaults that depend on the size (``nlist``) use ``n_rows``, so adding the
    ``n_rows`` vectors afterwards (in one call or shard by shard) gives the index
    :func:`build_index` gives when ``sample`` is the rows of :func:`train_sample`
    (every row when it returns None). Parameters as in :func:`build_index`.
    """
    import faiss

    data = _as_float32(sample, "descriptors")
    dim = data.shape[1]
    if kind not in INDEX_KINDS:
        raise InputError(f"index: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    with faiss_threads(n_threads):
        if kind == "flat":
            return faiss.IndexFlatL2(dim)
        if kind == "hnsw":
            _check_positive(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
            index = faiss.IndexHNSWFlat(dim, int(hnsw_m))
            index.hnsw.efConstruction = int(ef_construction)
            index.hnsw.efSearch = int(ef_search)
            return index
        per_sqrt = 1.0 if kind == "ivfflat" else 4.0
        nlist = default_nlist(n_rows, per_sqrt=per_sqrt) if ivf_nlist is None else int(ivf_nlist)
        if kind == "ivfflat":
            return _train_ivfflat(data, nlist, nprobe, seed)
        return _train_ivfpq(data, nlist, pq_m, nprobe, seed, n_rows=n_rows, sampled=True)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise InputError(f"{name}: expected a positive integer, got {value}")


def _train_ivfflat(data: np.ndarray, nlist: int | None, nprobe: int | None, seed: int) -> Any:
    import faiss

    n_rows, dim = data.shape
    nlist = default_nlist(n_rows, per_sqrt=1.0) if nlist is None else int(nlist)
    nprobe = default_nprobe("ivfflat", nlist) if nprobe is None else int(nprobe)
    _check_positive(ivf_nlist=nlist, nprobe=nprobe)
    if n_rows < nlist:
        raise InputError(f"index: ivfflat needs at least nlist={nlist} training rows, got "
                         f"{n_rows}; use index='flat'")
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
    index.cp.seed = int(seed)
    index.cp.min_points_per_centroid = 1  # small sets: no "too few points" warnings
    index.train(data)
    index.nprobe = min(nprobe, nlist)
    return index


def _train_ivfpq(
    data: np.ndarray, nlist: int | None, pq_m: int | None, nprobe: int | None, seed: int,
    *, n_rows: int | None = None, sampled: bool = False,
) -> Any:
    """IVF-PQ trained on ``data`` (``sampled``: already the :func:`train_sample` rows of
    ``n_rows`` vectors; else the sample is drawn here)."""
    import faiss

    n_data, dim = data.shape
    n_rows = n_data if n_rows is None else int(n_rows)
    nlist = default_nlist(n_rows) if nlist is None else int(nlist)
    nprobe = default_nprobe("ivfpq", nlist) if nprobe is None else int(nprobe)
    pq_m = default_pq_m(dim) if pq_m is None else int(pq_m)
    _check_positive(ivf_nlist=nlist, pq_m=pq_m, nprobe=nprobe)
    if dim % pq_m:
        raise InputError(f"pq_m: must divide the descriptor size {dim}, got {pq_m}")
    n_needed = max(nlist, 256)  # k-means needs nlist points; 8-bit PQ needs 256
    if min(n_rows, n_data) < n_needed:
        raise InputError(
            f"index: ivfpq needs at least {n_needed} training rows (nlist={nlist}, 256 PQ "
            f"centroids), got {n_rows}; use index='flat' or 'hnsw'"
        )
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8)
    index.cp.seed = int(seed)
    index.pq.cp.seed = int(seed)
    rows = None if sampled else train_sample(n_rows, "ivfpq", ivf_nlist=nlist, seed=seed)
    sample = data if rows is None else data[rows]
    index.train(np.ascontiguousarray(sample))
    index.nprobe = int(nprobe)
    return index


def index_kind(index: Any) -> str:
    """Name of a FAISS index built by :func:`build_index` (one of :data:`INDEX_KINDS`)."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivfflat"
    if isinstance(index, faiss.IndexIVF):
        return "ivfpq"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    return type(index).__name__


def set_search_params(index: Any, *, ef_search: int | None = None, nprobe: int | None = None):
    """Change ``efSearch`` (HNSW) or ``nprobe`` (IVF) of an existing index in place."""
    import faiss

    if ef_search is not None and isinstance(index, faiss.IndexHNSW):
        _check_positive(ef_search=ef_search)
        index.hnsw.efSearch = int(ef_search)
    if nprobe is not None and isinstance(index, faiss.IndexIVF):
        _check_positive(nprobe=nprobe)
        index.nprobe = int(nprobe)
    return index


def search(
    index: Any, queries: np.ndarray, k: int, *, n_threads: int | None = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest indexed rows of each query.

    Parameters
    ----------
    index : faiss.Index
        From :func:`build_index` or :func:`load_index`.
    queries : ndarray, shape (n, D)
        Query descriptors (converted to contiguous float32).
    k : int
        Neighbours per query; at most ``index.ntotal``.
    n_threads : int or None
        OpenMP threads for the search (None: leave FAISS's setting).

    Returns
    -------
    sq_distances : ndarray of float32, shape (n, k)
        Squared Euclidean distances (descriptor units squared), ascending per row.
    indices : ndarray of int64, shape (n, k)
        Row numbers of the neighbours in the indexed array.

    Raises
    ------
    InputError
        Wrong feature count, NaN queries, ``k`` out of range, or an approximate index
        that could not return ``k`` neighbours (raise ``efSearch`` / ``nprobe``).
    """
    data = _as_float32(queries, "descriptors")
    if data.shape[1] != index.d:
        raise InputError(f"descriptors: expected {index.d} features per row, got {data.shape[1]}")
    k = int(k)
    if k < 1 or k > index.ntotal:
        raise InputError(f"k: expected 1 <= k <= {index.ntotal} (indexed rows), got {k}")
    return search_checked(index, data, k, n_threads=n_threads)


def search_checked(
    index: Any, queries: np.ndarray, k: int, *, n_threads: int | None = 1
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` for queries already checked by the caller (no validation).

    ``queries`` must be a C-contiguous float32 array of shape (n, ``index.d``) without
    NaN, and ``1 <= k <= index.ntotal``: the per-call path of estimators that
    validated their input once (e.g. inside every MD step).
    """
    with faiss_threads(n_threads):
        sq_distances, indices = index.search(queries, k)
    if np.any(indices < 0):
        missing = int(np.count_nonzero(np.any(indices < 0, axis=1)))
        raise InputError(
            f"index: {missing} queries got fewer than k={k} neighbours from the "
            f"{index_kind(index)} index; raise ef_search or nprobe"
        )
    return sq_distances, indices


def save_index(index: Any, path: str | os.PathLike) -> None:
    """Write ``index`` with ``faiss.write_index``, atomically."""
    import faiss

    from mlipuq.io import atomic_path

    with atomic_path(path, suffix=".faiss") as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | os.PathLike) -> Any:
    """Read an index written by :func:`save_index` (``faiss.read_index``)."""
    import faiss

    if not os.path.isfile(path):
        raise InputError(f"{path}: index file not found")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise InputError(f"{path}: not a readable FAISS index ({first})") from None


def merge_shards(shards: list[Any]) -> Any:
    """One index holding the rows of ``shards`` in order (shard 0's rows first).

    The shards must be of one kind and, for IVF, share the trained coarse quantizer
    (and PQ codebook): built by adding consecutive row blocks to copies of one
    :func:`train_index` result. The merged index is the one adding every row to that
    trained index in one call gives: each inverted list keeps the rows in row order.
    """
    import faiss

    if not shards:
        raise InputError("index: no shards to merge")
    merged = faiss.clone_index(shards[0])
    for shard in shards[1:]:
        if isinstance(merged, faiss.IndexIVF):
            merged.merge_from(faiss.clone_index(shard), merged.ntotal)
        elif isinstance(merged, faiss.IndexFlat):
            merged.merge_from(faiss.clone_index(shard), 0)
        else:
            raise InputError(f"index: shards of a {index_kind(merged)} index cannot be merged")
    if isinstance(merged, faiss.IndexIVF):
        merged.nprobe = shards[0].nprobe
    return merged


def merge_top_k(
    results: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of several searches of the same queries (one per shard).

    Parameters
    ----------
    results : list of (sq_distances (n, k_s), rows (n, k_s))
        Each shard's result with rows already in the numbering of the whole set
        (-1: no neighbour), in shard order.
    k : int

    Returns
    -------
    sq_distances : ndarray of float32, shape (n, k)
    rows : ndarray of int64, shape (n, k)
        Ascending distance; equal distances keep shard order (lower rows first).
    """
    distances = np.concatenate([d for d, _ in results], axis=1)
    rows = np.concatenate([i for _, i in results], axis=1).astype(np.int64)
    distances = np.where(rows < 0, np.inf, distances)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(distances, order, 1).astype(np.float32),
            np.take_along_axis(rows, order, 1))
