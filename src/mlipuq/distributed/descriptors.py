"""Model outputs computed by Dask workers, stored in chunks that Dask reads back lazily.

:func:`worker_outputs` splits the frames into shards of ``shard_frames``
configurations; a task per shard runs on a worker, which loads the member's model
once per worker process (:func:`mlipuq.backends.registry.load`, cached by run,
member, model file and its modification time) and writes the shard's descriptors
(and forces) as one .npy file each. Energies, species and configuration indices
(small) come back to this process. The result is a :class:`ModelOutputs` whose
``descriptors`` and ``forces`` are ``dask.array.Array`` over those files, chunked by
shard: what :mod:`mlipuq.distributed.doptimality` and the distributed ``fit`` read
chunk by chunk on the workers.

On-disk layout of the outputs (json + .npy, no pickle; written to a temporary
directory beside the target and swapped in whole, :func:`mlipuq.io.atomic_directory`)::

    outputs.json     format "mlipuq-chunked-outputs", format_version 1, run, model_id,
                     n_configs, n_atoms, chunked (the chunked fields below)
    species.npy      (N,) chemical symbols
    config_index.npy (N,) int64
    energies.npy     (C,) eV, when the model gives energies
    descriptors/     chunked array (N, D), :mod:`mlipuq.distributed.chunked` layout
                     (manifest.json + one chunk_NNNNNN.npy per shard)
    forces/          chunked array (N, 3), eV/Å, when the model gives forces

:func:`save_chunked` writes any row-chunked dask array (e.g. gamma) in the same
chunked-array layout, each worker writing its chunk.

The directories must be on a filesystem every worker and this process see.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlipuq.backends.base import ModelOutputs
from mlipuq.distributed.chunked import MANIFEST, as_dask_array, write_chunk, write_manifest
from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    import dask.array as da
    from ase import Atoms

    from mlipuq.run_folder import RunFolder

OUTPUTS_FORMAT = "mlipuq-chunked-outputs"
FORMAT_VERSION = 1
OUTPUTS_HEADER = "outputs.json"
CHUNKED_FIELDS = ("descriptors", "forces")
DEFAULT_SHARD_FRAMES = 64
"""Configurations per worker task (and per stored chunk)."""

_MAX_CACHED_MODELS = 2
_models: OrderedDict[tuple, Any] = OrderedDict()  # this worker process's loaded members
_loads: dict[tuple, int] = {}  # how often each member was loaded here (model_loads)

__all__ = [
    "model_loads",
    "open_outputs",
    "save_chunked",
    "worker_outputs",
]


# ---------------------------------------------------------------------- chunked arrays


def _write_block(block: np.ndarray, directory: str, number: int) -> tuple[int, ...]:
    """Worker task: save one chunk (:func:`mlipuq.distributed.chunked.write_chunk`);
    returns its shape."""
    block = np.ascontiguousarray(block)
    write_chunk(directory, number, block)
    return tuple(int(n) for n in block.shape)


def _blocks_of(rows: Sequence[int]) -> list[slice]:
    bounds = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def save_chunked(array: Any, directory: str | os.PathLike, client: Any) -> da.Array:
    """Write a row-chunked dask array as a chunked array directory, chunk by chunk on
    the workers (:mod:`mlipuq.distributed.chunked` layout).

    Parameters
    ----------
    array : dask.array.Array, shape (N, ...)
        Chunked by rows (other axes are merged into one chunk); computed on the
        workers, each writing its chunk, never gathered in this process.
    directory : path-like
        New or empty directory, or a chunked array (replaced whole, atomically).
    client : distributed.Client

    Returns
    -------
    dask.array.Array
        The written array read back lazily (:func:`mlipuq.distributed.chunked.as_dask_array`).
    """
    import dask

    from mlipuq.io import atomic_directory

    if any(len(c) > 1 for c in array.chunks[1:]):
        array = array.rechunk({axis: -1 for axis in range(1, array.ndim)})
    blocks = array.to_delayed().reshape(len(array.chunks[0]), -1)[:, 0]
    with atomic_directory(directory, marker=MANIFEST) as tmp:
        tasks = [dask.delayed(_write_block, pure=False)(block, str(tmp), k)
                 for k, block in enumerate(blocks)]
        shapes = client.gather(client.compute(tasks))
        write_manifest(tmp, _blocks_of([shape[0] for shape in shapes]), array.shape,
                       array.dtype)
    return as_dask_array(directory)


# ---------------------------------------------------------------------- model outputs


def _backend(run_path: str, model_id: str, device: str, batch_size: int,
             threads: int | None) -> Any:
    """Member ``model_id`` of the run, loaded once per worker process (LRU of 2)."""
    from mlipuq.backends.registry import get, load
    from mlipuq.run_folder import RunFolder

    run = RunFolder.open(run_path)
    model_file = Path(get(run.backend).model_path(run, model_id))
    stat = model_file.stat()
    key = (run_path, model_id, device, int(batch_size), threads, str(model_file),
           stat.st_mtime_ns, stat.st_size)
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    backend = load(run, model_id, device=device, batch_size=batch_size, threads=threads)
    _models[key] = backend
    _loads[key] = _loads.get(key, 0) + 1
    while len(_models) > _MAX_CACHED_MODELS:
        _models.popitem(last=False)
    return backend


def model_loads() -> dict[str, int]:
    """How often each member was loaded in this worker process, ``"run:model_id"`` ->
    count (``client.run(model_loads)`` shows the model cache works: one load per worker
    and member)."""
    counts: dict[str, int] = {}
    for key, value in _loads.items():
        name = f"{key[0]}:{key[1]}"
        counts[name] = counts.get(name, 0) + value
    return counts


def _shard_outputs(run_path: str, model_id: str, frames: list, tmp: str, number: int,
                   device: str, batch_size: int, threads: int | None) -> dict[str, Any]:
    """Worker task: one shard's outputs; chunked fields written under ``tmp``."""
    outputs = _backend(run_path, model_id, device, batch_size, threads).outputs(frames)
    written = {}
    for field in CHUNKED_FIELDS:
        value = getattr(outputs, field)
        if value is not None:
            value = np.ascontiguousarray(value)
            _write_block(value, str(Path(tmp) / field), number)
            written[field] = (tuple(value.shape), value.dtype.str)
    return {"species": np.asarray(outputs.species, dtype=str),
            "sizes": np.bincount(outputs.config_index, minlength=len(frames)),
            "energies": None if outputs.energies is None else np.asarray(outputs.energies,
                                                                         dtype=np.float64),
            "written": written}


