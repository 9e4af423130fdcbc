"""Test sets for evaluation: reading and checking them, splitting off a calibration
part, and the error table of each set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs, kept_atoms
from mlipuq.exceptions import InputError


@dataclass(frozen=True)
class EvaluationData:
    """Test sets concatenated in one list with their reference values.

    Attributes
    ----------
    frames : list of ase.Atoms
        All configurations (C), set after set.
    groups : ndarray of str, shape (C,)
        Test-set name of each configuration.
    config_index : ndarray of int, shape (N,)
    ref_forces : ndarray, shape (N, 3)
        Reference forces in eV/Å; NaN rows for configurations without forces.
    ref_energies : ndarray, shape (C,)
        Reference energies in eV; NaN where absent.
    """

    frames: list
    groups: np.ndarray
    config_index: np.ndarray
    ref_forces: np.ndarray
    ref_energies: np.ndarray

    def atom_groups(self) -> np.ndarray:
        """Test-set name of each atom, shape (N,)."""
        return self.groups[self.config_index]


def load_test_sets(
    test_sets: Mapping[str, str | os.PathLike | Sequence[Atoms]], elements: Sequence[str]
) -> EvaluationData:
    """Read and check test sets: files must exist, be non-empty, and hold known elements.

    Parameters
    ----------
    test_sets : dict of name -> path or list of ase.Atoms
    elements : sequence of str
        Chemical symbols of the training set.

    Raises
    ------
    InputError
        No test sets, a missing or unreadable file, an empty set, or elements not in
        the training set (the message names the file and the elements).
    """
    from mlipuq.io import read_structures, reference_energy, reference_forces

    if not test_sets:
        raise InputError("test sets: none given (use --test NAME=PATH)")
    known = set(elements)
    frames: list[Atoms] = []
    groups: list[str] = []
    forces: list[np.ndarray] = []
    energies: list[float] = []
    for name, source in test_sets.items():
        if isinstance(source, (str, os.PathLike)):
            label = str(source)
            if Path(source).is_file() and Path(source).stat().st_size == 0:
                raise InputError(f"{label}: empty file (no configurations)")
            found = read_structures(source)
        else:
            label = f"test set {name!r}"
            found = list(source)
        if not found:
            raise InputError(f"{label}: contains no configurations")
        present = set()
        for number, atoms in enumerate(found):
            if len(atoms) == 0:
                raise InputError(f"{label}: configuration {number} has no atoms")
            present.update(atoms.get_chemical_symbols())
        unknown = sorted(present - known)
        if unknown:
            raise InputError(
                f"{label}: element(s) {', '.join(unknown)} not in the training set "
                f"(trained on {', '.join(sorted(known))})"
            )
        for number, atoms in enumerate(found):
            ref = reference_forces(atoms)
            ok = ref is not None and np.shape(ref) == (len(atoms), 3)
            if ok and not np.all(np.isfinite(ref)):
                raise InputError(f"{label}: configuration {number} has NaN or infinite "
                                 "reference forces")
            forces.append(np.asarray(ref, float) if ok else np.full((len(atoms), 3), np.nan))
            energy = reference_energy(atoms)
            if energy is not None and not np.isfinite(energy):
                raise InputError(f"{label}: configuration {number} has a NaN or infinite "
                                 "reference energy")
            energies.append(np.nan if energy is None else float(energy))
            groups.append(str(name))
        frames.extend(found)
    sizes = [len(atoms) for atoms in frames]
    return EvaluationData(
        frames=frames,
        groups=np.asarray(groups),
        config_index=np.repeat(np.arange(len(frames), dtype=np.int64), sizes),
        ref_forces=np.concatenate(forces),
        ref_energies=np.asarray(energies, dtype=float),
    )


def split_configurations(
    groups: np.ndarray, calibration_set: str, fraction: float, seed: int
) -> np.ndarray:
    """Calibration configurations: a seeded ``fraction`` of those of ``calibration_set``.

    Parameters
    ----------
    groups : ndarray of str, shape (C,)
        Test-set name of each configuration.
    calibration_set : str
        The in-domain set to split.
    fraction : float
        Share of its configurations used for calibration, in (0, 1).
    seed : int
        Seed of the split.

    Returns
    -------
    ndarray of bool, shape (C,)
        True for the calibration configurations (the rest stay held out).
    """
    from mlipuq.calibration import split_calibration

    local = np.flatnonzero(groups == calibration_set)
    if len(local) < 2:
        raise InputError(
            f"--calibrate-on: test set {calibration_set!r} has {len(local)} configuration(s); "
            "at least 2 are needed to split it into calibration and held-out parts"
        )
    cal, _ = split_calibration(len(local), fraction, seed)
    mask = np.zeros(len(groups), bool)
    mask[local[cal]] = True
    return mask


def subset_data(data: EvaluationData, configs: np.ndarray) -> EvaluationData:
    """The test data of the configurations where ``configs`` (bool, (C,)) is True."""
    atoms, index = kept_atoms(configs, data.config_index)
    return EvaluationData(
        frames=[frame for frame, keep in zip(data.frames, configs, strict=True) if keep],
        groups=data.groups[configs],
        config_index=index,
        ref_forces=data.ref_forces[atoms],
        ref_energies=data.ref_energies[configs],
    )


def test_set_table(
    data: EvaluationData, outputs: Mapping[str, ModelOutputs], model_id: str, in_domain: set
) -> dict:
    """Per test set: size, in-domain flag and the errors of ``model_id`` (and the mean).

    ``force_mae_component`` is the MAE over the x, y, z components (eV/Å, what
    training logs print); ``force_mae_norm`` the mean of |F_ref - F_pred| over atoms
    (eV/Å, the error LTAU's atol is defined on); ``energy_mae_per_atom`` the mean of
    |E_ref - E_pred| / n_atoms over configurations (eV/atom).
    """
    atom_groups = data.atom_groups()
    sizes = np.bincount(data.config_index, minlength=len(data.groups))
    forces = np.stack([o.forces for o in outputs.values()])
    energies = np.stack([o.energies for o in outputs.values()])
    models = {model_id: (outputs[model_id].forces, outputs[model_id].energies)}
    if len(outputs) > 1:
        models["ensemble mean"] = (forces.mean(axis=0), energies.mean(axis=0))
    table = {}
    for name in dict.fromkeys(data.groups.tolist()):
        atoms, configs = atom_groups == name, data.groups == name
        entry = {"n_configs": int(configs.sum()), "n_atoms": int(atoms.sum()),
                 "in_domain": name in in_domain,
                 "has_forces": bool(np.any(np.isfinite(data.ref_forces[atoms]))),
                 "has_energies": bool(np.any(np.isfinite(data.ref_energies[configs])))}
        for label, (f, e) in models.items():
            diff = data.ref_forces[atoms] - f[atoms]
            ok = np.all(np.isfinite(diff), axis=1)
            per_atom = np.abs(data.ref_energies[configs] - e[configs]) / sizes[configs]
            per_atom = per_atom[np.isfinite(per_atom)]
            entry[label] = {
                "force_mae_component": float(np.abs(diff[ok]).mean()) if ok.any() else None,
                "force_mae_norm": float(np.linalg.norm(diff[ok], axis=1).mean())
                if ok.any() else None,
                "energy_mae_per_atom": float(per_atom.mean()) if len(per_atom) else None,
            }
        table[name] = entry
    return table
