"""A linear ACE potential fitted without pacemaker's TensorFlow fit (demo, tests).

With a linear embedding (``FinnisSinclairShiftedScaled``, ``fs_parameters: [1, 1]``,
``ndensity: 1``) an ACE energy is linear in the expansion coefficients c:
``E = sum_i sum_k c_{s_i k} B_ik``, and so are the forces,
``F = sum_k c_k dF/dc_k``. python-ace gives both design matrices in one evaluation
per configuration (``ACECalculator.compute(..., compute_b_grad=True)``: the
projections ``B_ik`` and ``forces_bfuncs`` = dF/dc, the same numbers pyace's own
``linearacefit`` uses), so the fit is a regularised linear least-squares problem:

    min_c  (1 - kappa) mean_c ((E_c - e_c . c) / n_c)^2
           + kappa mean_(atoms, xyz) (F - A_F c)^2 + ridge * mean diag(H) |c|^2

solved by Jacobi-preconditioned conjugate gradients on the normal equations,
one CG iteration per *epoch*. Every epoch's per-atom force-error norms on all
training atoms go into the run's :class:`~mlipuq.trajectory_store.TrajectoryStore`
(so LTAU works on these runs); the coefficients of the last epoch are the
potential, written as a pacemaker B-basis ``.yaml`` (``ACEBBasisSet.basis_coeffs``,
``to_BBasisConfiguration().save``) that ``PyACECalculator`` loads.

An ensemble is M such fits on bootstrap resamples of the training
configurations (member i: seed ``seed + i``); a single member fits all frames.

The potential has no per-element energy shift (a B-basis ``.yaml`` has no field for
one): an isolated atom has energy 0, and the fit targets the reference energies as
they are.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path, reference_energy, reference_forces

LINEAR_EMBEDDING: dict[str, Any] = {
    "npot": "FinnisSinclairShiftedScaled",
    "fs_parameters": [1, 1],
    "ndensity": 1,
}
"""pacemaker's linear embedding: the atomic energy is the density itself."""

BASIS_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny": {"nradmax_by_orders": (6, 3), "lmax_by_orders": (0, 2)},
    "small": {"nradmax_by_orders": (8, 4, 3), "lmax_by_orders": (0, 2, 1)},
    "paper": {"nradmax_by_orders": (12, 6, 4, 3), "lmax_by_orders": (0, 3, 2, 1)},
}
"""B-basis sizes per body order (same for every element; ``small``: 66 functions for
one element)."""

DEFAULT_KAPPA = 0.3
"""Weight of the force term (pacemaker's ``kappa``; energy term ``1 - kappa``)."""

DEFAULT_RIDGE = 1e-6
"""Ridge strength relative to the mean diagonal of the normal matrix."""


def linear_basis(
    elements: Sequence[str],
    *,
    r_max: float = 5.0,
    preset: str = "small",
    functions: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
) -> Any:
    """An unfitted linear-embedding B-basis (``BBasisConfiguration``, zero coefficients).

    Parameters
    ----------
    elements : sequence of str
        Chemical symbols.
    r_max : float
        Radial cutoff in Å.
    preset : {"tiny", "small", "paper"}
        Basis size (:data:`BASIS_PRESETS`); ignored with ``functions``.
    functions : mapping, optional
        pacemaker's ``functions`` block verbatim.
    """
    from mlipuq.backends.pace import small_test_basis

    if functions is None:
        if preset not in BASIS_PRESETS:
            raise InputError(f"preset: expected one of {sorted(BASIS_PRESETS)}, got {preset!r}")
        functions = {"ALL": BASIS_PRESETS[preset]}
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not (
            np.isfinite(r_max) and r_max > 0):
        raise InputError(f"r_max: expected a positive cutoff in Å, got {r_max!r}")
    return small_test_basis(elements, rcut=float(r_max), functions=functions,
                            embedding=LINEAR_EMBEDDING)


