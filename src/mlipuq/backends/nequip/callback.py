"""Lightning callbacks that log LTAU error trajectories from ``nequip-train``.

Add to any NequIP config::

    trainer:
      callbacks:
        - _target_: mlipuq.backends.nequip.callback.ErrorTrajectoryCallback
          store_path: /abs/path/trajectories
          model_id: model_0
          mode: epoch_end        # or in_batch
          weights: ema           # or raw (epoch_end mode only)

Training atoms and their order
------------------------------
The training atoms are the frames of ``trainer.datamodule.train_dataset`` (a list of
datasets). Each dataset is unwrapped through ``torch.utils.data.Subset`` layers (a
``split_dataset`` split) to its base dataset; the frames of the training subset are
taken in **original file order** (sorted base indices), dataset after dataset. Row
``i`` of every stored epoch is atom ``atom_index[i]`` of that frame list. With
``split_dataset``, frame ``c`` of the atom table is file frame
``meta.json["info"]["train_frames"][c]`` (recorded in the store's model metadata);
validation frames are not logged.

Modes
-----
``epoch_end``
    After the last training batch of each epoch, a full pass over the training
    frames with the end-of-epoch weights (``weights="ema"``: the EMA weights that
    NequIP validates with; ``"raw"``: the optimiser's weights). It runs in
    ``on_validation_end`` before the checkpoint callbacks save (Lightning always
    runs ``ModelCheckpoint`` last), or in ``on_train_epoch_end`` when the epoch had
    no validation.
``in_batch``
    The errors of the training step's own forward pass (raw weights before that
    batch's optimiser step; the model drifts within the epoch), captured with a
    forward hook on the Lightning module: no extra forward pass. Batches are mapped
    to frames by their positions (a hash of each graph's ``pos`` bytes, matched to
    the training frames), so no dataset field or transform is needed; identical
    duplicate frames are assigned in order. Frames a loader skipped (``drop_last``)
    are evaluated at the end of the epoch with the raw weights.

Multi-process training (DDP)
----------------------------
Under a distributed strategy (``trainer: {strategy: ddp, devices: N}``; gloo on
CPU) every rank builds the same atom table from the full training dataset. In
``epoch_end`` mode rank ``r`` evaluates frames ``r, r + N, r + 2N, ...`` of the
atom table; in ``in_batch`` mode each rank captures the frames of its own
``DistributedSampler`` shard. The ranks' buffers (errors, energy errors, and which
frames each saw) are all-gathered and merged by :func:`merge_rank_buffers`: a frame
seen by several ranks (the sampler pads the shards with repeated frames) takes the
value of the lowest rank, so every atom has exactly one value. Only rank 0 opens
the store, truncates stale epochs and writes; a barrier after the write means no
rank leaves an epoch before its file is on disk. Frames no rank saw (``in_batch``
with ``drop_last``) are evaluated on rank 0.

Crash and resume
----------------
Epoch ``e`` (0-based, Lightning's ``current_epoch``) is written before the
checkpoints of epoch ``e`` are saved. On (re)start at epoch ``s``, stored epochs
``>= s`` belong to a run that was killed after logging but before checkpointing:
they are **deleted** (truncate) and recomputed, so the store has exactly one row per
trained epoch.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings

import lightning
import numpy as np
import torch

from mlipuq.atom_table import AtomTable
from mlipuq.exceptions import InputError
from mlipuq.trajectory_store import TrajectoryStore

MODES = ("epoch_end", "in_batch")
WEIGHTS = ("ema", "raw")


def unwrap_dataset(dataset) -> tuple[object, np.ndarray]:
    """Base dataset and base indices of a (possibly nested) ``torch.utils.data.Subset``.

    Returns
    -------
    base : Dataset
    indices : ndarray of int64, shape (len(dataset),)
        ``dataset[j]`` is ``base[indices[j]]``.
    """
    indices = np.arange(len(dataset), dtype=np.int64)
    while isinstance(dataset, torch.utils.data.Subset):
        parent = np.asarray([int(i) for i in dataset.indices], dtype=np.int64)
        indices = parent[indices]
        dataset = dataset.dataset
    return dataset, indices


def _raw_item(base, index: int) -> dict:
    """Untransformed item of a NequIP dataset (falls back to the transformed item)."""
    getter = getattr(base, "_get_data_list", None)
    if getter is not None:
        try:
            return getter([int(index)])[0]
        except NotImplementedError:
            pass
    return base[int(index)]


def _frame_key(pos: torch.Tensor) -> bytes:
    return hashlib.blake2b(pos.detach().cpu().double().numpy().tobytes(), digest_size=16).digest()


class TrainingFrames:
    """The training frames of a NequIP datamodule in atom-table order.

    Attributes
    ----------
    items : list of (dataset, local_index)
        Frame ``c`` is ``datasets[k][local_index]`` (transforms applied on access).
    frame_ids : list of (dataset number, base index)
    atom_table : AtomTable
    offsets : ndarray of int64, shape (C + 1,)
        Atoms of frame ``c`` are rows ``offsets[c]:offsets[c+1]``.
    """

    def __init__(self, datasets) -> None:
        from ase.data import chemical_symbols

        if isinstance(datasets, torch.utils.data.Dataset):
            datasets = [datasets]
        self.items: list[tuple[object, int]] = []
        self.frame_ids: list[tuple[int, int]] = []
        sizes, species, norms, energies, forces, keys = [], [], [], [], [], []
        for number, dataset in enumerate(datasets):
            base, base_indices = unwrap_dataset(dataset)
            for local in np.argsort(base_indices, kind="stable"):
                raw = _raw_item(base, int(base_indices[local]))
                self.items.append((dataset, int(local)))
                self.frame_ids.append((number, int(base_indices[local])))
                numbers = raw["atomic_numbers"].reshape(-1).cpu().numpy()
                ref = raw.get("forces")
                if ref is None:
                    raise InputError(
                        f"training dataset {number}: frame {int(base_indices[local])} has no "
                        "reference forces"
                    )
                ref = ref.detach().cpu().double().reshape(-1, 3)
                sizes.append(len(numbers))
                species.extend(chemical_symbols[int(z)] for z in numbers)
                norms.append(torch.linalg.norm(ref, dim=1).numpy())
                forces.append(ref)
                energy = raw.get("total_energy")
                energies.append(np.nan if energy is None else float(energy.reshape(-1)[0]))
                keys.append(_frame_key(raw["pos"]))
        self.atom_table = AtomTable.from_sizes(sizes, species, force_norm=np.concatenate(norms))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.ref_energy = np.asarray(energies, dtype=np.float64)
        self._keys: dict[bytes, list[int]] = {}
        for frame, key in enumerate(keys):
            self._keys.setdefault(key, []).append(frame)

    def __len__(self) -> int:
        return len(self.items)

    def lookup(self, pos: torch.Tensor) -> list[int]:
        """Training frame numbers whose positions equal ``pos`` (exact bytes)."""
        return self._keys.get(_frame_key(pos), [])


class _EpochBuffer:
    """Per-atom force-error norms and per-frame energy errors of one epoch."""

    def __init__(self, frames: TrainingFrames) -> None:
        self.frames = frames
        self.errors = np.full(frames.atom_table.n_atoms, np.nan, dtype=np.float64)
        self.energy = np.full(len(frames), np.nan, dtype=np.float64)
        self.seen = np.zeros(len(frames), dtype=bool)

    def add(self, frame: int, force_errors: np.ndarray, energy_error: float) -> None:
        start, stop = self.frames.offsets[frame], self.frames.offsets[frame + 1]
        self.errors[start:stop] = force_errors
        self.energy[frame] = energy_error
        self.seen[frame] = True


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _graph_slices(batch: dict) -> np.ndarray:
    counts = batch["num_atoms"].reshape(-1).cpu().numpy().astype(np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


def _errors_of_batch(
    reference: dict, output: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Force-error norms (n_atoms,), energy errors (n_graphs,), graph slices (n_graphs + 1,)."""
    ref_f = reference["forces"].detach().double()
    pred_f = output["forces"].detach().double()
    force = torch.linalg.norm(pred_f - ref_f, dim=1).cpu().numpy()
    ref_e = reference.get("total_energy")
    pred_e = output["total_energy"].detach().double().reshape(-1).cpu().numpy()
    if ref_e is None:
        energy = np.full(len(pred_e), np.nan)
    else:
        energy = np.abs(pred_e - ref_e.detach().double().reshape(-1).cpu().numpy())
    return force, energy, _graph_slices(reference)


