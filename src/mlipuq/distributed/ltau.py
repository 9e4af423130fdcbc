"""LTAU fit and predict on a Dask cluster: per-atom-chunk histograms, sharded FAISS indices.

What runs where (``docs/distributed.md``):

- **Error distributions and p_i**: one task per block of ``chunk_size`` training atoms
  reads its rows of every epoch file of every model by memory map
  (:func:`~mlipuq.trajectory_store.read_epoch_rows`, one epoch at a time; the task
  gets the file list, never the O(N) atom table),
  counts them into its (n, B) histogram exactly as the in-process
  :func:`~mlipuq.distributions.distributions_from_store` does, and writes its mass,
  sample counts, p_i (CDF at the tolerance) and expected error as chunk files
  (:mod:`mlipuq.distributed.chunked`). The error range (first pass) is a min/max over
  the same blocks. Memory per task O(n x B) whatever N is; the result is the same
  array, bit for bit.
- **Index**: per element group, an empty index trained on a seeded sample
  (:func:`mlipuq.knn_index.train_sample`; IVF-flat / IVF-PQ) or untrained (flat), copied
  to the workers; each task adds one block of rows and writes its shard. The shards
  are merged in row order in the client (:func:`mlipuq.knn_index.merge_shards`),
  which is the index the in-process fit builds from the same training sample. HNSW
  is not sharded (its graph cannot be merged): it is built in the client.
- **Search** (predict): one task per (query block, shard), a top-k merge by distance
  per query block (:func:`mlipuq.knn_index.merge_top_k`); the neighbours come back to
  the client, which applies the transfer (p_j, expected error) as in-process.

Everything a task writes goes into a work directory on the shared filesystem
(beside the store by default), one file per task, atomically; the fitted estimator
reads its arrays from there until it is saved.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.distributed.chunked import (
    as_row_chunks,
    chunk_name,
    read_manifest,
    row_blocks,
    to_npy,
    write_chunk,
    write_manifest,
)
from mlipuq.exceptions import InputError

DEFAULT_CHUNK_SIZE = 100_000
"""Training atoms per task (histograms) and rows per index shard by default."""
RETRIES = 3
"""Times Dask reruns a task whose worker died (then the fit fails as a whole)."""
SHARDABLE = ("flat", "ivfflat", "ivfpq")
"""Index kinds built shard by shard on the workers."""
MERGE_FAN_IN = 8
"""Shard results merged by one top-k merge task (the merge is a tree above that)."""
WORK_NAME = "mlipuq-dask"
"""Work directories are ``.mlipuq-dask.tmp-HOST-PID-*`` beside the store."""


# ---------------------------------------------------------------------- work directory
def work_directory(near: str | os.PathLike, owner: Any = None) -> Path:
    """A new hidden scratch directory in ``near`` (on the filesystem the workers share),
    removed when ``owner`` is garbage-collected or the process exits; those of killed
    processes of this host are removed by the next call
    (``.mlipuq-dask.tmp-HOST-PID-*``, :func:`mlipuq.io.clean_stale_temporaries`)."""
    from mlipuq.io import _temporary_prefix, clean_stale_temporaries

    target = Path(near) / WORK_NAME
    clean_stale_temporaries(target)
    path = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=near))
    weakref.finalize(owner if owner is not None else path, shutil.rmtree, str(path), True)
    return path


# ---------------------------------------------------------------------- tasks
def _block_range(files: list[str], shape: tuple[int, ...], atoms: slice
                 ) -> tuple[float, float]:
    """(min, max) error norm of a block of atoms over the epoch ``files``."""
    from mlipuq.trajectory_store import read_epoch_rows

    low, high = np.inf, -np.inf
    for file in files:
        errors = read_epoch_rows(file, atoms, shape, norm=True)
        low, high = min(low, float(errors.min())), max(high, float(errors.max()))
    return low, high


def _block_histogram(files: list[str], shape: tuple[int, ...], atoms: slice, number: int,
                     edges: np.ndarray, limits: Any, out: str) -> int:
    """Histogram, p_i and expected error of one block of atoms, written as chunk files.

    ``files``: every selected epoch file of every model; ``limits``: the tolerance of
    every atom of the block in eV/Å (scalar or (n,)).
    """
    from mlipuq.distributions import _Histogram
    from mlipuq.trajectory_store import read_epoch_rows

    n_rows = atoms.stop - atoms.start
    histogram = _Histogram(edges, n_rows, len(files))
    for file in files:
        histogram.add(read_epoch_rows(file, atoms, shape, norm=True))
    dists = histogram.result()
    if np.ndim(limits) == 0:  # one per atom: the rule LTAUEstimator.train_confidence uses
        limits = np.full(n_rows, float(limits))
    out = Path(out)
    write_chunk(out / "mass", number, dists.mass)
    write_chunk(out / "n_samples", number, dists.n_samples)
    write_chunk(out / "p", number, np.asarray(dists.cdf(limits), dtype=np.float64))
    write_chunk(out / "expected", number, np.asarray(dists.expected_error(), dtype=np.float64))
    return n_rows


def _add_shard(index_bytes: np.ndarray, block: np.ndarray, path: str) -> int:
    """Add ``block`` to a copy of the trained index and write the shard; its row count."""
    import faiss

    from mlipuq.knn_index import save_index

    block = np.ascontiguousarray(block, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(block).all(axis=1)))
    if bad:
        raise InputError(f"descriptors: {bad} training row(s) with NaN or inf in the block "
                         f"written to {Path(path).name} (every descriptor must be finite)")
    index = faiss.deserialize_index(index_bytes)
    with _one_thread():
        index.add(block)
    save_index(index, path)
    return int(index.ntotal)


@functools.lru_cache(maxsize=2)
def _cached_index(path: str, stamp: float) -> Any:
    from mlipuq.knn_index import load_index

    return load_index(path)


def _search_shard(path: str, offset: int, queries: np.ndarray, k: int,
                  nprobe: int | None, ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of one shard (rows numbered in the whole group: + ``offset``)."""
    from mlipuq.knn_index import set_search_params

    index = _cached_index(path, os.stat(path).st_mtime)
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    k_shard = min(int(k), int(index.ntotal))
    with _one_thread():
        distances, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k_shard)
    return distances, np.where(rows < 0, -1, rows + int(offset))


