"""Training data for any backend: read and check labelled frames, split, start a run folder.

Nothing here depends on the model: ``mlipuq train`` (NequIP) and
:func:`mlipuq.backends.arrays.write_run` both read or check their frames, split off
the validation frames and start the run folder with :func:`create_run`.

Isolated-atom energies (per-type energy shifts) come from a file of single-atom
configurations when given, else from a least-squares fit
E_config ~ sum_el n_el(config) e_el over the training frames (minimum-norm solution;
for a single element it is the mean energy per atom).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError
from mlipuq.io import (
    atomic_directory,
    atomic_path,
    read_structures,
    reference_energy,
    reference_forces,
)
from mlipuq.run_folder import RunFolder

__all__ = [
    "check_elements",
    "check_labelled",
    "create_run",
    "fit_isolated_energies",
    "read_isolated_energies",
    "read_training_set",
    "split_or_read_val",
    "split_train_val",
    "write_frames",
]


def check_elements(frames: Sequence[Atoms], source: str) -> list[str]:
    """Sorted chemical symbols of ``frames``; InputError for a non-element (Z = 0)."""
    numbers = set()
    for number, atoms in enumerate(frames):
        z = atoms.get_atomic_numbers()
        if np.any(z <= 0) or np.any(z > 118):
            raise InputError(f"{source}: configuration {number} has an unknown element")
        numbers.update(int(v) for v in z)
    from ase.data import chemical_symbols

    return sorted(chemical_symbols[z] for z in numbers)


def as_frames(frames: Any, source: str) -> list[Atoms]:
    """``frames`` (one ase.Atoms or a sequence of them) as a list, each a non-empty
    ase.Atoms; else :class:`InputError` naming ``source`` and the configuration."""
    if isinstance(frames, Atoms):
        frames = [frames]
    frames = list(frames)
    for number, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            raise InputError(f"{source}: configuration {number} is a {type(atoms).__name__}, "
                             "expected ase.Atoms")
        if len(atoms) == 0:
            raise InputError(f"{source}: configuration {number} has no atoms")
    return frames


def check_labelled(frames: Sequence[Atoms], source: str) -> list[Atoms]:
    """Clean copies of labelled frames: numbers, positions, cell, pbc and the labels.

    Each copy carries the reference energy (eV) and forces (eV/Å) as a single-point
    calculator and keeps ``info["config_type"]``; nothing else of the input is kept.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        C >= 1 configurations with reference energy and forces.
    source : str
        Name of the frames in messages (a file name, ``"train_frames"``).

    Raises
    ------
    InputError
        Not Atoms, no atoms, an unknown element, a frame without (finite) energy or
        forces.
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    clean = []
    for number, atoms in enumerate(as_frames(frames, source)):
        energy = reference_energy(atoms)
        if energy is None:
            raise InputError(f"{source}: configuration {number} has no reference energy")
        if not np.isfinite(energy):
            raise InputError(f"{source}: configuration {number} has a NaN or infinite "
                             "reference energy")
        forces = reference_forces(atoms)
        if forces is None:
            raise InputError(f"{source}: configuration {number} has no reference forces")
        if forces.shape != (len(atoms), 3) or not np.all(np.isfinite(forces)):
            raise InputError(f"{source}: configuration {number} has invalid forces")
        copy = Atoms(
            numbers=atoms.get_atomic_numbers(),
            positions=atoms.get_positions(),
            cell=atoms.get_cell(),
            pbc=atoms.get_pbc(),
        )
        if "config_type" in atoms.info:
            copy.info["config_type"] = atoms.info["config_type"]
        copy.calc = SinglePointCalculator(copy, energy=float(energy), forces=forces)
        clean.append(copy)
    if not clean:
        raise InputError(f"{source}: expected at least one configuration, got none")
    check_elements(clean, source)
    return clean