def merge_rank_buffers(
    errors: np.ndarray, energy: np.ndarray, seen: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the per-rank epoch buffers of a distributed run into one.

    Parameters
    ----------
    errors : ndarray, shape (R, N)
        Per-atom force-error norms in eV/Å of each of the R ranks (any value where
        the rank did not see the frame).
    energy : ndarray, shape (R, C)
        Per-configuration energy errors in eV of each rank.
    seen : ndarray of bool, shape (R, C)
        Which frames each rank evaluated.
    offsets : ndarray of int, shape (C + 1,)
        Atoms of frame ``c`` are columns ``offsets[c]:offsets[c+1]``.

    Returns
    -------
    errors : ndarray, shape (N,)
        NaN for atoms of frames no rank saw.
    energy : ndarray, shape (C,)
    seen : ndarray of bool, shape (C,)

    Notes
    -----
    A frame seen by several ranks (``DistributedSampler`` padding) takes the value of
    the lowest rank that saw it: exactly one value per atom, independent of timing.

    Examples
    --------
    >>> errors = np.array([[1.0, 1.0, 9.0], [2.0, 2.0, 3.0]])
    >>> seen = np.array([[True, False], [True, True]])
    >>> offsets = np.array([0, 2, 3])
    >>> merged, _, any_seen = merge_rank_buffers(errors, np.zeros((2, 2)), seen, offsets)
    >>> merged.tolist(), any_seen.tolist()
    ([1.0, 1.0, 3.0], [True, True])
    """
    errors = np.asarray(errors, dtype=np.float64)
    energy = np.asarray(energy, dtype=np.float64)
    seen = np.asarray(seen, dtype=bool)
    n_frames = seen.shape[1]
    owner = np.argmax(seen, axis=0)  # lowest rank that saw each frame (0 if none did)
    any_seen = seen.any(axis=0)
    frame_of_atom = np.repeat(np.arange(n_frames), np.diff(offsets))
    merged = errors[owner[frame_of_atom], np.arange(errors.shape[1])]
    merged[~any_seen[frame_of_atom]] = np.nan
    merged_energy = np.where(any_seen, energy[owner, np.arange(n_frames)], np.nan)
    return merged, merged_energy, any_seen


def _world(trainer) -> tuple[int, int]:
    """(global rank, world size) of a Lightning trainer; (0, 1) without one."""
    if trainer is None:
        return 0, 1
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


class ErrorTrajectoryCallback(lightning.Callback):
    """Write per-atom force-error norms of every training atom after every epoch.

    Parameters
    ----------
    store_path : str
        Directory of the :class:`~mlipuq.trajectory_store.TrajectoryStore` (created if
        absent, else opened; its atom table must match the training frames).
    model_id : str
        Name of this model in the store.
    mode : {"epoch_end", "in_batch"}
        See the module docstring.
    weights : {"ema", "raw"}
        Weights of the ``epoch_end`` pass (``ema`` falls back to raw, with a warning,
        when the training module keeps no EMA). Ignored by ``in_batch`` (raw).
    batch_size : int
        Frames per forward pass of the evaluation pass.
    seed : int, optional
        Training seed recorded in the store (must match on resume).
    every_n_epochs : int
        Log after epochs ``e`` with ``(e + 1) % every_n_epochs == 0``.
    threads : int, optional
        If given, ``torch.set_num_threads(threads)`` at setup.
    timing_file : str, optional
        If given, a JSON list (one entry per epoch) of the seconds spent inside this
        callback is written there at the end of training (for overhead benchmarks).
    cache : bool
        Keep the transformed training frames (with neighbour lists) in memory between
        ``epoch_end`` passes.

    Notes
    -----
    Errors: |F_ref - F_pred|_2 per atom in eV/Å (float32 in the store) and
    |E_ref - E_pred| per configuration (total energy) in eV. Under a distributed
    strategy only rank 0 writes (see the module docstring).
    """

    def __init__(
        self,
        store_path: str,
        model_id: str = "model_0",
        mode: str = "epoch_end",
        weights: str = "ema",
        batch_size: int = 16,
        seed: int | None = None,
        every_n_epochs: int = 1,
        threads: int | None = None,
        timing_file: str | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
        if weights not in WEIGHTS:
            raise InputError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
        for name, value in (("batch_size", batch_size), ("every_n_epochs", every_n_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name}: expected a positive integer, got {value!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads: expected a positive integer or None, got {threads!r}")
        self.store_path = str(store_path)
        self.model_id = model_id
        self.mode = mode
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.threads = threads
        self.cache = cache
        self.timing_file = timing_file
        self.seconds_: dict[int, float] = {}
        self._epoch = 0
        self.frames_: TrainingFrames | None = None
        self.store_: TrajectoryStore | None = None
        self.writer_ = None
        self._cached: list | None = None
        self._buffer: _EpochBuffer | None = None
        self._logged_epoch = -1
        self._pending: tuple | None = None
        self._captured: dict | None = None
        self._hook = None
        self._ema_warned = False

    # ------------------------------------------------------------------ setup
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def on_train_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        self.frames_ = TrainingFrames(datamodule.train_dataset)
        self._logged_epoch = trainer.current_epoch - 1
        if self.mode == "in_batch":
            self._hook = pl_module.register_forward_hook(self._capture)
        rank, world = _world(trainer)
        error = None
        if rank == 0:  # ranks > 0 never touch the store
            try:
                self._open_store(trainer.current_epoch)
            except InputError as exc:
                error = str(exc)
        if world > 1:  # every rank stops with rank 0's message, none waits for it
            error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise InputError(error)

    def _open_store(self, start_epoch: int) -> None:
        self.store_ = TrajectoryStore.create(self.store_path, self.frames_.atom_table)
        self._truncate(start_epoch)
        info = {
            "mode": self.mode,
            "weights": "raw" if self.mode == "in_batch" else self.weights,
            "every_n_epochs": self.every_n_epochs,
            "train_frames": [base for _, base in self.frames_.frame_ids],
            "train_datasets": [number for number, _ in self.frames_.frame_ids],
        }
        self.writer_ = self.store_.writer(self.model_id, seed=self.seed, info=info)

    def _truncate(self, start_epoch: int) -> None:
        if self.model_id not in self.store_.model_ids():
            return
        stale = [int(e) for e in self.store_.epochs(self.model_id) if e >= start_epoch]
        for epoch in stale:  # the epoch file first: it marks the epoch as logged
            self.store_.epoch_path(self.model_id, epoch).unlink(missing_ok=True)
            self.store_.energy_path(self.model_id, epoch).unlink(missing_ok=True)
        if stale:
            print(
                f"mlipuq: resuming at epoch {start_epoch}: removed {len(stale)} logged epoch(s) "
                f"{stale[0]}..{stale[-1]} of {self.model_id!r} not covered by the checkpoint",
                file=sys.stderr,
            )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _logs_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0

    # ------------------------------------------------------------------ in_batch
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.mode == "in_batch" and self._logs_epoch(trainer.current_epoch):
            self._buffer = _EpochBuffer(self.frames_)
        else:
            self._buffer = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start = time.perf_counter()
        self._epoch = trainer.current_epoch
        self._batch_start(batch)
        self._add_time(trainer.current_epoch, start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        self._batch_end()
        self._add_time(trainer.current_epoch, start)

    def _add_time(self, epoch: int, start: float) -> None:
        self.seconds_[epoch] = self.seconds_.get(epoch, 0.0) + time.perf_counter() - start

    def on_train_end(self, trainer, pl_module) -> None:
        if self.timing_file is not None and _world(trainer)[0] == 0:
            import json

            with open(self.timing_file, "w") as handle:
                json.dump([self.seconds_.get(e, 0.0) for e in sorted(self.seconds_)], handle)

    def _batch_start(self, batch) -> None:
        if self._buffer is None:
            return
        slices = _graph_slices(batch)
        pos = batch["pos"]
        frames: list[int] = []
        for g in range(len(slices) - 1):
            candidates = self.frames_.lookup(pos[slices[g] : slices[g + 1]])
            free = [c for c in candidates if not self._buffer.seen[c] and c not in frames]
            frames.append(free[0] if free else -1)
        reference = {"forces": batch["forces"], "num_atoms": batch["num_atoms"]}
        if "total_energy" in batch:
            reference["total_energy"] = batch["total_energy"]
        self._pending = (reference, frames)
        self._captured = None

    def _capture(self, module, args, output) -> None:
        if self._pending is not None and self._captured is None and isinstance(output, dict):
            start = time.perf_counter()
            self._captured = {
                "forces": output["forces"].detach(),
                "total_energy": output["total_energy"].detach(),
            }
            self._add_time(self._epoch, start)

    def _batch_end(self) -> None:
        if self._pending is None:
            return
        reference, frames = self._pending
        captured, self._pending, self._captured = self._captured, None, None
        if captured is None:
            return
        force, energy, slices = _errors_of_batch(reference, captured)
        for g, frame in enumerate(frames):
            if frame >= 0:
                self._buffer.add(frame, force[slices[g] : slices[g + 1]], energy[g])

    # ------------------------------------------------------------------ epoch end
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.training:
            return
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # mid-epoch validation (val_check_interval < 1)
        self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)

    def _log(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if epoch <= self._logged_epoch or not self._logs_epoch(epoch):
            return
        start = time.perf_counter()
        self._write_epoch(trainer, pl_module, epoch)
        self._add_time(epoch, start)

    def _write_epoch(self, trainer, pl_module, epoch: int) -> None:
        rank, world = _world(trainer)
        if self.mode == "in_batch":
            buffer = self._buffer
        else:  # each rank evaluates every world-th frame of the atom table
            buffer = _EpochBuffer(self.frames_)
            mine = np.arange(rank, len(self.frames_), world)
            self._evaluate_into(pl_module, buffer, mine, self.weights)
        if world > 1:
            buffer = self._gather(trainer, buffer)
        error = None
        if rank == 0:
            missing = np.flatnonzero(~buffer.seen)
            if len(missing):
                warnings.warn(
                    f"mlipuq: {len(missing)} training frame(s) were not in any batch of epoch "
                    f"{epoch}; evaluated at epoch end with raw weights",
                    stacklevel=1,
                )
                self._evaluate_into(pl_module, buffer, missing, weights="raw")
            try:
                self.writer_.append(buffer.errors, epoch=epoch, energy_errors=buffer.energy)
            except (OSError, InputError) as exc:  # e.g. disk full
                if world == 1:
                    raise
                error = f"{type(exc).__name__}: {exc}"
        if world > 1:  # no rank leaves the epoch before its file is written; a failed
            # write stops every rank with rank 0's message instead of leaving them waiting
            error = trainer.strategy.broadcast(error, src=0)
            if error is not None:
                raise InputError(f"error trajectory, epoch {epoch}: {error}")
        self._logged_epoch = epoch
        self._buffer = None

    def _gather(self, trainer, buffer: _EpochBuffer) -> _EpochBuffer:
        """All ranks' buffers merged (:func:`merge_rank_buffers`), on every rank."""
        n_atoms, n_frames = len(buffer.errors), len(buffer.energy)
        local = torch.from_numpy(
            np.concatenate([buffer.errors, buffer.energy, buffer.seen.astype(np.float64)])
        ).to(getattr(trainer.strategy, "root_device", "cpu"))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, local)
            stacked = torch.stack(parts)
        else:  # a strategy with its own collectives
            stacked = trainer.strategy.all_gather(local)
        gathered = stacked.cpu().numpy().reshape(-1, len(local))
        merged = _EpochBuffer(self.frames_)
        merged.errors, merged.energy, merged.seen = merge_rank_buffers(
            gathered[:, :n_atoms],
            gathered[:, n_atoms : n_atoms + n_frames],
            gathered[:, n_atoms + n_frames :] > 0.5,
            self.frames_.offsets,
        )
        return merged

    # ------------------------------------------------------------------ evaluation
    def _transformed(self, frame: int) -> dict:
        if self.cache:
            if self._cached is None:
                self._cached = [None] * len(self.frames_)
            if self._cached[frame] is None:
                dataset, local = self.frames_.items[frame]
                self._cached[frame] = dataset[local]
            return self._cached[frame]
        dataset, local = self.frames_.items[frame]
        return dataset[local]

    def _evaluate_into(self, pl_module, buffer: _EpochBuffer, frames, weights: str) -> None:
        from nequip.data import AtomicDataDict

        ema = getattr(pl_module, "ema", None)
        if weights == "ema" and ema is None:
            if not self._ema_warned:
                warnings.warn("mlipuq: training module has no EMA weights; using raw", stacklevel=1)
                self._ema_warned = True
            weights = "raw"
        # the Lightning module's model holds raw weights iff the EMA module holds EMA ones
        swap = ema is not None and (ema.is_holding_ema_weights == (weights == "ema"))
        if swap:
            ema.swap_parameters(pl_module.model)
        try:
            for start in range(0, len(frames), self.batch_size):
                chunk = [int(c) for c in frames[start : start + self.batch_size]]
                batch = AtomicDataDict.batched_from_list([self._transformed(c) for c in chunk])
                batch = _to_device(batch, pl_module.device)
                reference = {
                    "forces": batch["forces"],
                    "num_atoms": batch["num_atoms"],
                    "total_energy": batch.get("total_energy"),
                }
                if reference["total_energy"] is None:
                    del reference["total_energy"]
                output = pl_module(batch)
                force, energy, slices = _errors_of_batch(reference, output)
                for g, frame in enumerate(chunk):
                    buffer.add(frame, force[slices[g] : slices[g + 1]], energy[g])
        finally:
            if swap:
                ema.swap_parameters(pl_module.model)


