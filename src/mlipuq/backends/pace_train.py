"""``mlipuq train --backend pace``: a pace run folder from your potentials or a linear fit.

Two ways to a run folder of the ``"pace"`` backend (:class:`~mlipuq.backends.pace.PaceBackend`):

* **bring your own** (``potentials=[a.yaml, b.yaml, ...]``, ``mlipuq train --backend pace
  --potential a.yaml --potential b.yaml train.extxyz --run RUN``): the pacemaker B-basis
  potentials are copied into ``RUN/models/model_i.yaml`` (their source path and SHA-256
  in ``run.json["potentials"]``); nothing is trained. There are no error trajectories,
  so LTAU is not available on such a run;
* **linear ACE fit** (no ``potentials``; the demo): :mod:`mlipuq.backends.pace_fit`,
  one CG iteration per epoch with the per-atom force errors of every epoch in
  ``RUN/trajectories`` (LTAU works), M members on bootstrap resamples.

In both cases the training file is split into ``train.extxyz`` (the active sets'
training set) and ``val.extxyz`` (calibration) as for every backend
(``val_fraction`` / ``val_file``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path, clean_stale_temporaries
from mlipuq.run_folder import RunFolder
from mlipuq.training_data import (
    check_elements,
    create_run,
    read_training_set,
    split_meta,
    split_or_read_val,
)

logger = logging.getLogger(__name__)

IGNORED_OPTIONS = ("config", "isolated_energies", "log_mode", "weights", "threads", "package",
                   "eval_batch_size")
"""``mlipuq train`` options that mean nothing for pace runs: accepted and not used
(``config`` and ``isolated_energies`` only as None)."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("python-ace", "ase", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover
            continue
    return {"versions": out}


def train_pace(
    train_file: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    potentials: Sequence[str | os.PathLike] | None = None,
    preset: str | None = "small",
    epochs: int = 100,
    n_models: int = 1,
    seed: int = 0,
    val_fraction: float = 0.1,
    val_file: str | os.PathLike | None = None,
    r_max: float = 5.0,
    preset_overrides: Mapping[str, float] | None = None,
    every_n_epochs: int = 1,
    ridge: float | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    **ignored: Any,
) -> RunFolder:
    """Create a pace run folder (see the module notes).

    Parameters
    ----------
    train_file : path-like
        extxyz with energies (eV) and forces (eV/Å) on every frame.
    run_dir : path-like
        Run folder to create.
    potentials : sequence of path-like, optional
        pacemaker B-basis ``.yaml`` files, one per member (bring your own); then
        ``preset``, ``epochs``, ``n_models``, ``r_max``, ``preset_overrides``,
        ``every_n_epochs`` and ``ridge`` are not used.
    preset : {"tiny", "small", "paper"}
        Basis size of the linear fit (:data:`~mlipuq.backends.pace_fit.BASIS_PRESETS`).
    epochs : int
        CG iterations of the linear fit (one logged epoch each).
    n_models : int
        Members of the linear fit (bootstrap resamples when > 1, seeds ``seed + i``).
    seed : int
        Seed of the split and of the bootstrap.
    val_fraction, val_file
        Validation split or fixed validation set (as for every backend).
    r_max : float
        Cutoff in Å of the linear fit's basis.
    preset_overrides : mapping, optional
        ``energy_weight`` / ``force_weight`` (``mlipuq train --energy-weight``): the
        force share ``kappa = force_weight / (energy_weight + force_weight)``
        (default 0.3).
    every_n_epochs : int
        Logging period of the error trajectories.
    ridge : float, optional
        Ridge strength relative to the mean diagonal of the normal matrix (default 1e-6).
    overwrite, resume : bool
        Replace an existing run folder; or continue one: members without
        ``trained_epochs`` are fitted again.
    progress : bool
        Log one line per member.
    **ignored
        The other ``mlipuq train`` options (:data:`IGNORED_OPTIONS`): accepted, not used.

    Returns
    -------
    RunFolder
    """
    if ignored.pop("processes", None) not in (None, 1):
        raise InputError("--processes: a pace fit runs in one process (give 1 or leave it out)")
    unknown = sorted(set(ignored) - set(IGNORED_OPTIONS))
    if unknown:
        raise InputError(f"pace training: unknown option(s) {unknown}")
    if ignored.get("config") is not None:
        raise InputError("--config: pace runs take a basis --preset or your own --potential "
                         "files, not a training config")
    if ignored.get("isolated_energies") is not None:
        raise InputError("--isolated: a pacemaker B-basis potential has no per-element energy "
                         "shift; pace runs fit the reference energies as they are")
    seed = int(seed)
    run_dir = Path(run_dir)
    clean_stale_temporaries(run_dir)
    if potentials:
        paths = _check_potentials(potentials)
        n_models = len(paths)
    else:
        paths = None
        epochs = _positive_int(epochs, "epochs")
        n_models = _positive_int(n_models, "n_models")
        every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
    if resume and (run_dir / "run.json").is_file():
        folder = RunFolder.open(run_dir, unfinished=True)
        if folder.backend != "pace" or len(folder.model_ids) != n_models:
            raise InputError(f"{run_dir}: --resume: the run has backend {folder.backend!r} and "
                             f"{len(folder.model_ids)} member(s), asked for pace with {n_models}")
    else:
        folder = _new_run(train_file, run_dir, paths=paths, preset=preset, epochs=epochs,
                          n_models=n_models, seed=seed, val_fraction=val_fraction,
                          val_file=val_file, r_max=r_max, overwrite=overwrite)
    if paths is not None:
        return _adopt_potentials(folder, paths)
    kappa = _kappa(preset_overrides)
    folder.meta.update({"kappa": kappa, "ridge": _ridge(ridge)})
    folder.save_meta()
    return _fit_members(folder, every_n_epochs=every_n_epochs, progress=progress)