def _merge(k: int, *results: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from mlipuq.knn_index import merge_top_k

    return merge_top_k(list(results), k)


class _one_thread:
    """FAISS with one OpenMP thread inside a task (one Dask thread per worker core)."""

    def __enter__(self) -> None:
        import faiss

        self.previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        import faiss

        faiss.omp_set_num_threads(self.previous)


# ---------------------------------------------------------------------- distributions
def distributions_on_cluster(
    store: Any,
    client: Any,
    *,
    out: str | os.PathLike,
    limits: Any,
    n_bins: int = 100,
    spacing: str = "log",
    window: Any = None,
    model_ids: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Per-atom error distributions, p_i and expected errors built by the workers.

    Parameters
    ----------
    store : TrajectoryStore
        On a filesystem every worker reads.
    client : distributed.Client
    out : path
        Directory (shared) to write the chunked results into: ``n_samples/``, ``p/``,
        ``expected/`` (:mod:`mlipuq.distributed.chunked`) and ``mass.npy`` (the (N, B)
        mass as one memory-mappable file, concatenated from the tasks' chunks).
    limits : float or ndarray (N,)
        Tolerance of every training atom in eV/Å (``atol + rtol * |F_ref,i|``): p_i is
        the CDF of atom i's distribution there.
    n_bins, spacing, window, model_ids
        As in :func:`mlipuq.distributions.distributions_from_store`.
    chunk_size : int
        Atoms per task.

    Returns
    -------
    distributions : ErrorDistributions
        The in-process function's result (same bins, same mass bit for bit), with the
        mass memory-mapped from ``out/mass.npy``.
    p : ndarray of float64, shape (N,)
        p_i = CDF_i(limits_i).
    expected : ndarray of float64, shape (N,)
        Expected error of each training atom in eV/Å.
    """
    from distributed import wait

    from mlipuq.distributions import ErrorDistributions, _range_edges
    from mlipuq.trajectory_store import window_slice

    ids = store.model_ids() if model_ids is None else list(model_ids)
    if not ids:
        raise InputError(f"model_ids: the store {store.path} holds no models")
    files = []  # every selected epoch of every model: all a task needs (no atom table)
    for model in ids:
        logged = store.epochs(model)
        if len(logged) == 0:
            raise InputError(f"model {model!r}: no epochs logged in {store.path}")
        files += [str(store.epoch_path(model, epoch))
                  for epoch in logged[window_slice(len(logged), window)]]
    blocks = row_blocks(store.n_atoms, chunk_size)
    shape = store.error_shape
    many = len(blocks)
    ranges = client.gather(client.map(_block_range, [files] * many, [shape] * many, blocks,
                                      retries=RETRIES, pure=False))
    low = min(r[0] for r in ranges)
    high = max(r[1] for r in ranges)
    edges = _range_edges(low, high, n_bins, spacing)
    out = Path(out)
    for name in ("mass", "n_samples", "p", "expected"):
        (out / name).mkdir(parents=True, exist_ok=True)
    block_limits = [limits if np.ndim(limits) == 0 else np.asarray(limits)[b] for b in blocks]
    futures = client.map(_block_histogram, [files] * many, [shape] * many, blocks,
                         range(many), [edges] * many, block_limits, [str(out)] * many,
                         retries=RETRIES, pure=False)
    wait(futures)
    client.gather(futures)  # raises the first task error
    n_atoms = store.n_atoms
    write_manifest(out / "mass", blocks, (n_atoms, len(edges) - 1), np.float32)
    write_manifest(out / "n_samples", blocks, (n_atoms,), np.int64)
    write_manifest(out / "p", blocks, (n_atoms,), np.float64)
    write_manifest(out / "expected", blocks, (n_atoms,), np.float64)
    to_npy(out / "mass", out / "mass.npy")
    shutil.rmtree(out / "mass", ignore_errors=True)  # the chunks are in mass.npy now: disk
    mass = np.load(out / "mass.npy", mmap_mode="r")
    from mlipuq.distributed.chunked import read_all

    dists = ErrorDistributions(edges, mass, read_all(out / "n_samples"))
    return dists, read_all(out / "p"), read_all(out / "expected")


# ---------------------------------------------------------------------- index
def build_group_index(
    client: Any,
    descriptors: Any,
    rows: np.ndarray,
    *,
    kind: str,
    options: dict,
    out: str | os.PathLike,
    name: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    merge: bool = True,
    timings: dict | None = None,
) -> tuple[Any, list[tuple[str, int, int]]]:
    """The index of one group of training rows, built shard by shard on the workers.

    The index is trained in the client on the :func:`~mlipuq.knn_index.train_sample`
    rows (gathered from ``descriptors``); each task then reads one block of rows and
    adds it to a copy of the trained index (read and add in one task: a worker holds
    one block at a time). ``merge=False`` leaves the shards on disk only (searched by
    :func:`search_on_cluster`; the client never holds the whole index).

    Parameters
    ----------
    descriptors : dask.array.Array, shape (N, D)
        Chunked by rows (:func:`as_row_chunks`).
    rows : ndarray of int, shape (n,)
        The group's rows, increasing.
    timings : dict, optional
        Filled with the wall seconds of ``"train"`` and ``"add"``.

    Returns
    -------
    index : faiss.Index or None
        The shards merged in row order (what :func:`mlipuq.knn_index.build_index`
        builds in-process from the same training sample); None without ``merge``.
    shards : list of (file, first row, n_rows)
        The shard files (rows numbered within the group).
    """
    import time

    import dask
    import faiss

    from mlipuq.knn_index import merge_shards, train_index, train_sample

    started = time.perf_counter()
    n_rows = len(rows)
    dim = int(descriptors.shape[1])
    whole = n_rows == descriptors.shape[0]
    sample_rows = train_sample(n_rows, kind, ivf_nlist=options.get("ivf_nlist"),
                               seed=options.get("seed", 0))
    if kind == "flat":
        sample = np.zeros((1, dim), dtype=np.float32)
    else:
        chosen = rows if sample_rows is None else rows[sample_rows]
        picked = descriptors if whole and sample_rows is None else descriptors[chosen]
        sample = np.asarray(client.compute(picked).result(), dtype=np.float32)
    trained = train_index(sample, n_rows, kind=kind, **options)
    del sample
    serialized = client.scatter(faiss.serialize_index(trained), broadcast=True, hash=False)
    if timings is not None:
        timings["train"] = time.perf_counter() - started
    started = time.perf_counter()
    group = descriptors if whole else descriptors[rows]
    group = group.rechunk((chunk_size, -1))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, tasks, start = [], [], 0
    for number, block in enumerate(group.to_delayed().ravel()):
        size = int(group.chunks[0][number])
        file = str(out / f"index_{name}.{number}.faiss")
        tasks.append(dask.delayed(_add_shard, pure=False)(serialized, block, file))
        shards.append((file, start, size))
        start += size
    client.gather(client.compute(tasks, retries=RETRIES))
    if timings is not None:
        timings["add"] = time.perf_counter() - started
    if not merge:
        return None, shards
    loaded = [faiss.read_index(file) for file, _, _ in shards]
    return merge_shards(loaded), shards


def search_on_cluster(
    client: Any,
    shards: list[tuple[str, int, int]],
    queries: np.ndarray,
    k: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """k-NN of ``queries`` in a sharded index: one task per (query block, shard), then a
    top-k merge by distance per query block, as a tree of :data:`MERGE_FAN_IN` inputs per
    merge task (so a worker holds at most that many shards' results of a block whatever
    the number of shards). Rows numbered within the group."""
    results = []
    for block in row_blocks(len(queries), chunk_size):
        part = client.scatter(np.ascontiguousarray(queries[block]), hash=False)
        level = [client.submit(_search_shard, file, start, part, k, nprobe, ef_search,
                               retries=RETRIES, pure=False)
                 for file, start, _ in shards]
        while True:  # consecutive shards merged in order: ties keep the lower rows first
            level = [client.submit(_merge, k, *level[i:i + MERGE_FAN_IN], retries=RETRIES,
                                   pure=False)
                     for i in range(0, len(level), MERGE_FAN_IN)]
            if len(level) == 1:
                break
        results.append(level[0])
    parts = client.gather(results)
    if not parts:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return (np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts]))


def shard_files_ready(shards: list[tuple[str, int, int]]) -> bool:
    """True when every shard file exists."""
    return all(Path(file).is_file() for file, _, _ in shards)


__all__ = ["DEFAULT_CHUNK_SIZE", "RETRIES", "as_row_chunks", "build_group_index",
           "chunk_name", "distributions_on_cluster", "read_manifest", "search_on_cluster",
           "work_directory"]
