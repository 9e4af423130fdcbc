"""Train an ensemble of NequIP models with error-trajectory logging (``mlipuq train``).

Each member is one ``nequip-train`` subprocess (``nequip-train -cp <configs> -cn
model_i hydra.run.dir=<models/model_i>``), run sequentially with seeds
``seed, seed + 1, ...`` and ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` set to
``threads``. All members share one train/validation split (drawn with ``seed``), so
they share the atom table and the trajectory store.

Reading, checking and splitting the training frames and the isolated-atom energies
(NequIP's ``per_type_energy_shifts``) are not NequIP-specific: they live in
:mod:`mlipuq.training_data` (still importable from here).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mlipuq.exceptions import InputError, MlipuqError
from mlipuq.io import atomic_directory, atomic_path, clean_stale_temporaries
from mlipuq.run_folder import RunFolder
from mlipuq.training_data import (  # noqa: F401 -- also re-exported for existing imports
    check_elements,
    create_run,
    fit_isolated_energies,
    read_isolated_energies,
    read_training_set,
    split_meta,
    split_or_read_val,
    split_train_val,
    write_frames,
)

from . import config as cfg

LOG_MODES = ("epoch_end", "in_batch")
PROGRESS_PREFIX = "[mlipuq]"


class TrainingError(MlipuqError):
    """A ``nequip-train`` or ``nequip-package`` subprocess failed."""


# ---------------------------------------------------------------------- data
# Generic data preparation lives in mlipuq.training_data; these names stay importable
# from here for existing scripts.
def _sha256(path: Path) -> str:
    from mlipuq.provenance import file_sha256

    return file_sha256(path)


# ---------------------------------------------------------------------- subprocesses
def _subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent():
    """A ``preexec_fn`` making the child get SIGKILL when this process dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so a killed ``mlipuq train`` leaves no
    ``nequip-train`` writing into the run folder; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # looked up before fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return set_death_signal