def _check_potentials(potentials: Sequence[str | os.PathLike]) -> list[Path]:
    from mlipuq.backends.pace import PaceBackend

    paths = [Path(p) for p in ([potentials] if isinstance(potentials, (str, os.PathLike))
                               else potentials)]
    for path in paths:
        PaceBackend(path)  # InputError for a missing / unreadable / non-B-basis file
    return paths


def _kappa(overrides: Mapping[str, float] | None) -> float:
    from mlipuq.backends.pace_fit import DEFAULT_KAPPA

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {"energy_weight", "force_weight"})
    if unknown:
        raise InputError(f"preset_overrides: pace fits take energy_weight and force_weight, "
                         f"got {unknown}")
    if not overrides:
        return DEFAULT_KAPPA
    energy = float(overrides.get("energy_weight", 1.0))
    force = float(overrides.get("force_weight", 1.0))
    if energy < 0 or force < 0 or energy + force <= 0:
        raise InputError(f"--energy-weight / --force-weight: expected non-negative weights, "
                         f"not both zero, got {energy} and {force}")
    return force / (energy + force)


def _ridge(ridge: float | None) -> float:
    from mlipuq.backends.pace_fit import DEFAULT_RIDGE

    if ridge is None:
        return DEFAULT_RIDGE
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise InputError(f"ridge: expected a number >= 0, got {ridge!r}")
    return float(ridge)


def _new_run(train_file, run_dir: Path, *, paths, preset, epochs, n_models, seed,
             val_fraction, val_file, r_max, overwrite) -> RunFolder:
    from mlipuq.backends.pace import PaceBackend
    from mlipuq.backends.pace_fit import BASIS_PRESETS

    train_file = Path(train_file)
    frames = read_training_set(train_file)
    elements = check_elements(frames, str(train_file))
    if paths is not None:
        for path in paths:
            missing = sorted(set(elements) - set(PaceBackend(path).elements))
            if missing:
                raise InputError(f"--potential {path}: has no element(s) {missing} of "
                                 f"{train_file.name} (elements {elements})")
    elif preset not in BASIS_PRESETS:
        raise InputError(f"preset: expected one of {sorted(BASIS_PRESETS)}, got {preset!r}")
    train_idx, val_idx, val_frames = split_or_read_val(
        frames, elements, val_fraction=val_fraction, seed=seed, val_file=val_file)
    meta = {
        **_versions(),
        "elements": elements,
        "n_models": n_models,
        **split_meta(train_file, val_file=val_file, val_fraction=val_fraction,
                     train_idx=train_idx, val_idx=val_idx, seed=seed, n_models=n_models),
        "trained_epochs": {},
    }
    if paths is None:
        meta.update({"fit": "linear_ace", "preset": preset, "r_max": float(r_max),
                     "epochs": epochs, "basis": {"functions": {"ALL": {
                         k: list(v) for k, v in BASIS_PRESETS[preset].items()}}}})
    else:
        meta.update({"fit": "user_potentials", "preset": None, "epochs": None})
    return create_run(run_dir, [frames[i] for i in train_idx], val_frames, backend="pace",
                      meta=meta, overwrite=overwrite)