class EpochProgressCallback(lightning.Callback):
    """Print one line per epoch to stderr: epoch, losses, validation MAEs, ETA.

    Parameters
    ----------
    label : str
        Prefix of each line (e.g. the model id).
    times_file : str, optional
        If given, a JSON list of the wall-clock time (s, ``time.perf_counter``) at the
        start of every epoch and at the end of training is written there (for
        benchmarks: epoch durations including validation and error logging).
    quiet : bool
        Do not print (only record times).
    """

    def __init__(self, label: str = "", times_file: str | None = None, quiet: bool = False) -> None:
        super().__init__()
        self.label = label
        self.times_file = times_file
        self.quiet = quiet
        self._start: float | None = None
        self._first_epoch = 0
        self._stamps: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self._stamps.append(time.perf_counter())
        if self.times_file is not None and _world(trainer)[0] == 0:
            import json

            with open(self.times_file, "w") as handle:
                json.dump(self._stamps, handle)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.quiet or _world(trainer)[0] != 0:
            return
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch
        done = epoch - self._first_epoch + 1
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        per_epoch = elapsed / max(done, 1)
        remaining = max(trainer.max_epochs - epoch - 1, 0) * per_epoch
        parts = [f"{self.label} epoch {epoch + 1}/{trainer.max_epochs}"]
        for key, name in (
            ("train_loss_step/weighted_sum", "loss"),
            ("val0_epoch/weighted_sum", "val"),
            ("val0_epoch/forces_mae", "val_F_mae_component"),
            ("val0_epoch/total_energy_mae", "val_E_mae"),
        ):
            if key in metrics:
                parts.append(f"{name}={float(metrics[key]):.4g}")
        parts.append(f"{per_epoch:.2f} s/epoch ETA {remaining:.0f} s")
        print(" ".join(parts).strip(), file=sys.stderr, flush=True)


__all__ = [
    "EpochProgressCallback",
    "ErrorTrajectoryCallback",
    "TrainingFrames",
    "merge_rank_buffers",
    "unwrap_dataset",
]