def _executable(name: str) -> str:
    """``name`` next to the running Python (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise TrainingError(f"{name}: not found (install mlipuq[nequip])")
    return found


def run_nequip_train(
    config_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    threads: int = 1,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> None:
    """Run ``nequip-train`` on one config, writing into ``output_dir``.

    Lines printed by :class:`~.callback.EpochProgressCallback` go to stderr when
    ``progress``; the full output is kept in ``output_dir/train.log``.

    Raises
    ------
    TrainingError
        Non-zero exit status (the message names the log file and its last line).
    """
    config_path = Path(config_path).resolve()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        _executable("nequip-train"),
        "-cp", str(config_path.parent),
        "-cn", config_path.stem,
        f"hydra.run.dir={output_dir}",
        *overrides,
    ]
    log_path = output_dir / "train.log"
    tail: list[str] = []
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=output_dir,
            env=_subprocess_env(threads),
            preexec_fn=_die_with_parent(),
        )
        for line in process.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-20:]
            if progress and line.startswith(PROGRESS_PREFIX):
                print(line.rstrip(), file=sys.stderr, flush=True)
        status = process.wait()
    if status != 0:
        reason = next((line for line in reversed(tail) if line.strip()), "no output")
        raise TrainingError(
            f"nequip-train failed for {config_path.name} (exit {status}; log {log_path}): "
            f"{reason[:300]}"
        )


def package_model(checkpoint: Path, target: Path, *, threads: int = 1) -> Path:
    """``nequip-package build checkpoint target`` (EMA weights when the run kept EMA).

    Built in a temporary file beside ``target`` and renamed onto it: a kill leaves no
    half-written package."""
    with atomic_path(target, suffix=".nequip.zip") as tmp:
        command = [_executable("nequip-package"), "build", str(checkpoint), str(tmp)]
        result = subprocess.run(
            command, capture_output=True, text=True, env=_subprocess_env(threads),
            check=False, preexec_fn=_die_with_parent(),
        )
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            raise TrainingError(f"nequip-package failed for {checkpoint}: {lines[-1][:300]}")
    return target


def checkpoint_epoch(path: Path) -> int:
    """Lightning ``epoch`` recorded in a checkpoint (0-based; last completed epoch).

    Read with ``weights_only=True`` (:func:`~mlipuq.backends.nequip.features.read_checkpoint`):
    a foreign or truncated file is an InputError, never unpickled.
    """
    from mlipuq.backends.nequip.features import read_checkpoint

    checkpoint = read_checkpoint(path)
    if "epoch" not in checkpoint:
        raise InputError(f"{path}: not a training checkpoint (no 'epoch')")
    return int(checkpoint["epoch"])


def flatten_metrics(csv_dir: Path, target: Path) -> Path | None:
    """One row per epoch from Lightning CSVLogger files ``csv_dir/version_*/metrics.csv``.

    Later versions (resumed runs) override earlier values of the same epoch; for each
    column the last non-empty value within an epoch is kept.
    """
    files = sorted(
        csv_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    if not files:
        return None
    rows: dict[int, dict[str, str]] = {}
    columns: list[str] = ["epoch"]
    for path in files:
        with open(path, newline="") as handle:
            for record in csv.DictReader(handle):
                try:
                    epoch = int(float(record.get("epoch") or ""))
                except ValueError:  # no epoch, or a line cut short by a kill
                    continue
                row = rows.setdefault(epoch, {"epoch": str(epoch)})
                for key, value in record.items():
                    if key in ("epoch", "step") or value in ("", None):
                        continue
                    if key not in columns:
                        columns.append(key)
                    row[key] = value
    with atomic_path(target, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            for epoch in sorted(rows):
                writer.writerow(rows[epoch])
    return target


# ---------------------------------------------------------------------- ensemble
def _versions(architecture: str = "nequip") -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from mlipuq import __version__

    out = {"mlipuq_version": __version__}
    packages = ("nequip", "torch") + (("nequip-allegro",) if architecture == "allegro" else ())
    for package in packages:
        try:
            out[f"{package.replace('-', '_')}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package.replace('-', '_')}_version"] = "absent"
    return out


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _member_config(
    folder: RunFolder,
    model_id: str,
    seed: int,
    *,
    epochs: int,
    preset: str | None,
    user_config: dict | None,
    user_config_name: str | None,
    r_max: float,
    preset_overrides: Mapping | None,
    log_mode: str,
    weights: str,
    eval_batch_size: int,
    threads: int,
    every_n_epochs: int,
) -> dict:
    if user_config is not None:
        config = cfg.user_config(
            user_config,
            train_file=folder.train_path,
            val_file=folder.val_path,
            epochs=epochs,
            seed=seed,
            source=user_config_name or "config",
        )
        _ensure_logger_and_last_checkpoint(config)
        _check_architecture(config, folder.backend, user_config_name or "config")
    else:
        config = cfg.preset_config(
            preset,
            elements=folder.elements,
            train_file=folder.train_path,
            val_file=folder.val_path,
            isolated_energies=folder.isolated_energies,
            epochs=epochs,
            seed=seed,
            r_max=r_max,
            overrides=preset_overrides,
            architecture=folder.backend,  # "nequip" or "allegro" (run.json["backend"])
        )
    callbacks = [
        cfg.error_callback_spec(
            store_path=folder.store_path,
            model_id=model_id,
            mode=log_mode,
            weights=weights,
            batch_size=eval_batch_size,
            seed=seed,
            every_n_epochs=every_n_epochs,
            threads=threads,
        ),
        cfg.progress_callback_spec(label=f"{PROGRESS_PREFIX} {model_id}"),
    ]
    config = cfg.add_callbacks(config, callbacks)
    if folder.meta.get("reweight"):  # mlipuq train --reweight: per-atom weighted force loss
        from .weighted_loss import add_weighted_force_loss

        config = add_weighted_force_loss(config)
    return config


def _check_architecture(config: dict, backend: str, source: str) -> None:
    """An Allegro model in a user config needs an ``allegro`` run and vice versa (the
    per-atom features are taken differently)."""
    model = config.get("training_module", {}).get("model", {})
    target = str(model.get("_target_", "")) if isinstance(model, dict) else ""
    allegro = target.split(".")[0] == "allegro"
    if allegro != (backend == "allegro") and target:
        wanted = "allegro" if allegro else "nequip"
        raise InputError(f"{source}: model {target} needs --backend {wanted} "
                         f"(got --backend {backend})")


def _ensure_logger_and_last_checkpoint(config: dict) -> None:
    trainer = config["trainer"]
    if not trainer.get("logger"):
        trainer["logger"] = {
            "_target_": "lightning.pytorch.loggers.CSVLogger",
            "save_dir": "${hydra:runtime.output_dir}",
            "name": "csv",
            "version": 0,
        }
    callbacks = list(trainer.get("callbacks") or [])
    has_last = any(
        isinstance(spec, dict)
        and "ModelCheckpoint" in str(spec.get("_target_", ""))
        and spec.get("save_last")
        for spec in callbacks
    )
    if not has_last:
        callbacks.append(
            {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "dirpath": "${hydra:runtime.output_dir}",
                "filename": "latest",
                "save_top_k": 1,
                "save_last": True,
            }
        )
    trainer["callbacks"] = callbacks


def train_ensemble(
    train_file: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    preset: str = "small",
    config: str | os.PathLike | None = None,
    epochs: int = 100,
    n_models: int = 1,
    seed: int = 0,
    val_fraction: float = 0.1,
    val_file: str | os.PathLike | None = None,
    isolated_energies: str | os.PathLike | Mapping[str, float] | None = None,
    log_mode: str = "epoch_end",
    weights: str = "ema",
    every_n_epochs: int = 1,
    eval_batch_size: int = 16,
    threads: int = 1,
    processes: int | None = None,
    r_max: float = 5.0,
    preset_overrides: Mapping | None = None,
    package: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    architecture: str | None = None,
) -> RunFolder:
    """Train ``n_models`` NequIP models and leave a run folder with their error trajectories.

    Parameters
    ----------
    train_file : path-like
        extxyz with energies (eV) and forces (eV/Å) on every frame.
    run_dir : path-like
        Run folder to create (see :mod:`mlipuq.run_folder`).
    preset : {"tiny", "small", "paper"}
        Model size (see :mod:`~mlipuq.backends.nequip.config`); ignored with ``config``.
    config : path-like, optional
        A user's NequIP YAML used instead of a preset (its data files, seeds, run list
        and max_epochs are replaced; our callbacks appended).
    epochs : int
        Training epochs per member (``trainer.max_epochs``).
    n_models : int
        Ensemble size M; member ``i`` is ``model_i`` with seed ``seed + i``.
    seed : int
        First seed; also seeds the train/validation split.
    val_fraction : float
        Fraction of frames held out for validation (shared by all members); not
        used with ``val_file``.
    val_file : path-like, optional
        A fixed validation set (extxyz with energies and forces, elements of the
        training set): every frame of ``train_file`` is then trained on. For
        comparing training sets (active learning rounds) on one validation set.
    isolated_energies : path-like or mapping, optional
        Isolated-atom energies (file of single-atom frames, or element -> eV); if
        absent, fitted by least squares on the training frames.
    log_mode : {"epoch_end", "in_batch"}
        Error-trajectory mode of :class:`~.callback.ErrorTrajectoryCallback`.
    weights : {"ema", "raw"}
        Weights of the ``epoch_end`` pass.
    every_n_epochs, eval_batch_size : int
        Logging period and evaluation batch size of the callback.
    threads : int
        Threads of each training process (``OMP_NUM_THREADS`` and torch); with
        ``processes`` N > 1, ``max(threads // N, 1)`` per process.
    processes : int, optional
        Train each member on N CPU processes (Lightning DDP over gloo,
        :func:`~.config.set_processes`): each rank trains on its shard of the training
        set, so the effective batch is N times the loader's ``batch_size``; the error
        trajectories are gathered to rank 0 (:mod:`~.callback`). None: one process for
        a new member, the recorded setting of a resumed one.
    r_max : float
        Cutoff in Å (presets only).
    preset_overrides : mapping, optional
        Preset fields to change, e.g. ``{"lr": 0.0}`` or ``{"energy_weight": 0.1}``
        (keys of :data:`~mlipuq.backends.nequip.config.PRESETS` entries; presets only).
    package : bool
        Build ``models/model_i.nequip.zip`` from ``best.ckpt`` (~10 s per model).
    overwrite : bool
        Replace an existing run folder.
    resume : bool
        Continue an existing run folder: members with a ``last.ckpt`` continue from it
        up to ``epochs``; finished members are skipped; others train from scratch.
    progress : bool
        Print one line per epoch to stderr.
    architecture : {"nequip", "allegro"}, optional
        Model of the presets (:data:`~mlipuq.backends.nequip.config.ARCHITECTURES`),
        also the run's backend (``run.json["backend"]``). Default ``"nequip"``; on
        resume, the run's own.

    Returns
    -------
    RunFolder
    """
    from mlipuq.trajectory_store import TrajectoryStore

    epochs = _check_positive_int(epochs, "epochs")
    n_models = _check_positive_int(n_models, "n_models")
    threads = _check_positive_int(threads, "threads")
    if processes is not None:
        processes = _check_positive_int(processes, "processes")
    every_n_epochs = _check_positive_int(every_n_epochs, "every_n_epochs")
    eval_batch_size = _check_positive_int(eval_batch_size, "eval_batch_size")
    if log_mode not in LOG_MODES:
        raise InputError(f"log_mode: expected one of {LOG_MODES}, got {log_mode!r}")
    if weights not in ("ema", "raw"):
        raise InputError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    user_config = None
    if config is not None:
        if preset_overrides:
            raise InputError(
                f"preset_overrides: {sorted(preset_overrides)} apply to presets only; set "
                f"them in {config}"
            )
        user_config = cfg.check_nequip_config(cfg.load_yaml(config), str(config))
    else:
        cfg.preset_params(preset, preset_overrides, architecture or "nequip")
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not (
            np.isfinite(r_max) and r_max > 0):
        raise InputError(f"r_max: expected a positive cutoff in Å, got {r_max!r}")
    run_dir = Path(run_dir)
    clean_stale_temporaries(run_dir)  # of a run folder creation that was killed

    if resume and (run_dir / "run.json").is_file():
        folder = RunFolder.open(run_dir, unfinished=True)
        _check_complete(folder)
        if folder.meta.get("n_models") != n_models:
            raise InputError(
                f"{run_dir}: run has n_models={folder.meta.get('n_models')}, resume asked for "
                f"{n_models}"
            )
        if architecture is not None and architecture != folder.backend:
            raise InputError(
                f"{run_dir}: run has backend {folder.backend!r}, resume asked for "
                f"{architecture!r}"
            )
        _check_resumed_val_file(folder, val_file)
        _check_resumed_train_file(folder, train_file)
        stored = folder.meta.get("preset_overrides") or {}
        if preset_overrides and dict(preset_overrides) != stored:
            raise InputError(
                f"{run_dir}: run was trained with preset overrides {stored}, resume asked "
                f"for {dict(preset_overrides)}"
            )
        folder.meta["epochs"] = epochs
        folder.meta.setdefault("trained_epochs", {})
        folder.save_meta()
    else:
        folder = _new_run(
            train_file, run_dir, preset=None if config is not None else preset,
            config=config, epochs=epochs, n_models=n_models, seed=seed,
            val_fraction=val_fraction, val_file=val_file,
            isolated_energies=isolated_energies, log_mode=log_mode, weights=weights,
            threads=threads, overwrite=overwrite, r_max=r_max,
            preset_overrides=preset_overrides, architecture=architecture or "nequip",
        )
    TrajectoryStore.create(folder.store_path, folder.atom_table)
    members = zip(folder.model_ids, folder.seeds, strict=True)
    for number, (model_id, member_seed) in enumerate(members):
        _train_member(
            folder, model_id, member_seed, number=number, epochs=epochs,
            preset=folder.meta.get("preset"), user_config=user_config,
            user_config_name=str(config) if config is not None else None,
            r_max=folder.meta.get("r_max", r_max),
            preset_overrides=folder.meta.get("preset_overrides") or preset_overrides,
            log_mode=folder.meta["log_mode"], weights=folder.meta.get("weights", weights),
            eval_batch_size=eval_batch_size, threads=threads,
            every_n_epochs=every_n_epochs, package=package, progress=progress,
            processes=processes,
        )
    return folder


def _check_complete(folder: RunFolder) -> None:
    """InputError if the files ``create_run`` writes are missing (a folder whose
    creation an older mlipuq did not finish): it cannot be resumed, only restarted."""
    missing = [name for name in ("train.extxyz", "atom_table.npz")
               if not (folder.path / name).is_file()]
    if missing:
        raise InputError(
            f"{folder.path}: run folder is incomplete ({', '.join(missing)} missing: its "
            "creation was interrupted); nothing was trained, start it again with --overwrite"
        )


def _check_resumed_train_file(folder: RunFolder, train_file) -> None:
    """InputError if ``train_file`` on resume is not the file the run was created from."""
    recorded = folder.meta.get("train_sha256")
    if recorded is None or train_file is None:
        return
    path = Path(train_file)
    if not path.is_file():
        raise InputError(f"{path}: training file not found")
    if _sha256(path) != recorded:
        raise InputError(
            f"{folder.path}: run was trained on {folder.meta.get('train_file')} (another "
            f"content), resume given {path}; resume with the same file or train a new run"
        )


def _check_resumed_val_file(folder: RunFolder, val_file) -> None:
    """InputError if ``val_file`` is given on resume and is not the run's validation set."""
    if val_file is None:
        return
    if not Path(val_file).is_file():
        raise InputError(f"{val_file}: validation file not found")
    if folder.meta.get("val_sha256") != _sha256(Path(val_file)):
        raise InputError(
            f"{folder.path}: run was validated on "
            f"{folder.meta.get('val_file') or 'a split of its training file'}, resume asked "
            f"for {val_file}"
        )


def _new_run(
    train_file, run_dir: Path, *, preset, config, epochs, n_models, seed, val_fraction,
    val_file, isolated_energies, log_mode, weights, threads, overwrite, r_max,
    preset_overrides, architecture="nequip",
) -> RunFolder:
    train_file = Path(train_file)
    frames = read_training_set(train_file)
    elements = check_elements(frames, str(train_file))
    train_idx, val_idx, val_frames = split_or_read_val(
        frames, elements, val_fraction=val_fraction, seed=seed, val_file=val_file
    )
    train_frames = [frames[i] for i in train_idx]
    if isolated_energies is None:
        energies = fit_isolated_energies(train_frames, elements)
        source = "least_squares"
    else:
        energies = read_isolated_energies(isolated_energies, elements)
        source = "mapping" if isinstance(isolated_energies, Mapping) else Path(
            isolated_energies
        ).name
    meta = {
        **_versions(architecture),
        "elements": elements,
        "preset": preset,
        "user_config": None if config is None else str(Path(config).resolve()),
        "preset_overrides": dict(preset_overrides or {}),
        "r_max": float(r_max),
        "epochs": epochs,
        "n_models": n_models,
        **split_meta(train_file, val_file=val_file, val_fraction=val_fraction,
                     train_idx=train_idx, val_idx=val_idx, seed=seed, n_models=n_models),
        "isolated_energies": energies,
        "isolated_energies_source": source,
        "threads": threads,
        "log_mode": log_mode,
        "weights": "raw" if log_mode == "in_batch" else weights,
        "trained_epochs": {},
    }
    return create_run(run_dir, train_frames, val_frames, backend=architecture, meta=meta,
                      overwrite=overwrite)


def _train_member(
    folder: RunFolder, model_id: str, member_seed: int, *, number: int, epochs: int,
    preset, user_config, user_config_name, r_max, preset_overrides, log_mode, weights,
    eval_batch_size, threads, every_n_epochs, package, progress, processes=None,
) -> None:
    output_dir = folder.model_dir(model_id)
    last = folder.checkpoint_path(model_id, "last")
    overrides: list[str] = []
    csv_dir = output_dir / "csv"
    finished = (folder.meta.get("trained_epochs") or {}).get(model_id)
    if last.is_file():
        done = int(finished) if finished is not None else _resumable_epochs(last, model_id)
        if done >= epochs:
            if progress:
                print(f"{PROGRESS_PREFIX} {model_id}: already trained ({done} epochs)",
                      file=sys.stderr)
            _finish_member(folder, model_id, done, package=package, threads=threads)
            return
        _resumable_epochs(last, model_id)  # readable, else one line on what to do
        versions = len(list(csv_dir.glob("version_*")))
        overrides = [f"++ckpt_path={last.resolve()}", f"trainer.logger.version={versions}"]
    elif output_dir.exists():
        shutil.rmtree(output_dir)
    recorded = folder.config_path(model_id)
    if recorded.is_file():
        # resumed run: keep the recorded config, only the epoch count changes
        member = cfg.check_nequip_config(cfg.load_yaml(recorded), str(recorded))
        member["trainer"]["max_epochs"] = epochs
    else:
        member = _member_config(
            folder, model_id, member_seed, epochs=epochs, preset=preset,
            user_config=user_config, user_config_name=user_config_name, r_max=r_max,
            preset_overrides=preset_overrides, log_mode=log_mode, weights=weights,
            eval_batch_size=eval_batch_size, threads=threads, every_n_epochs=every_n_epochs,
        )
    if processes is not None:
        cfg.set_processes(member, processes)
    ranks = cfg.config_processes(member)
    rank_threads = max(threads // ranks, 1)  # per process: the DDP ranks share the threads
    for spec in member["trainer"].get("callbacks") or []:
        if isinstance(spec, dict) and spec.get("_target_") == cfg.CALLBACK_TARGET:
            spec["threads"] = rank_threads
    config_path = cfg.write_yaml(folder.config_path(model_id), member)
    if (folder.meta.get("trained_epochs") or {}).pop(model_id, None) is not None:
        folder.save_meta()  # no longer a finished member until this training ends
    folder.packaged_path(model_id).unlink(missing_ok=True)  # stale after more training
    if progress:
        print(
            f"{PROGRESS_PREFIX} training {model_id} ({number + 1}/{len(folder.model_ids)}, "
            f"seed {member_seed}, {epochs} epochs, "
            f"{'' if ranks == 1 else f'{ranks} processes x '}{rank_threads} thread(s))",
            file=sys.stderr, flush=True,
        )
    start = time.perf_counter()
    run_nequip_train(
        config_path, output_dir, threads=rank_threads, overrides=overrides, progress=progress
    )
    done = checkpoint_epoch(last) + 1 if last.is_file() else 0
    if done < epochs:  # e.g. SIGTERM: Lightning stops gracefully and exits with status 0
        raise TrainingError(
            f"nequip-train stopped {model_id} after {done} of {epochs} epochs (log "
            f"{output_dir / 'train.log'}); continue with --resume"
        )
    if progress:
        print(f"{PROGRESS_PREFIX} {model_id} done in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    _finish_member(folder, model_id, done, package=package, threads=threads)


def _resumable_epochs(last: Path, model_id: str) -> int:
    """Epochs done according to ``last.ckpt``; a truncated or corrupt one (a kill while
    it was written) is an InputError that says how to go on."""
    try:
        return checkpoint_epoch(last) + 1
    except InputError as error:
        raise InputError(
            f"{error}; {model_id} cannot continue from it: delete {last.parent} and run "
            f"--resume again to train {model_id} from scratch, or start again with --overwrite"
        ) from None


def _finish_member(folder: RunFolder, model_id: str, done: int, *, package: bool,
                   threads: int) -> None:
    """Metrics, package, then ``run.json["trained_epochs"]``: the member is usable."""
    flatten_metrics(folder.model_dir(model_id) / "csv", folder.metrics_path(model_id))
    if package:
        best = folder.checkpoint_path(model_id, "best")
        source = best if best.is_file() else folder.checkpoint_path(model_id, "last")
        target = folder.packaged_path(model_id)
        if not target.is_file():
            package_model(source, target, threads=threads)
    folder.meta.setdefault("trained_epochs", {})[model_id] = int(done)
    folder.save_meta()


# ---------------------------------------------------------------------- re-weighting
def train_reweighted(
    source_run: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    scheme: str,
    lam: float | None = None,
    epochs: int | None = None,
    n_models: int | None = None,
    seed: int | None = None,
    threads: int = 1,
    every_n_epochs: int = 1,
    eval_batch_size: int = 16,
    package: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> RunFolder:
    """Retrain on a run's training set with LTAU per-atom loss weights (docs/methods.md).

    From the source run's error trajectories (all models, all logged epochs) at the
    source's default tolerance (:func:`mlipuq.confidence.default_atol`, its final
    training force MAE in eV/Å), ``mu_M(p_i)`` and ``sigma_M(p_i)`` give the weights
    of :func:`mlipuq.reweighting.loss_weights` (unnormalised paper formula). The new
    run reuses the source's training and validation frames, split, elements,
    isolated energies, preset (or user config), cutoff and logging mode; its
    ``train.extxyz`` has the weights as a ``per_atom_weight`` column and every member
    trains with :class:`~.weighted_loss.WeightedForceMSE` in place of the force MSE.
    ``run.json["reweight"]`` records scheme, lambda, atol, source and weight range.

    Parameters
    ----------
    source_run : path-like
        A run folder written by ``mlipuq train`` (with trajectories).
    run_dir : path-like
        New run folder.
    scheme : {"easy", "hard"}
        ``"hard"``: ``exp(lam (1 - mu + sigma))``; ``"easy"``: ``exp(lam (mu + sigma))``.
    lam : float, optional
        lambda > 0; default 4.5 (hard) or 2.0 (easy).
    epochs, n_models, seed : int, optional
        Default: the source run's (``seed`` = its first seed).
    threads, every_n_epochs, eval_batch_size, package, overwrite, progress
        As in :func:`train_ensemble`.

    Returns
    -------
    RunFolder

    Raises
    ------
    InputError
        ``source_run`` is not a run folder or has no trajectories; bad scheme / lam.
    """
    from mlipuq.confidence import default_atol, ensemble_confidence
    from mlipuq.reweighting import DEFAULT_LAMBDA, loss_weights, write_weighted_extxyz

    if scheme not in DEFAULT_LAMBDA:
        raise InputError(f"reweight: expected 'easy' or 'hard', got {scheme!r}")
    lam = DEFAULT_LAMBDA[scheme] if lam is None else lam
    if isinstance(lam, bool) or not np.isscalar(lam) or not np.isfinite(lam) or lam <= 0:
        raise InputError(f"lam: expected a finite number > 0, got {lam!r}")
    source = RunFolder.open(source_run)
    if Path(run_dir).resolve() == source.path.resolve():
        raise InputError(f"{run_dir}: the new run folder must differ from --from {source_run}")
    source_meta = source.meta
    if not source.store_path.is_dir():
        raise InputError(f"{source.path}: run folder has no trajectories/ (train it first)")
    store = source.store
    atol = default_atol(store)
    mu, sigma, _ = ensemble_confidence(store, atol)
    weights = loss_weights(mu, sigma, scheme=scheme, lam=float(lam))
    frames = source.train_frames()
    n_models = int(source_meta["n_models"]) if n_models is None else n_models
    n_models = _check_positive_int(n_models, "n_models")
    epochs = _check_positive_int(
        int(source_meta["epochs"]) if epochs is None else epochs, "epochs"
    )
    seed = int(source_meta["seeds"][0]) if seed is None else int(seed)
    keep = (
        "elements", "preset", "user_config", "preset_overrides", "r_max", "val_fraction",
        "val_file", "val_sha256", "train_frames", "val_frames", "isolated_energies",
        "isolated_energies_source", "log_mode", "weights",
    )
    meta = {
        **_versions(source.backend),
        **{key: source_meta[key] for key in keep if key in source_meta},
        "epochs": epochs,
        "n_models": n_models,
        "seeds": [seed + i for i in range(n_models)],
        "model_ids": [f"model_{i}" for i in range(n_models)],
        "backend": source.backend,  # "nequip" or "allegro": the source's architecture
        "train_file": source.train_path.name,
        "threads": threads,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "reweight": {
            "scheme": scheme,
            "lam": float(lam),
            "normalize": False,
            "atol": atol,
            "source_run": str(source.path.resolve()),
            "source_train_sha256": source_meta.get("train_sha256"),
            "source_model_ids": store.model_ids(),
            "weight_min": float(weights.min()),
            "weight_max": float(weights.max()),
            "weight_mean": float(weights.mean()),
        },
    }
    meta["trained_epochs"] = {}
    run_dir = Path(run_dir)
    RunFolder.check_target(run_dir, overwrite=overwrite)
    with atomic_directory(run_dir) as tmp:  # a kill leaves no half-made run folder
        staged = RunFolder.create(tmp, meta)
        write_weighted_extxyz(frames, weights, staged.train_path)
        shutil.copyfile(source.val_path, staged.val_path)
        source.atom_table.save(staged.path / "atom_table.npz")
        staged.meta["train_sha256"] = _sha256(staged.train_path)
        staged.save_meta()
    folder = RunFolder(run_dir, staged.meta)
    config = source_meta.get("user_config")
    return train_ensemble(
        folder.train_path, folder.path, preset=source_meta.get("preset") or "small",
        config=config, epochs=epochs, n_models=n_models, threads=threads,
        every_n_epochs=every_n_epochs, eval_batch_size=eval_batch_size,
        package=package, resume=True, progress=progress,
    )