def read_training_set(path: str | os.PathLike) -> list[Atoms]:
    """Read an extxyz training set; every frame must have energy and forces.

    Returns frames with the reference values attached as a single-point calculator
    (``energy`` in eV, ``forces`` in eV/Å) and ``config_type`` kept
    (:func:`check_labelled`).

    Raises
    ------
    InputError
        Unreadable file, an unknown element symbol, a frame without forces or energy.
    """
    path = Path(path)
    _check_symbols(path)
    return check_labelled(read_structures(path, require_forces=True), str(path))


def _check_symbols(path: Path) -> None:
    """Name an unknown element symbol in an extxyz file before ASE trips over it."""
    from ase.data import atomic_numbers

    if not path.is_file() or path.suffix.lower() not in (".xyz", ".extxyz"):
        return
    with open(path, errors="replace") as handle:
        frame = 0
        while True:
            header = handle.readline()
            if not header.strip():
                return
            try:
                n_atoms = int(header.split()[0])
            except (ValueError, IndexError):
                return  # let ASE report the malformed file
            handle.readline()
            for _ in range(n_atoms):
                fields = handle.readline().split()
                if fields and fields[0] not in atomic_numbers:
                    raise InputError(
                        f"{path}: configuration {frame} has unknown element {fields[0]!r}"
                    )
            frame += 1