@dataclass(frozen=True)
class Design:
    """Linear-ACE design of C configurations (N atoms) for P coefficients.

    Attributes
    ----------
    energy : ndarray, shape (C, P)
        Sum over each configuration's atoms of their B-projections (energy = energy @ c, eV).
    forces : ndarray, shape (N, 3, P)
        dF/dc per atom and component (forces = forces @ c, eV/Å).
    n_atoms : ndarray of int, shape (C,)
    config_index : ndarray of int, shape (N,)
    ref_energy : ndarray, shape (C,)
        Reference energies in eV.
    ref_forces : ndarray, shape (N, 3)
        Reference forces in eV/Å.
    """

    energy: np.ndarray
    forces: np.ndarray
    n_atoms: np.ndarray
    config_index: np.ndarray
    ref_energy: np.ndarray
    ref_forces: np.ndarray

    def predict(self, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies (C,) eV and forces (N, 3) eV/Å of ``coefficients`` (P,)."""
        return self.energy @ coefficients, self.forces @ coefficients

    def errors(self, coefficients: np.ndarray) -> dict[str, Any]:
        """Per-atom force-error norms (N,), signed energy errors (C,) and the RMSEs."""
        energy, forces = self.predict(coefficients)
        de = energy - self.ref_energy
        df = forces - self.ref_forces
        return {
            "force_norm": np.linalg.norm(df, axis=1),
            "energy_error": de,
            "energy_rmse_per_atom": float(np.sqrt(np.mean((de / self.n_atoms) ** 2))),
            "force_rmse": float(np.sqrt(np.mean(df ** 2))),
        }


def design(basis_config: Any, frames: Sequence[Atoms]) -> Design:
    """Design matrices of labelled ``frames`` (one pyace evaluation per configuration)."""
    from pyace.atomicenvironment import aseatoms_to_atomicenvironment
    from pyace.basis import ACEBBasisSet
    from pyace.calculator import ACECalculator
    from pyace.evaluator import ACEBEvaluator

    basis = ACEBBasisSet(basis_config)
    evaluator = ACEBEvaluator(basis)  # kept referenced: the calculator does not own it
    calc = ACECalculator(evaluator)
    shifts, n_coefficients = _column_offsets(basis)
    index = basis.elements_to_index_map
    energy = np.zeros((len(frames), n_coefficients))
    forces, energies, ref_forces, sizes = [], [], [], []
    for number, atoms in enumerate(frames):
        e_ref, f_ref = reference_energy(atoms), reference_forces(atoms)
        if e_ref is None or f_ref is None:
            raise InputError(f"frames: configuration {number} has no reference energy/forces")
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(index))
        if unknown:
            raise InputError(f"frames: configuration {number} has element(s) {unknown} "
                             f"the basis does not have ({sorted(index)})")
        env = aseatoms_to_atomicenvironment(atoms, cutoff=basis.cutoffmax,
                                            elements_mapper_dict=index)
        calc.compute(env, compute_projections=True, compute_b_grad=True)
        for species, row in zip(env.species_type[: len(atoms)], calc.projections, strict=False):
            row = np.asarray(row, dtype=np.float64).reshape(-1)
            energy[number, shifts[species]: shifts[species] + row.size] += row
        forces.append(np.asarray(calc.forces_bfuncs, dtype=np.float64).transpose(0, 2, 1))
        energies.append(float(e_ref))
        ref_forces.append(np.asarray(f_ref, dtype=np.float64))
        sizes.append(len(atoms))
    sizes_array = np.asarray(sizes, dtype=np.int64)
    return Design(
        energy=energy,
        forces=np.concatenate(forces, axis=0),
        n_atoms=sizes_array,
        config_index=np.repeat(np.arange(len(frames)), sizes_array),
        ref_energy=np.asarray(energies),
        ref_forces=np.concatenate(ref_forces, axis=0),
    )


def _column_offsets(basis: Any) -> tuple[list[int], int]:
    """First coefficient of each species type, and the total (pyace's ordering of
    ``ACEBBasisSet.basis_coeffs`` for ndensity 1: rank-1 then higher ranks, per type)."""
    shifts, total = [], 0
    for rank1, higher in zip(basis.basis_rank1, basis.basis, strict=True):
        shifts.append(total)
        total += len(rank1) + len(higher)
    return shifts, total


def normal_equations(
    data: Design, *, weights: np.ndarray | None = None, kappa: float = DEFAULT_KAPPA,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, b) of the weighted least-squares loss of the module notes.

    ``weights`` (C,) count each configuration (bootstrap multiplicities; default 1).
    """
    w = np.ones(len(data.n_atoms)) if weights is None else np.asarray(weights, dtype=float)
    energy_rows = data.energy / data.n_atoms[:, None]
    energy_target = data.ref_energy / data.n_atoms
    atom_w = w[data.config_index]
    n_energy = w.sum()
    n_force = 3.0 * atom_w.sum()
    forces = data.forces.reshape(-1, data.forces.shape[-1])
    force_w = np.repeat(atom_w, 3)
    target = data.ref_forces.reshape(-1)
    h = ((1 - kappa) / n_energy) * (energy_rows.T * w) @ energy_rows
    h += (kappa / n_force) * (forces.T * force_w) @ forces
    b = ((1 - kappa) / n_energy) * (energy_rows.T * w) @ energy_target
    b += (kappa / n_force) * (forces.T * force_w) @ target
    h[np.diag_indices_from(h)] += ridge * max(float(np.mean(np.diag(h))), 1e-300)
    return h, b


def conjugate_gradient(
    h: np.ndarray, b: np.ndarray, iterations: int,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Jacobi-preconditioned CG on ``h c = b`` from c = 0; ``callback(i, c)`` after
    each of the ``iterations`` steps (stops early, still calling it, once converged)."""
    diag = np.diag(h).copy()
    diag[diag <= 0] = 1.0
    c = np.zeros_like(b)
    r = b - h @ c
    z = r / diag
    p = z.copy()
    rz = float(r @ z)
    tol = 1e-14 * max(float(np.linalg.norm(b)), 1e-300)
    for step in range(iterations):
        if np.linalg.norm(r) > tol:
            hp = h @ p
            alpha = rz / float(p @ hp)
            c = c + alpha * p
            r = r - alpha * hp
            z = r / diag
            rz_new = float(r @ z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        if callback is not None:
            callback(step, c)
    return c


def write_potential(path: str | os.PathLike, basis_config: Any,
                    coefficients: np.ndarray) -> Path:
    """Write ``basis_config`` with ``coefficients`` as a pacemaker ``.yaml`` (atomically)."""
    from pyace.basis import ACEBBasisSet

    basis = ACEBBasisSet(basis_config)
    coefficients = np.asarray(coefficients, dtype=np.float64)
    if len(basis.basis_coeffs) != coefficients.size:
        raise InputError(f"coefficients: expected {len(basis.basis_coeffs)}, "
                         f"got {coefficients.size}")
    basis.basis_coeffs = coefficients.tolist()
    path = Path(path)
    with atomic_path(path, suffix=".yaml") as tmp:
        basis.to_BBasisConfiguration().save(str(tmp))
    return path


def write_metrics(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    """Per-epoch errors as CSV (atomically)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
