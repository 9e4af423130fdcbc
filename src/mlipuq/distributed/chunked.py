"""Row-chunked arrays on a shared filesystem: one ``.npy`` per row block plus a manifest.

Layout of a chunked array directory::

    NAME/
      manifest.json        format "mlipuq.chunked", version, shape, dtype, chunks
                           ([start, stop, file] per block, rows start:stop)
      chunk_000000.npy     rows 0 .. c0 (plain .npy, no pickle: memory-mappable)
      chunk_000001.npy     ...

Each task writes its own chunk file atomically (:func:`mlipuq.io.atomic_path`); the
manifest is written last, by the client, once every chunk exists, so a directory
without a manifest is unfinished. Whole directories are written into a temporary
directory and swapped in (:func:`mlipuq.io.atomic_directory`) by their callers. Dask
reads them back lazily with :func:`as_dask_array` (one memory-mapped chunk per
block). ``dask.array.to_npy_stack`` is not used: its ``info`` file is a pickle, and
mlipuq never unpickles files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.exceptions import InputError

FORMAT_NAME = "mlipuq.chunked"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def row_blocks(n_rows: int, chunk_size: int) -> list[slice]:
    """Consecutive row blocks of at most ``chunk_size`` rows covering ``n_rows``.

    Examples
    --------
    >>> row_blocks(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InputError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    return [slice(start, min(start + int(chunk_size), n_rows))
            for start in range(0, n_rows, int(chunk_size))]


def chunk_name(number: int) -> str:
    """File name of chunk ``number``."""
    return f"chunk_{int(number):06d}.npy"


def write_chunk(directory: str | os.PathLike, number: int, values: np.ndarray) -> str:
    """Write one chunk atomically; returns its file name."""
    from mlipuq.io import atomic_path

    name = chunk_name(number)
    with atomic_path(Path(directory) / name, suffix=".npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(values), allow_pickle=False)
    return name


def write_manifest(directory: str | os.PathLike, blocks: Sequence[slice],
                   shape: tuple[int, ...], dtype: Any, **extra: Any) -> None:
    """Write the manifest of a chunked array whose chunk files all exist."""
    from mlipuq.io import write_json

    directory = Path(directory)
    chunks = [[b.start, b.stop, chunk_name(number)] for number, b in enumerate(blocks)]
    missing = [c[2] for c in chunks if not (directory / c[2]).is_file()]
    if missing:
        raise InputError(f"{directory}: chunk files missing: {missing[:3]}")
    write_json(directory / MANIFEST, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "shape": [int(n) for n in shape], "dtype": np.dtype(dtype).str,
        "chunks": chunks, **extra,
    })


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked manifest of a chunked array directory."""
    from mlipuq.io import read_header

    return read_header(Path(directory) / MANIFEST, what="chunked array",
                       format_name=FORMAT_NAME, format_version=FORMAT_VERSION)


def load_chunk(directory: str | os.PathLike, file: str, *, mmap: bool = True) -> np.ndarray:
    """One chunk (memory-mapped by default)."""
    path = Path(directory) / file
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy chunk ({error})") from None


def as_dask_array(directory: str | os.PathLike) -> Any:
    """The chunked array as a ``dask.array.Array`` (one block per chunk file, read lazily
    by memory map on whichever worker computes it)."""
    import dask
    import dask.array as da

    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    tail = tuple(manifest["shape"][1:])
    blocks = [da.from_delayed(dask.delayed(load_chunk)(str(directory), file),
                              shape=(stop - start, *tail), dtype=dtype)
              for start, stop, file in manifest["chunks"]]
    if not blocks:
        return da.zeros((0, *tail), dtype=dtype)
    return da.concatenate(blocks, axis=0)


def read_all(directory: str | os.PathLike, out: np.ndarray | None = None) -> np.ndarray:
    """The whole array, chunk by chunk, into ``out`` (e.g. a memory-mapped ``.npy``
    from :func:`numpy.lib.format.open_memmap`) or a new array."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shape = tuple(manifest["shape"])
    if out is None:
        out = np.empty(shape, dtype=np.dtype(manifest["dtype"]))
    elif out.shape != shape:
        raise InputError(f"{directory}: holds {shape}, the output has {out.shape}")
    for start, stop, file in manifest["chunks"]:
        chunk = load_chunk(directory, file)
        out[start:stop] = chunk
        del chunk
    return out


def to_npy(directory: str | os.PathLike, target: str | os.PathLike) -> None:
    """Concatenate a chunked array into one ``.npy`` file (atomic), O(chunk) memory."""
    from numpy.lib.format import open_memmap

    from mlipuq.io import atomic_path

    manifest = read_manifest(directory)
    with atomic_path(target, suffix=".npy") as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.dtype(manifest["dtype"]),
                          shape=tuple(manifest["shape"]))
        read_all(directory, out)
        out.flush()
        del out


DEFAULT_CHUNK_ROWS = 65536
"""Rows per chunk when an in-memory descriptor matrix is split (65536 x 64 floats: 32 MiB)."""


def as_row_chunks(descriptors: Any, chunk_rows: int | None = None) -> Any:
    """``descriptors`` (N, D) as a dask array chunked by rows only.

    Parameters
    ----------
    descriptors : dask.array.Array or array_like, shape (N, D)
        A dask array keeps its row chunks (its column chunks are merged); anything
        else (ndarray, memmap) is split into chunks of ``chunk_rows`` rows that
        travel through the scheduler to the workers. For more rows than this
        process can hold, give a dask array over files
        (:func:`mlipuq.distributed.chunked.as_dask_array`, or the outputs of
        :func:`mlipuq.distributed.descriptors.worker_outputs`).
    chunk_rows : int, optional
        Default :data:`DEFAULT_CHUNK_ROWS`.

    Returns
    -------
    dask.array.Array, shape (N, D)
    """
    import dask.array as da

    if chunk_rows is not None and int(chunk_rows) < 1:
        raise InputError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
    if not isinstance(descriptors, da.Array):
        descriptors = np.asarray(descriptors) if not hasattr(descriptors, "shape") else descriptors
        if descriptors.ndim != 2:
            raise InputError(f"descriptors: expected shape (N, D), got {descriptors.shape}")
        rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
        return da.from_array(descriptors, chunks=(rows, -1), asarray=True)
    if descriptors.ndim != 2:
        raise InputError(f"descriptors: expected shape (N, D), got {descriptors.shape}")
    if len(descriptors.chunks[1]) > 1:
        descriptors = descriptors.rechunk({1: -1})
    return descriptors