def worker_outputs(
    run: RunFolder | str | os.PathLike,
    frames: Sequence[Atoms],
    directory: str | os.PathLike,
    client: Any,
    *,
    model_id: str = "model_0",
    shard_frames: int = DEFAULT_SHARD_FRAMES,
    device: str = "cpu",
    batch_size: int = 16,
    threads: int | None = 1,
) -> ModelOutputs:
    """Outputs of member ``model_id`` on ``frames``, computed by the workers in shards.

    Parameters
    ----------
    run : RunFolder or path
        Run folder on a filesystem every worker sees.
    frames : sequence of ase.Atoms
        C configurations (N atoms), sent to the workers ``shard_frames`` at a time.
    directory : path-like
        Where the outputs are written (new, empty, or written by this function;
        replaced atomically as a whole).
    client : distributed.Client
    model_id : str
        Member of ``run``.
    shard_frames : int
        Configurations per task and per stored chunk.
    device, batch_size, threads
        As in :func:`mlipuq.backends.registry.load`, on each worker.

    Returns
    -------
    ModelOutputs
        In atom-table order: ``species``, ``config_index`` and ``energies`` (C,) eV in
        memory; ``descriptors`` (N, D) and ``forces`` (N, 3) eV/Å as dask arrays
        over ``directory`` (:func:`open_outputs`), None where the model gives none.

    Raises
    ------
    InputError
        Unknown member, no frames, bad ``shard_frames``, an unusable output directory,
        or an error of the backend on a worker (re-raised here).
    """
    from mlipuq.io import atomic_directory, write_json
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import check_member
    from mlipuq.training_data import as_frames

    run = run if isinstance(run, RunFolder) else RunFolder.open(run)
    check_member(run, model_id)
    frames = as_frames(frames, "frames")
    if not frames:
        raise InputError("frames: expected at least one configuration, got none")
    if isinstance(shard_frames, bool) or int(shard_frames) < 1:
        raise InputError(f"shard_frames: expected a positive integer, got {shard_frames!r}")
    step = int(shard_frames)
    run_path = str(Path(run.path).resolve())
    with atomic_directory(directory, marker=OUTPUTS_HEADER) as tmp:
        for field in CHUNKED_FIELDS:
            (tmp / field).mkdir()
        futures = [client.submit(_shard_outputs, run_path, model_id, frames[a:a + step],
                                 str(tmp), k, device, batch_size, threads, pure=False)
                   for k, a in enumerate(range(0, len(frames), step))]
        shards = client.gather(futures)
        species = np.concatenate([s["species"] for s in shards])
        sizes = np.concatenate([s["sizes"] for s in shards])
        np.save(tmp / "species.npy", species, allow_pickle=False)
        np.save(tmp / "config_index.npy",
                np.repeat(np.arange(len(sizes), dtype=np.int64), sizes), allow_pickle=False)
        if all(s["energies"] is not None for s in shards):
            np.save(tmp / "energies.npy", np.concatenate([s["energies"] for s in shards]),
                    allow_pickle=False)
        chunked = []
        for field in CHUNKED_FIELDS:
            written = [s["written"].get(field) for s in shards]
            if any(w is None for w in written):
                if any(written):
                    raise InputError(f"{run.path} {model_id}: some shards gave {field}, "
                                     "others did not")
                (tmp / field).rmdir()
                continue
            tails = {w[0][1:] for w in written}
            dtypes = {w[1] for w in written}
            if len(tails) != 1 or len(dtypes) != 1:
                raise InputError(f"{run.path} {model_id}: shards gave {field} of shapes "
                                 f"{sorted(tails)} and dtypes {sorted(dtypes)}")
            rows = [w[0][0] for w in written]
            write_manifest(tmp / field, _blocks_of(rows), (sum(rows), *tails.pop()),
                           dtypes.pop())
            chunked.append(field)
        write_json(tmp / OUTPUTS_HEADER, {
            "format": OUTPUTS_FORMAT, "format_version": FORMAT_VERSION, "run": run_path,
            "model_id": model_id, "n_configs": int(len(sizes)), "n_atoms": int(len(species)),
            "chunked": chunked, "shard_frames": step})
    return open_outputs(directory)