def split_train_val(
    n_frames: int, *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation frame numbers (each sorted) for a seeded random split.

    ``max(1, round(val_fraction * n_frames))`` frames go to validation.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise InputError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    if n_frames < 2:
        raise InputError(f"training set: needs at least 2 configurations, got {n_frames}")
    n_val = min(max(1, int(round(val_fraction * n_frames))), n_frames - 1)
    order = np.random.default_rng(seed).permutation(n_frames)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_or_read_val(
    frames: Sequence[Atoms], elements: Sequence[str], *, val_fraction: float, seed: int,
    val_file: str | os.PathLike | None,
) -> tuple[np.ndarray, np.ndarray, list[Atoms]]:
    """(training frame numbers, held-out frame numbers, validation frames).

    Without ``val_file`` a seeded split of ``frames``; with it every frame trains and
    the validation frames are read from ``val_file`` (InputError for an element the
    training set does not have).
    """
    if val_file is None:
        train_idx, val_idx = split_train_val(len(frames), val_fraction=val_fraction, seed=seed)
        return train_idx, val_idx, [frames[i] for i in val_idx]
    val_frames = read_training_set(val_file)
    extra = sorted(set(check_elements(val_frames, str(val_file))) - set(elements))
    if extra:
        raise InputError(
            f"{val_file}: element(s) {extra} not in the training set (elements {list(elements)})"
        )
    return np.arange(len(frames)), np.zeros(0, dtype=int), val_frames


def split_meta(train_file: str | os.PathLike, *, val_file: str | os.PathLike | None,
               val_fraction: float, train_idx: Sequence[int], val_idx: Sequence[int],
               seed: int, n_models: int) -> dict:
    """The ``run.json`` fields every backend's new run records about its members and
    data: seeds, model ids, the training file and its SHA-256, the split
    (:func:`split_or_read_val`) or the validation file and its SHA-256."""
    from mlipuq.provenance import file_sha256

    train_file = Path(train_file)
    return {
        "seeds": [seed + i for i in range(n_models)],
        "model_ids": [f"model_{i}" for i in range(n_models)],
        "train_file": train_file.name,
        "train_sha256": file_sha256(train_file),
        "val_fraction": None if val_file is not None else float(val_fraction),
        "val_file": None if val_file is None else Path(val_file).name,
        "val_sha256": None if val_file is None else file_sha256(Path(val_file)),
        "train_frames": [int(i) for i in train_idx],
        "val_frames": [int(i) for i in val_idx],
    }


def fit_isolated_energies(frames: Sequence[Atoms], elements: Sequence[str]) -> dict[str, float]:
    """Least-squares per-element energies (eV): E_config ~ sum_el n_el e_el (min-norm)."""
    index = {el: k for k, el in enumerate(elements)}
    counts = np.zeros((len(frames), len(elements)))
    for row, atoms in enumerate(frames):
        for symbol in atoms.get_chemical_symbols():
            counts[row, index[symbol]] += 1
    energies = np.array([reference_energy(atoms) for atoms in frames], dtype=float)
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {el: float(solution[index[el]]) for el in elements}


def read_isolated_energies(
    source: str | os.PathLike | Mapping[str, float], elements: Sequence[str]
) -> dict[str, float]:
    """Isolated-atom energies from a mapping or a file of single-atom configurations."""
    if isinstance(source, Mapping):
        energies = {str(k): float(v) for k, v in source.items()}
        name = "isolated_energies"
    else:
        name = str(source)
        energies = {}
        for number, atoms in enumerate(read_structures(source)):
            if len(atoms) != 1:
                raise InputError(
                    f"{source}: configuration {number} has {len(atoms)} atoms, expected 1 "
                    "(a file of isolated atoms)"
                )
            energy = reference_energy(atoms)
            if energy is None:
                raise InputError(f"{source}: configuration {number} has no energy")
            energies[atoms.get_chemical_symbols()[0]] = float(energy)
    missing = [el for el in elements if el not in energies]
    if missing:
        raise InputError(f"{name}: no isolated-atom energy for element(s) {missing}")
    return {el: energies[el] for el in elements}


def write_frames(path: str | os.PathLike, frames: Sequence[Atoms]) -> None:
    """Write ``frames`` as extxyz to ``path``, atomically (energies, forces included)."""
    import warnings

    from ase.io import write

    with atomic_path(path, suffix=".extxyz") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unhashable information")
        write(tmp, list(frames), format="extxyz")


def create_run(
    run_dir: str | os.PathLike,
    train_frames: Sequence[Atoms],
    val_frames: Sequence[Atoms],
    *,
    backend: str,
    meta: Mapping | None = None,
    overwrite: bool = False,
) -> RunFolder:
    """Start a run folder from checked frames: ``run.json``, train/val extxyz, atom table.

    The folder is written in a temporary directory beside ``run_dir`` and swapped in
    (:func:`mlipuq.io.atomic_directory`): a kill at any moment leaves no run folder (or
    the one it was to replace) or the complete new one, never a ``run.json`` without
    its frames or atom table.

    Parameters
    ----------
    run_dir : path-like
        The run folder (new, empty, or replaced with ``overwrite``).
    train_frames, val_frames : sequence of ase.Atoms
        Labelled frames (:func:`check_labelled`); the training frames' order is the
        atom-table order of every per-atom array of the run. No validation frames:
        no ``val.extxyz`` (no calibration then).
    backend : str
        Registered backend name (``run.json["backend"]``).
    meta : mapping, optional
        More ``run.json`` fields; needs ``"model_ids"``. ``elements``, ``created``,
        ``mlipuq_version`` and ``train_sha256`` are filled in unless given.
    overwrite : bool
        Replace an existing run folder.

    Returns
    -------
    RunFolder
    """
    from mlipuq import __version__
    from mlipuq.atom_table import AtomTable
    from mlipuq.provenance import file_sha256

    elements = check_elements(train_frames, "train_frames")
    fields = {
        "mlipuq_version": __version__,
        "elements": elements,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **dict(meta or {}),
        "backend": backend,
    }
    run_dir = Path(run_dir)
    RunFolder.check_target(run_dir, overwrite=overwrite)
    with atomic_directory(run_dir) as tmp:
        staged = RunFolder.create(tmp, fields)
        write_frames(staged.train_path, train_frames)
        if len(val_frames):
            write_frames(staged.val_path, val_frames)
        AtomTable.from_atoms(list(train_frames)).save(staged.path / "atom_table.npz")
        if "train_sha256" not in fields:
            staged.meta["train_sha256"] = file_sha256(staged.train_path)
            staged.save_meta()
    return RunFolder(run_dir, staged.meta)
