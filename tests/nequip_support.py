"""Helpers for NequIP tests: tiny EMT copper data and a tiny trained run folder.

Used by the training and the inference tests (import as ``from nequip_support import
...`` from a test module in ``tests/``). Everything is small enough for 1 CPU thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TINY_R_MAX = 4.0  # Å, covers the first two fcc shells of Cu (2.55 Å, 3.61 Å)


def make_emt_copper_frames(
    n: int, seed: int = 0, temperature: float = 600.0, *, repeat: tuple = (2, 1, 1)
) -> list:
    """``n`` snapshots of short EMT molecular dynamics of fcc copper (8 atoms by default).

    Each frame carries a single-point calculator with the EMT energy (eV) and forces
    (eV/Å). Frames are 4 velocity-Verlet steps (2 fs) apart, starting from a rattled
    cubic cell with Maxwell-Boltzmann velocities at ``temperature`` K.

    Parameters
    ----------
    n : int
        Number of frames.
    seed : int
        Seed of the rattle and the velocities.
    temperature : float
        Initial temperature in K.
    repeat : tuple of 3 int
        Repetition of the 4-atom cubic cell.
    """
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.29
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    dynamics = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    frames = []
    for _ in range(n):
        dynamics.run(4)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(
            frame, energy=float(atoms.get_potential_energy()), forces=atoms.get_forces().copy()
        )
        frame.info["config_type"] = f"md_{int(temperature)}K"
        frames.append(frame)
    return frames


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``mlipuq argv``; assert exit 2 and a one-line stderr message; return it."""
    from mlipuq.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def write_frames(path: str | os.PathLike, frames: list) -> Path:
    """Write frames as extxyz and return the path."""
    from ase.io import write

    path = Path(path)
    write(path, frames, format="extxyz")
    return path


def make_tiny_run(
    directory: str | os.PathLike,
    *,
    n_models: int = 2,
    epochs: int = 3,
    n_frames: int = 12,
    log_mode: str = "epoch_end",
    seed: int = 0,
    package: bool = False,
    **kwargs,
) -> Path:
    """Train a tiny NequIP ensemble on EMT copper; return the run folder path.

    ``directory/cu_train.extxyz`` holds the data; the run folder is
    ``directory/run``. Extra keyword arguments go to
    :func:`mlipuq.backends.nequip.training.train_ensemble` (e.g.
    ``preset_overrides={"lr": 0.0}``). About 10-20 s per model on one thread.
    """
    from mlipuq.backends.nequip.training import train_ensemble

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = write_frames(directory / "cu_train.extxyz", make_emt_copper_frames(n_frames, seed))
    run_dir = directory / "run"
    options = {
        "preset": "tiny",
        "epochs": epochs,
        "n_models": n_models,
        "seed": seed,
        "val_fraction": 0.25,
        "log_mode": log_mode,
        "threads": 1,
        "r_max": TINY_R_MAX,
        "package": package,
        "progress": False,
    }
    options.update(kwargs)
    train_ensemble(data, run_dir, **options)
    return run_dir
