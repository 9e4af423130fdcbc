"""The atom table: the fixed order of atoms in a data set.

Every "per training atom" array in mlipuq (error trajectories, p_i, histograms,
descriptors, weights) is indexed by an :class:`AtomTable`: row ``i`` is atom
``atom_index[i]`` of configuration ``config_index[i]``, in file order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError
from mlipuq.io import load_npz, reference_forces, save_npz
from mlipuq.validation import as_species


@dataclass(frozen=True)
class AtomTable:
    """Order and identity of the N atoms of a data set of C configurations.

    Attributes
    ----------
    config_index : ndarray of int64, shape (N,)
        Configuration (frame) number of each atom, 0-based, non-decreasing.
    atom_index : ndarray of int64, shape (N,)
        Index of each atom within its configuration.
    species : ndarray of str, shape (N,)
        Chemical symbol of each atom.
    force_norm : ndarray of float64, shape (N,)
        Reference force norm |F_ref| in eV/Å (NaN where no reference forces).
    config_type : ndarray of str, shape (C,)
        Group label per configuration (extxyz ``config_type``, else ``"default"``).
    """

    config_index: np.ndarray
    atom_index: np.ndarray
    species: np.ndarray
    force_norm: np.ndarray
    config_type: np.ndarray

    @classmethod
    def from_atoms(cls, frames: Sequence[Atoms], *, group_key: str = "config_type") -> AtomTable:
        """Build the table from configurations (e.g. ``ase.io.read(path, ":")``)."""
        if len(frames) == 0:
            raise InputError("atom table: no configurations given")
        sizes = np.array([len(atoms) for atoms in frames], dtype=np.int64)
        if np.any(sizes == 0):
            raise InputError(f"atom table: configuration {int(np.argmin(sizes))} has no atoms")
        config_index = np.repeat(np.arange(len(frames), dtype=np.int64), sizes)
        atom_index = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
        species = np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str) for a in frames])
        force_norm = np.concatenate([_force_norm(atoms) for atoms in frames])
        config_type = np.asarray(
            [str(atoms.info.get(group_key, "default")) for atoms in frames], dtype=str
        )
        return cls(config_index, atom_index, species, force_norm, config_type)

    @classmethod
    def from_sizes(
        cls,
        sizes: Sequence[int],
        species: Sequence[str] | np.ndarray,
        *,
        force_norm: np.ndarray | None = None,
        config_type: Sequence[str] | None = None,
    ) -> AtomTable:
        """Build the table from configuration sizes and per-atom species (no structures)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        species = as_species(species)
        if sizes.sum() != len(species):
            raise InputError(
                f"atom table: sizes add up to {int(sizes.sum())} atoms, species has {len(species)}"
            )
        n_atoms = len(species)
        norms = np.full(n_atoms, np.nan) if force_norm is None else np.asarray(force_norm, float)
        if len(norms) != n_atoms:
            raise InputError(f"atom table: force_norm has {len(norms)} rows, expected {n_atoms}")
        labels = ["default"] * len(sizes) if config_type is None else list(config_type)
        return cls(
            np.repeat(np.arange(len(sizes), dtype=np.int64), sizes),
            np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]),
            species,
            norms,
            np.asarray(labels, dtype=str),
        )

    @property
    def n_atoms(self) -> int:
        """Number of atoms N."""
        return len(self.config_index)

    @property
    def n_configs(self) -> int:
        """Number of configurations C."""
        return len(self.config_type)

    @property
    def config_sizes(self) -> np.ndarray:
        """Atoms per configuration, shape (C,)."""
        return np.bincount(self.config_index, minlength=self.n_configs)

    @property
    def atom_group(self) -> np.ndarray:
        """``config_type`` label of each atom's configuration, shape (N,)."""
        return self.config_type[self.config_index]

    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of the order and species: identifies the data set layout."""
        digest = hashlib.sha256()
        digest.update(self.config_index.astype(np.int64).tobytes())
        digest.update(self.atom_index.astype(np.int64).tobytes())
        digest.update("\n".join(self.species.tolist()).encode())
        return digest.hexdigest()[:16]

    def check_length(self, n_rows: int, name: str) -> None:
        """Raise :class:`InputError` unless a per-atom input has N rows."""
        if n_rows != self.n_atoms:
            raise InputError(
                f"{name}: has {n_rows} atoms but the atom table has {self.n_atoms}"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Save as .npz (no pickle)."""
        save_npz(
            path,
            config_index=self.config_index,
            atom_index=self.atom_index,
            species=self.species.astype("U3"),
            force_norm=self.force_norm,
            config_type=self.config_type.astype(str),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> AtomTable:
        """Load a table written by :meth:`save`."""
        data = load_npz(path)
        missing = {"config_index", "atom_index", "species", "force_norm", "config_type"} - set(data)
        if missing:
            raise InputError(f"{path}: not an mlipuq atom table (missing {sorted(missing)})")
        return cls(**{key: data[key] for key in data})


def _force_norm(atoms: Atoms) -> np.ndarray:
    forces = reference_forces(atoms)
    if forces is None:
        return np.full(len(atoms), np.nan)
    return np.linalg.norm(forces, axis=1)


def config_max(
    per_atom: np.ndarray, config_index: np.ndarray, n_configs: int | None = None
) -> np.ndarray:
    """Maximum of a per-atom quantity within each configuration.

    Parameters
    ----------
    per_atom : ndarray, shape (N,)
    config_index : ndarray of int, shape (N,)
    n_configs : int, optional
        Number of configurations (default: ``config_index.max() + 1``).

    Returns
    -------
    ndarray, shape (C,)
        ``-inf`` for configurations without atoms.
    """
    n_configs = int(config_index.max()) + 1 if n_configs is None else n_configs
    out = np.full(n_configs, -np.inf)
    np.maximum.at(out, config_index, per_atom)
    return out


def config_mean(
    per_atom: np.ndarray, config_index: np.ndarray, n_configs: int | None = None
) -> np.ndarray:
    """Mean of a per-atom quantity within each configuration, shape (C,)."""
    n_configs = int(config_index.max()) + 1 if n_configs is None else n_configs
    sums = np.bincount(config_index, weights=per_atom, minlength=n_configs)
    counts = np.bincount(config_index, minlength=n_configs)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts
