"""The copper demo: EMT data -> NequIP ensemble -> four UQ methods -> HTML report.

Everything is generated locally (ASE's EMT calculator, no network). Stages:

1. data: :func:`mlipuq.emt_data.copper_datasets` (bulk 300 K training set; test
   sets bulk 300 K, bulk 1200 K, vacancy, (111) surface, nanoparticle), written as
   extxyz into ``OUT/data``;
2. training: the ``train`` capability of the chosen backend from the backend registry
   (:data:`BACKEND` by default: :func:`mlipuq.backends.nequip.training.train_ensemble`,
   M members with per-epoch error trajectories) into ``OUT/run``. Every backend's
   ``train`` takes the same keywords (``preset``, ``epochs``, ``n_models``, ``seed``,
   ``val_fraction``, ``threads``, ``r_max``, ``package``, ``overwrite``, ``progress``)
   and ignores those that do not apply to it;
3. fitting and evaluation: :func:`mlipuq.pipeline.evaluate_run` (LTAU calibrated on
   half of the 300 K test configurations) into ``OUT/report``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlipuq.exceptions import InputError

DEMO_FILE = "demo.json"
IN_DOMAIN = "bulk_300K"
BACKEND = "nequip"
"""The backend the demo trains by default (:mod:`mlipuq.backends.registry`)."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes
    ----------
    preset : str
        Size preset of the backend's models (``tiny``/``small``/``paper``: layers and
        features for NequIP, Allegro and MACE, the basis size for pacemaker ACE).
    epochs : int
        Training epochs per model.
    n_models : int
        Ensemble size M.
    r_max : float
        Cutoff in Å.
    quick : bool
        Use :data:`mlipuq.emt_data.QUICK_SIZES` (tests) instead of the default sizes.
    """

    preset: str = "small"
    epochs: int = 40
    n_models: int = 3
    r_max: float = 4.0
    quick: bool = False


FULL = DemoSettings()
QUICK = DemoSettings(preset="tiny", epochs=6, n_models=2, quick=True)


def settings_for(*, quick: bool, models: int | None = None,
                 epochs: int | None = None) -> DemoSettings:
    """:data:`FULL` or :data:`QUICK` with ``models`` / ``epochs`` replaced when given."""
    from dataclasses import replace

    base = QUICK if quick else FULL
    for name, value in (("models", models), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InputError(f"--{name}: expected a positive integer, got {value!r}")
    return replace(base, n_models=models or base.n_models, epochs=epochs or base.epochs)


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier demo folder (then it is reused)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_FILE).is_file():
        raise InputError(
            f"--out: {out} is a non-empty folder that is not an mlipuq demo folder "
            "(choose a new one)"
        )


def _busy_warning(threads: int) -> str | None:
    """A hint when other processes already use the cores that ``threads`` would need.

    With more torch threads than idle cores, NequIP training slows down badly
    (44 s instead of 1.7 s per epoch measured with 2 threads on a busy 2-core machine).
    """
    if threads < 2 or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    return (f"the machine is busy (load {load:.1f} on {cores} cores); "
            f"--threads {threads} may run much slower than --threads 1")


def write_datasets(out: Path, *, seed: int, quick: bool) -> dict[str, Path]:
    """Generate the EMT copper sets and write them as ``out/<name>.extxyz``."""
    from ase.io import write

    from mlipuq.emt_data import QUICK_SIZES, CopperSizes, copper_datasets
    from mlipuq.io import atomic_path

    sets = copper_datasets(seed=seed, sizes=QUICK_SIZES if quick else CopperSizes())
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frames in sets.items():
        path = out / f"{name}.extxyz"
        with atomic_path(path, suffix=".extxyz") as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unhashable information")
            write(tmp, frames, format="extxyz")
        paths[name] = path
    return paths


def run_demo(
    out: str | os.PathLike = "mlipuq-demo",
    *,
    settings: DemoSettings = FULL,
    seed: int = 0,
    threads: int = 2,
    progress: bool = True,
    backend: str = BACKEND,
) -> dict:
    """Run the whole demo into ``out``; returns the metrics dict of the report.

    Parameters
    ----------
    out : path-like
        Demo folder (created; an earlier demo folder is overwritten).
    settings : DemoSettings
        Sizes (:data:`FULL` ~ 5-10 min on 2 CPU cores, :data:`QUICK` ~ 1-2 min).
    seed : int
        Seed of the data, the training and the calibration split.
    threads : int
        torch / FAISS threads (training processes and evaluation).
    progress : bool
        Log one line per stage to the ``mlipuq`` logger (:mod:`mlipuq.log`; on stderr
        with the elapsed time under the ``mlipuq`` command, or after
        ``logging.basicConfig(level=logging.INFO)``) and show the training's per-epoch lines.
    backend : str
        Registered backend that trains the models (one with a ``train`` capability:
        ``nequip``, ``allegro``, ``mace``, ``pace``).

    Returns
    -------
    dict
        Metrics (also in ``out/report/metrics.json``); ``"report"`` is the path of
        ``index.html``.
    """
    from mlipuq.backends.registry import capability, check
    from mlipuq.io import write_json
    from mlipuq.log import logger
    from mlipuq.pipeline import evaluate_run

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"--threads: expected a positive integer, got {threads!r}")
    backend = check(backend)
    train = capability(backend, "train", "train models")
    out = Path(out)
    _check_out(out)

    def note(message: str) -> None:
        if progress:
            logger.info(message)

    busy = _busy_warning(threads)
    if busy and progress:
        logger.warning(busy)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / DEMO_FILE, {"seed": seed, "threads": threads, "backend": backend,
                                 **settings.__dict__})
    note(f"generating EMT copper data (seed {seed}{', quick sizes' if settings.quick else ''})")
    paths = write_datasets(out / "data", seed=seed, quick=settings.quick)
    note(f"data written to {out / 'data'}")
    note(f"training {settings.n_models} {backend} model(s), preset {settings.preset}, "
         f"{settings.epochs} epochs, {threads} thread(s)")
    run = train(
        paths["train"], out / "run", preset=settings.preset, epochs=settings.epochs,
        n_models=settings.n_models, seed=seed, val_fraction=0.1, threads=threads,
        r_max=settings.r_max, package=False, overwrite=True, progress=progress,
    )
    note(f"run folder {run.path}")
    tests = {name: path for name, path in paths.items() if name != "train"}
    metrics = evaluate_run(
        run, tests, out_dir=out / "report", calibration_set=(IN_DOMAIN, 0.5),
        in_domain=[IN_DOMAIN], threads=threads, seed=seed, refit=True,
        title=f"mlipuq demo: EMT copper, {backend} ensemble", progress=note,
    )
    note(f"done; report: {metrics['report']}")
    return metrics