def _adopt_potentials(folder: RunFolder, paths: Sequence[Path]) -> RunFolder:
    """Copy the user's potentials into the run, then mark every member complete."""
    from mlipuq.provenance import file_sha256

    folder.models_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for model_id, source in zip(folder.model_ids, paths, strict=True):
        target = folder.models_dir / f"{model_id}.yaml"
        with atomic_path(target, suffix=".yaml") as tmp:
            shutil.copyfile(source, tmp)
        records.append({"model_id": model_id, "source": str(source.resolve()),
                        "sha256": file_sha256(target)})
    folder.meta["potentials"] = records
    folder.meta["trained_epochs"] = {m: 1 for m in folder.model_ids}
    folder.save_meta()
    return folder


def _fit_members(folder: RunFolder, *, every_n_epochs: int, progress: bool) -> RunFolder:
    from mlipuq.backends import pace_fit
    from mlipuq.trajectory_store import TrajectoryStore

    epochs = int(folder.meta["epochs"])
    basis = pace_fit.linear_basis(folder.elements, r_max=float(folder.meta["r_max"]),
                                  functions=folder.meta["basis"]["functions"])
    train = pace_fit.design(basis, folder.train_frames())
    val = None
    if folder.val_path.is_file():
        from mlipuq.io import read_structures

        val = pace_fit.design(basis, read_structures(folder.val_path, require_forces=True))
    store = TrajectoryStore.create(folder.store_path, folder.atom_table)
    n_configs = len(train.n_atoms)
    done = folder.meta.setdefault("trained_epochs", {})
    summaries = folder.meta.setdefault("fit_errors", {})
    for number, (model_id, member_seed) in enumerate(zip(folder.model_ids, folder.seeds,
                                                         strict=True)):
        if done.get(model_id):
            continue
        if len(folder.model_ids) > 1:  # bootstrap multiplicities of the configurations
            draws = np.random.default_rng(member_seed).integers(0, n_configs, n_configs)
            weights = np.bincount(draws, minlength=n_configs).astype(float)
        else:
            weights = np.ones(n_configs)
        h, b = pace_fit.normal_equations(train, weights=weights, kappa=folder.meta["kappa"],
                                         ridge=folder.meta["ridge"])
        _clear_member(store, model_id)
        writer = store.writer(model_id, seed=member_seed,
                              info={"fit": "linear_ace_cg", "member": number,
                                    "bootstrap": len(folder.model_ids) > 1})
        rows: list[dict[str, float]] = []

        def log(step: int, coefficients: np.ndarray, writer=writer, rows=rows) -> None:
            if (step + 1) % every_n_epochs and step + 1 != epochs:
                return
            errors = train.errors(coefficients)
            writer.append(errors["force_norm"], epoch=step + 1,
                          energy_errors=errors["energy_error"])
            row = {"epoch": step + 1,
                   "train_energy_rmse_per_atom": errors["energy_rmse_per_atom"],
                   "train_force_rmse": errors["force_rmse"]}
            if val is not None:
                held = val.errors(coefficients)
                row.update({"val_energy_rmse_per_atom": held["energy_rmse_per_atom"],
                            "val_force_rmse": held["force_rmse"]})
            rows.append(row)

        coefficients = pace_fit.conjugate_gradient(h, b, epochs, callback=log)
        pace_fit.write_potential(folder.models_dir / f"{model_id}.yaml", basis, coefficients)
        pace_fit.write_metrics(folder.metrics_path(model_id), rows)
        summaries[model_id] = {k: v for k, v in rows[-1].items() if k != "epoch"}
        done[model_id] = epochs
        folder.save_meta()
        if progress:
            logger.info("%s: linear ACE (%d coefficients), %d CG epochs: %s", model_id,
                        b.size, epochs, ", ".join(f"{k} {v:.4g}" for k, v in
                                                  summaries[model_id].items()))
    return folder


def _clear_member(store: Any, model_id: str) -> None:
    """Remove a member's logged epochs (a refit starts its trajectory again)."""
    directory = store.path / "models" / model_id
    if directory.is_dir():
        shutil.rmtree(directory)
