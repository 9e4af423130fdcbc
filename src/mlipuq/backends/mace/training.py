"""Train an ensemble of MACE models with per-epoch error trajectories (``mlipuq train``).

MACE's training loop (``mace.tools.train``) has no callbacks, and patching it is not an
option, so mlipuq drives MACE's public pieces from its own loop: the model
(``mace.modules.ScaleShiftMACE``, see :mod:`~mlipuq.backends.mace.model`), its graphs
(``mace.data.AtomicData``), statistics (``compute_avg_num_neighbors``,
``compute_mean_rms_energy_forces``), loss (``WeightedEnergyForcesLoss``) and EMA
(``torch_ema``). One step is MACE's ``take_step``: zero grad, forward with
``training=True``, loss, backward, gradient clipping, Adam (amsgrad) step, EMA update.

Error logging (``log_mode``):

``in_batch`` (default)
    The per-atom force-error norms of each training step's own forward pass (raw
    weights before that batch's optimiser step): no extra forward pass. Batches are
    drawn by mlipuq (a seeded permutation per epoch, ``numpy.random.default_rng([seed,
    epoch])``), so every row is mapped to its atom without any lookup.
``epoch_end``
    After each epoch, one more pass over all training frames with the EMA weights (the
    weights that are validated and saved).

Per-configuration energy errors ``|E_pred - E_ref|`` (eV) go with each epoch.

Run folder (besides what :func:`mlipuq.training_data.create_run` writes)::

    models/model_0.json        hyper-parameters (written when the member starts)
    models/model_0.pt          final weights (EMA), written when the member finishes
    models/model_0/last.pt     checkpoint after the last finished epoch (resume)
    metrics/model_0.csv        one row per epoch

Crash and resume: epoch ``e`` is logged, then ``last.pt`` of epoch ``e`` is written
(atomically). ``resume=True`` continues each unfinished member from its ``last.pt``
(logged epochs past it are removed first, so the store has one row per trained epoch);
shuffling depends only on ``(seed, epoch)``, so a resumed member sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path, clean_stale_temporaries
from mlipuq.run_folder import RunFolder
from mlipuq.training_data import (
    check_elements,
    create_run,
    fit_isolated_energies,
    read_isolated_energies,
    read_training_set,
    split_meta,
    split_or_read_val,
)

LOG_MODES = ("in_batch", "epoch_end")
PROGRESS_PREFIX = "[mlipuq]"

#: Loss weights of every preset: MACE's ``WeightedEnergyForcesLoss`` (per-atom energy
#: MSE in (eV/atom)^2 and force-component MSE in (eV/Å)^2).
LOSS_WEIGHTS: dict[str, float] = {"energy_weight": 1.0, "force_weight": 10.0}

_COMMON = {"num_polynomial_cutoff": 5, "lr": 0.01, "ema_decay": 0.99,
           "max_grad_norm": 10.0, **LOSS_WEIGHTS}

#: Size presets. Descriptor size D = ``num_channels * num_interactions``.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON, "num_interactions": 2, "num_channels": 8, "max_L": 0, "max_ell": 1,
        "correlation": 2, "num_bessel": 6, "radial_mlp": [16, 16], "mlp_irreps": "8x0e",
        "dtype": "float64", "batch_size": 4,
    },
    "small": {
        **_COMMON, "num_interactions": 2, "num_channels": 16, "max_L": 1, "max_ell": 2,
        "correlation": 2, "num_bessel": 8, "radial_mlp": [32, 32], "mlp_irreps": "16x0e",
        "dtype": "float32", "batch_size": 5,
    },
    "paper": {
        **_COMMON, "num_interactions": 2, "num_channels": 32, "max_L": 1, "max_ell": 3,
        "correlation": 3, "num_bessel": 8, "radial_mlp": [64, 64, 64],
        "mlp_irreps": "16x0e", "dtype": "float32", "batch_size": 5, "ema_decay": 0.999,
    },
}


class TrainingError(InputError):
    """Training stopped (e.g. a non-finite loss)."""


def preset_params(preset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A preset's fields with ``overrides`` applied (InputError for unknown ones)."""
    if preset not in PRESETS:
        raise InputError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    params = dict(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in params:
            raise InputError(f"preset override: unknown field {key!r} (known: {sorted(params)})")
        params[key] = value
    for key in ("energy_weight", "force_weight", "lr"):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                np.isfinite(value) and value >= 0):
            raise InputError(f"{key}: expected a finite number >= 0, got {value!r}")
    if params["force_weight"] == 0:
        raise InputError("force_weight: expected > 0 (mlipuq logs and transfers force errors)")
    return params


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from mlipuq import __version__

    out = {"mlipuq_version": __version__}
    for package in ("mace-torch", "torch", "e3nn"):
        try:
            out[f"{package.replace('-', '_')}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package.replace('-', '_')}_version"] = "absent"
    return out