def open_outputs(directory: str | os.PathLike) -> ModelOutputs:
    """The outputs written by :func:`worker_outputs` (chunked fields as dask arrays).

    Raises
    ------
    InputError
        Not an outputs directory, another format version, or arrays that disagree.
    """
    from mlipuq.io import read_header

    directory = Path(directory)
    header = read_header(directory / OUTPUTS_HEADER, what="chunked model outputs",
                         format_name=OUTPUTS_FORMAT, format_version=FORMAT_VERSION)

    def small(name: str) -> np.ndarray | None:
        path = directory / f"{name}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npy file ({exc})") from None

    species, config_index = small("species"), small("config_index")
    if species is None or config_index is None:
        raise InputError(f"{directory}: chunked model outputs without species.npy or "
                         "config_index.npy")
    n_atoms = int(header.get("n_atoms", -1))
    fields = {field: as_dask_array(directory / field) for field in header.get("chunked", [])
              if field in CHUNKED_FIELDS}
    for field, value in {"species": species, "config_index": config_index, **fields}.items():
        if value.shape[0] != n_atoms:
            raise InputError(f"{directory}: {field} has {value.shape[0]} rows, expected "
                             f"{n_atoms} atoms ({OUTPUTS_HEADER})")
    return ModelOutputs(species=species.astype(str), config_index=config_index.astype(np.int64),
                        energies=small("energies"), **fields)