# ---------------------------------------------------------------------- run layout
def weights_path(run: RunFolder, model_id: str) -> Path:
    """``RUN/models/<model_id>.pt``: final weights of a member (may not exist)."""
    return run.models_dir / f"{run.model_dir(model_id).name}.pt"


def checkpoint_path(run: RunFolder, model_id: str) -> Path:
    """``RUN/models/<model_id>/last.pt``: training state after the last finished epoch."""
    return run.model_dir(model_id) / "last.pt"


# ---------------------------------------------------------------------- ensemble
def train_ensemble(
    train_file: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    preset: str = "small",
    epochs: int = 40,
    n_models: int = 1,
    seed: int = 0,
    val_fraction: float = 0.1,
    val_file: str | os.PathLike | None = None,
    isolated_energies: str | os.PathLike | Mapping[str, float] | None = None,
    log_mode: str = "in_batch",
    weights: str = "ema",
    every_n_epochs: int = 1,
    eval_batch_size: int = 16,
    threads: int = 1,
    r_max: float = 5.0,
    preset_overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    package: bool = False,
    config: str | os.PathLike | None = None,
    processes: int | None = None,
) -> RunFolder:
    """Train ``n_models`` MACE models into a run folder with their error trajectories.

    Parameters
    ----------
    train_file : path-like
        extxyz with energies (eV) and forces (eV/Å) on every frame.
    run_dir : path-like
        Run folder to create (``run.json["backend"] = "mace"``).
    preset : {"tiny", "small"}
        Model size (:data:`PRESETS`).
    epochs : int
        Epochs per member.
    n_models : int
        Ensemble size M; member ``i`` is ``model_i`` with seed ``seed + i``.
    seed : int
        First seed; also seeds the train/validation split.
    val_fraction : float
        Share of the frames held out for validation (not with ``val_file``).
    val_file : path-like, optional
        A fixed validation set; every frame of ``train_file`` is then trained on.
    isolated_energies : path-like or mapping, optional
        Isolated-atom energies (eV) used as MACE's E0s; fitted by least squares on the
        training frames when absent.
    log_mode : {"in_batch", "epoch_end"}
        Where the per-atom force errors of each epoch come from (module notes).
    weights : {"ema", "raw"}
        Weights of the ``epoch_end`` pass (``in_batch`` is always raw).
    every_n_epochs : int
        Log epochs ``n - 1, 2n - 1, ...`` only.
    eval_batch_size : int
        Frames per pass of validation and ``epoch_end`` logging.
    threads : int
        torch threads while training.
    r_max : float
        Cutoff in Å.
    preset_overrides : mapping, optional
        Preset fields to change, e.g. ``{"lr": 0.0}`` (keys of :data:`PRESETS` entries).
    overwrite : bool
        Replace an existing run folder.
    resume : bool
        Continue an existing run: finished members are kept, unfinished ones continue
        from their ``last.pt`` up to ``epochs``.
    progress : bool
        One line per epoch on stderr.
    package : bool
        Ignored (NequIP's packaging step; a MACE member is always its ``.pt`` + json).
    config : None
        NequIP YAML configs do not apply; anything else is an InputError.
    processes : None or 1
        Training processes per member; MACE members train in one process (anything
        else is an InputError).

    Returns
    -------
    RunFolder
    """
    from mlipuq.trajectory_store import TrajectoryStore

    del package
    if processes not in (None, 1):
        raise InputError(f"--processes {processes}: the MACE backend trains each member in "
                         "one process (give 1 or leave it out)")
    if config is not None:
        raise InputError(f"--config {config}: a NequIP YAML; the MACE backend trains its "
                         f"presets {sorted(PRESETS)} (change fields with preset overrides)")
    if weights not in ("ema", "raw"):
        raise InputError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
    epochs = _positive_int(epochs, "epochs")
    n_models = _positive_int(n_models, "n_models")
    threads = _positive_int(threads, "threads")
    eval_batch_size = _positive_int(eval_batch_size, "eval_batch_size")
    if log_mode not in LOG_MODES:
        raise InputError(f"log_mode: expected one of {LOG_MODES}, got {log_mode!r}")
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not (
            np.isfinite(r_max) and r_max > 0):
        raise InputError(f"r_max: expected a positive cutoff in Å, got {r_max!r}")
    run_dir = Path(run_dir)
    clean_stale_temporaries(run_dir)
    if resume and (run_dir / "run.json").is_file():
        folder = RunFolder.open(run_dir, unfinished=True)
        if folder.backend != "mace":
            raise InputError(f"{run_dir}: run has backend {folder.backend!r}, not 'mace'")
        if folder.meta.get("n_models") != n_models:
            raise InputError(f"{run_dir}: run has n_models={folder.meta.get('n_models')}, "
                             f"resume asked for {n_models}")
        stored = folder.meta.get("preset_overrides") or {}
        if preset_overrides and dict(preset_overrides) != stored:
            raise InputError(f"{run_dir}: run was trained with preset overrides {stored}, "
                             f"resume asked for {dict(preset_overrides)}")
        folder.meta["epochs"] = epochs
        folder.meta.setdefault("trained_epochs", {})
        folder.save_meta()
    else:
        preset_params(preset, preset_overrides)
        folder = _new_run(train_file, run_dir, preset=preset, epochs=epochs,
                          n_models=n_models, seed=seed, val_fraction=val_fraction,
                          val_file=val_file, isolated_energies=isolated_energies,
                          log_mode=log_mode, weights=weights, threads=threads,
                          r_max=float(r_max), every_n_epochs=every_n_epochs,
                          preset_overrides=preset_overrides, overwrite=overwrite)
    store = TrajectoryStore.create(folder.store_path, folder.atom_table)
    params = preset_params(folder.meta["preset"], folder.meta.get("preset_overrides"))
    from mlipuq.backends.nequip.features import torch_threads

    with torch_threads(threads):
        trainer = _Member(folder, store, params, eval_batch_size=eval_batch_size,
                          progress=progress)
        for number, (model_id, member_seed) in enumerate(
                zip(folder.model_ids, folder.seeds, strict=True)):
            trainer.train(model_id, member_seed, number=number, epochs=epochs)
    return folder


def _new_run(train_file, run_dir: Path, *, preset, epochs, n_models, seed, val_fraction,
             val_file, isolated_energies, log_mode, weights, threads, r_max,
             every_n_epochs, preset_overrides, overwrite) -> RunFolder:

    train_file = Path(train_file)
    frames = read_training_set(train_file)
    elements = check_elements(frames, str(train_file))
    train_idx, val_idx, val_frames = split_or_read_val(
        frames, elements, val_fraction=val_fraction, seed=seed, val_file=val_file)
    train_frames = [frames[i] for i in train_idx]
    if isolated_energies is None:
        energies, source = fit_isolated_energies(train_frames, elements), "least_squares"
    else:
        energies = read_isolated_energies(isolated_energies, elements)
        source = ("mapping" if isinstance(isolated_energies, Mapping)
                  else Path(isolated_energies).name)
    meta = {
        **_versions(),
        "elements": elements,
        "preset": preset,
        "preset_overrides": dict(preset_overrides or {}),
        "r_max": r_max,
        "epochs": epochs,
        "n_models": n_models,
        **split_meta(train_file, val_file=val_file, val_fraction=val_fraction,
                     train_idx=train_idx, val_idx=val_idx, seed=seed, n_models=n_models),
        "isolated_energies": energies,
        "isolated_energies_source": source,
        "threads": threads,
        "log_mode": log_mode,
        "weights": "raw" if log_mode == "in_batch" else weights,
        "every_n_epochs": every_n_epochs,
        "trained_epochs": {},
    }
    return create_run(run_dir, train_frames, val_frames, backend="mace", meta=meta,
                      overwrite=overwrite)


# ---------------------------------------------------------------------- one member
class _Member:
    """Trains the members of one run folder (shared graphs and statistics)."""

    def __init__(self, folder: RunFolder, store: Any, params: dict, *,
                 eval_batch_size: int, progress: bool) -> None:
        from mlipuq.backends.mace.model import atomic_data, torch_dtype
        from mlipuq.io import read_structures

        self.folder, self.store, self.params = folder, store, params
        self.eval_batch_size, self.progress = eval_batch_size, progress
        from ase.data import atomic_numbers

        self.numbers = [int(atomic_numbers[el]) for el in folder.elements]
        self.dtype = torch_dtype(params["dtype"])
        self.r_max = float(folder.meta["r_max"])
        frames = folder.train_frames()
        self.train_graphs = atomic_data(frames, self.numbers, self.r_max, self.dtype)
        self.sizes = np.array([len(a) for a in frames], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        folder.atom_table.check_length(int(self.offsets[-1]), "training frames")
        val_frames = (read_structures(folder.val_path, require_forces=True)
                      if folder.val_path.is_file() else [])
        self.val = atomic_data(val_frames, self.numbers, self.r_max, self.dtype)
        self._hyper: dict | None = None

    # ------------------------------------------------------------------ set-up
    def hyper(self, seed: int) -> dict:
        """Hyper-parameters of a member (statistics of the training set, computed once)."""
        if self._hyper is None:
            from mlipuq.backends.mace.model import collate, import_mace

            mace = import_mace()
            e0s = np.array([self.folder.isolated_energies[el] for el in self.folder.elements])
            graphs = self.train_graphs
            batches = [collate(graphs[i:i + 16]) for i in range(0, len(graphs), 16)]
            with mace.torch_tools.default_dtype(self.dtype):
                neighbours = mace.modules.compute_avg_num_neighbors(batches)
                mean, rms = mace.modules.scaling_classes["rms_forces_scaling"](batches, e0s)
            keys = ("num_interactions", "num_channels", "max_L", "max_ell", "correlation",
                    "num_bessel", "num_polynomial_cutoff", "radial_mlp", "mlp_irreps",
                    "dtype")
            self._hyper = {
                **{key: self.params[key] for key in keys},
                "r_max": self.r_max,
                "elements": list(self.folder.elements),
                "atomic_numbers": self.numbers,
                "atomic_energies": [float(e) for e in e0s],
                "avg_num_neighbors": float(neighbours),
                "atomic_inter_scale": float(np.asarray(rms).reshape(-1)[0]),
                "atomic_inter_shift": float(np.asarray(mean).reshape(-1)[0]),
            }
        return {**self._hyper, "seed": int(seed)}

    # ------------------------------------------------------------------ training
    def train(self, model_id: str, seed: int, *, number: int, epochs: int) -> None:
        import torch
        from torch_ema import ExponentialMovingAverage

        from mlipuq.backends.mace.model import build_model, import_mace, read_weights

        folder = self.folder
        done = (folder.meta.get("trained_epochs") or {}).get(model_id)
        final = weights_path(folder, model_id)
        if done is not None and int(done) >= epochs and final.is_file():
            if self.progress:
                print(f"{PROGRESS_PREFIX} {model_id}: already trained ({done} epochs)",
                      file=sys.stderr)
            return
        checkpoint = checkpoint_path(folder, model_id)
        json_path = final.with_suffix(".json")
        try:
            state = read_weights(checkpoint) if checkpoint.is_file() else None
        except InputError as error:
            raise InputError(f"{error}; {model_id} cannot continue from it: delete "
                             f"{checkpoint.parent} and run --resume again to train it from "
                             "scratch, or start again with --overwrite") from None
        if state is None:
            shutil.rmtree(folder.model_dir(model_id), ignore_errors=True)
            hyper = self.hyper(seed)
            from mlipuq.io import write_json

            from .model import MODEL_FORMAT, MODEL_FORMAT_VERSION
            write_json(json_path, {"format": MODEL_FORMAT,
                                   "format_version": MODEL_FORMAT_VERSION, **hyper})
        else:
            from mlipuq.io import read_json

            hyper = read_json(json_path)
        folder.model_dir(model_id).mkdir(parents=True, exist_ok=True)
        if (folder.meta.get("trained_epochs") or {}).pop(model_id, None) is not None:
            folder.save_meta()
        final.unlink(missing_ok=True)  # stale once training goes on

        params = self.params
        model = build_model(hyper)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(params["lr"]), amsgrad=True)
        ema = ExponentialMovingAverage(model.parameters(), decay=float(params["ema_decay"]))
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
            start = int(state["epoch"]) + 1
        with import_mace_env():
            loss_fn = import_mace().modules.WeightedEnergyForcesLoss(
                energy_weight=float(params["energy_weight"]),
                forces_weight=float(params["force_weight"]))
        writer = self._writer(model_id, seed, start)
        rows = self._read_rows(model_id, start)
        if self.progress:
            print(f"{PROGRESS_PREFIX} training {model_id} ({number + 1}/"
                  f"{len(folder.model_ids)}, seed {seed}, epochs {start}..{epochs - 1}, "
                  f"{torch.get_num_threads()} thread(s))", file=sys.stderr, flush=True)
        began = time.perf_counter()
        for epoch in range(start, epochs):
            tick = time.perf_counter()
            errors, energy, loss = self._epoch(model, optimizer, ema, loss_fn, seed, epoch)
            logs = (epoch + 1) % int(folder.meta.get("every_n_epochs", 1)) == 0
            if logs and folder.meta["log_mode"] == "epoch_end":
                if folder.meta.get("weights") == "raw":
                    errors, energy = self.errors(model, self.train_graphs)
                else:
                    with ema.average_parameters():
                        errors, energy = self.errors(model, self.train_graphs)
            logged = time.perf_counter()
            if logs:
                writer.append(errors, epoch=epoch, energy_errors=energy)
            with ema.average_parameters():
                val = self.errors(model, self.val) if self.val else None
            row = {"epoch": epoch, "loss": loss, "train_force_mae": float(np.mean(errors)),
                   "train_energy_mae_per_atom": float(np.mean(energy / self.sizes)),
                   "val_force_mae": np.nan if val is None else float(np.mean(val[0])),
                   "val_energy_mae_per_atom": np.nan if val is None else float(
                       np.mean(val[1] / np.array([g.num_nodes for g in self.val]))),
                   "lr": float(params["lr"]), "epoch_seconds": logged - tick}
            rows.append(row)
            self._save_checkpoint(checkpoint, model, optimizer, ema, epoch)
            self._write_rows(model_id, rows)
            if self.progress:
                print(f"{PROGRESS_PREFIX} {model_id} epoch {epoch + 1}/{epochs} "
                      f"loss={loss:.4g} train_f_mae={row['train_force_mae']:.4g} "
                      f"val_f_mae={row['val_force_mae']:.4g} "
                      f"{time.perf_counter() - tick:.2f} s", file=sys.stderr, flush=True)
        with ema.average_parameters():
            from .model import save_model

            save_model(model, hyper, final.with_suffix(""))
        folder.meta.setdefault("trained_epochs", {})[model_id] = max(int(epochs), start)
        folder.save_meta()
        if self.progress:
            print(f"{PROGRESS_PREFIX} {model_id} done in {time.perf_counter() - began:.1f} s",
                  file=sys.stderr, flush=True)

    def _epoch(self, model, optimizer, ema, loss_fn, seed: int, epoch: int):
        """One epoch of MACE steps; returns the in-batch errors, energy errors, mean loss."""
        import torch

        from .model import collate, forward

        batch_size = int(self.params["batch_size"])
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(self.train_graphs))
        errors = np.full(int(self.offsets[-1]), np.nan)
        energy = np.full(len(self.train_graphs), np.nan)
        losses = []
        max_norm = self.params.get("max_grad_norm")
        for begin in range(0, len(order), batch_size):
            frames = order[begin:begin + batch_size]
            batch = collate([self.train_graphs[i] for i in frames])
            optimizer.zero_grad(set_to_none=True)
            out = forward(model, batch, training=True)
            loss = loss_fn(pred=out, ref=batch)
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(max_norm))
            optimizer.step()
            ema.update()
            if not torch.isfinite(loss):
                raise TrainingError(f"MACE training: loss is {loss.item()} at epoch {epoch} "
                                    "(lower the learning rate: preset override 'lr')")
            losses.append(float(loss.detach()))
            self._scatter(errors, energy, frames, batch, out)
        return errors, energy, float(np.mean(losses))

    def _scatter(self, errors, energy, frames, batch, out) -> None:
        """Put a batch's per-atom force-error norms and energy errors at their frames."""
        import torch

        norms = torch.linalg.norm(out["forces"].detach() - batch.forces, dim=1)
        norms = norms.double().cpu().numpy()
        de = (out["energy"].detach() - batch.energy).abs().double().cpu().numpy()
        ptr = batch.ptr.cpu().numpy()
        for k, frame in enumerate(frames):
            errors[self.offsets[frame]:self.offsets[frame + 1]] = norms[ptr[k]:ptr[k + 1]]
            energy[frame] = de[k]

    def errors(self, model, graphs) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom force-error norms (eV/Å) and per-frame |energy error| (eV) of
        ``graphs`` with the model's current weights."""
        from .model import collate, forward

        force, energy = [], []
        for begin in range(0, len(graphs), self.eval_batch_size):
            batch = collate(graphs[begin:begin + self.eval_batch_size])
            out = forward(model, batch)
            force.append((out["forces"].detach() - batch.forces).norm(dim=1)
                         .double().cpu().numpy())
            energy.append((out["energy"].detach() - batch.energy).abs().double().cpu().numpy())
        return np.concatenate(force), np.concatenate(energy)

    # ------------------------------------------------------------------ files
    def _writer(self, model_id: str, seed: int, start: int):
        """The store's writer for ``model_id`` with logged epochs >= ``start`` removed."""
        store = self.store
        if model_id in store.model_ids():
            stale = [int(e) for e in store.epochs(model_id) if e >= start]
            for epoch in stale:  # the epoch file first: it marks the epoch as logged
                store.epoch_path(model_id, epoch).unlink(missing_ok=True)
                store.energy_path(model_id, epoch).unlink(missing_ok=True)
        info = {"backend": "mace", "mode": self.folder.meta["log_mode"],
                "weights": self.folder.meta.get("weights")}
        return store.writer(model_id, seed=seed, info=info)

    @staticmethod
    def _save_checkpoint(path: Path, model, optimizer, ema, epoch: int) -> None:
        import torch

        state = {"epoch": int(epoch), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    def _read_rows(self, model_id: str, start: int) -> list[dict]:
        path = self.folder.metrics_path(model_id)
        if start == 0 or not path.is_file():
            return []
        with open(path, newline="") as handle:
            return [row for row in csv.DictReader(handle) if int(row["epoch"]) < start]

    def _write_rows(self, model_id: str, rows: list[dict]) -> None:
        path = self.folder.metrics_path(model_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[-1]))
                writer.writeheader()
                writer.writerows(rows)


def import_mace_env():
    """Context keeping the process environment while mace objects are created."""
    from .model import _keep_environment

    return _keep_environment()
