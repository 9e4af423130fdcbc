"""Self-generated copper data sets labelled with ASE's EMT calculator (no network).

Used by ``mlipuq demo``, tests and benchmarks. The training set is bulk fcc
copper from Langevin MD at ~300 K; the test sets mirror the papers' in-domain /
out-of-domain split: 300 K bulk (in domain), much hotter bulk, a vacancy, a
(111) surface slab and a small nanoparticle (out of domain).
Energies in eV, forces in eV/Å, every frame carries ``info["config_type"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Octahedron
from ase.md.langevin import Langevin

try:  # ASE >= 3.29 renamed MaxwellBoltzmannDistribution
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover - older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

LATTICE_CONSTANT_A = 3.61


@dataclass(frozen=True)
class CopperSizes:
    """How many frames each set gets and how big the bulk cell is."""

    train: int = 60
    test: int = 20
    supercell: int = 2
    interval: int = 10
    equilibration: int = 100


QUICK_SIZES = CopperSizes(train=16, test=6, supercell=2, interval=5, equilibration=40)


def labelled(atoms: Atoms, config_type: str) -> Atoms:
    """Copy of ``atoms`` with EMT energy (eV) and forces (eV/Å) frozen in a single-point calc."""
    frame = atoms.copy()
    frame.calc = EMT()
    energy = frame.get_potential_energy()
    forces = frame.get_forces()
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    frame.info["config_type"] = config_type
    return frame


def md_frames(
    atoms: Atoms,
    *,
    temperature_K: float,
    n_frames: int,
    config_type: str,
    seed: int,
    interval: int = 10,
    equilibration: int = 100,
    timestep_fs: float = 2.0,
) -> list[Atoms]:
    """Sample ``n_frames`` EMT-labelled frames from Langevin MD at ``temperature_K``.

    Parameters
    ----------
    atoms : Atoms
        Starting structure (copied, not modified).
    temperature_K : float
        Thermostat temperature in K.
    n_frames, interval, equilibration : int
        Frames to keep, MD steps between kept frames, and discarded initial steps.
    config_type : str
        Group label written to every frame.
    seed : int
        Seeds velocities and the Langevin noise.
    timestep_fs : float
        MD time step in fs.
    """
    rng = np.random.default_rng(seed)
    system = atoms.copy()
    system.calc = EMT()
    thermalize_momenta(system, temperature_K=temperature_K, rng=rng)
    dynamics = Langevin(
        system,
        timestep_fs * units.fs,
        temperature_K=temperature_K,
        friction=0.02,
        fixcm=False,
        rng=rng,
    )
    dynamics.run(equilibration)
    frames = []
    for _ in range(n_frames):
        dynamics.run(interval)
        frames.append(labelled(system, config_type))
    return frames


def bulk_copper(supercell: int = 2) -> Atoms:
    """Periodic fcc copper, ``supercell``^3 conventional cells (4 atoms each)."""
    return bulk("Cu", "fcc", a=LATTICE_CONSTANT_A, cubic=True).repeat(supercell)


def copper_datasets(
    *, seed: int = 0, sizes: CopperSizes = CopperSizes(), hot_temperature_K: float = 1200.0
) -> dict[str, list[Atoms]]:
    """Training and test sets for the copper demo.

    Returns
    -------
    dict
        ``"train"`` (bulk, 300 K) and the test sets ``"bulk_300K"``,
        ``f"bulk_{hot}K"``, ``"vacancy"``, ``"surface"``, ``"nanoparticle"``.
    """
    cell = bulk_copper(sizes.supercell)
    vacancy = cell.copy()
    del vacancy[0]
    slab = fcc111("Cu", size=(2, 2, 4), a=LATTICE_CONSTANT_A, vacuum=6.0, periodic=True)
    particle = Octahedron("Cu", length=3, cutoff=0, latticeconstant=LATTICE_CONSTANT_A)
    particle.center(vacuum=6.0)
    common = {"interval": sizes.interval, "equilibration": sizes.equilibration}
    hot = f"bulk_{int(hot_temperature_K)}K"
    plan = [
        ("train", cell, 300.0, sizes.train, "bulk_300K"),
        ("bulk_300K", cell, 300.0, sizes.test, "bulk_300K"),
        (hot, cell, hot_temperature_K, sizes.test, hot),
        ("vacancy", vacancy, 300.0, sizes.test, "vacancy"),
        ("surface", slab, 300.0, sizes.test, "surface"),
        ("nanoparticle", particle, 300.0, sizes.test, "nanoparticle"),
    ]
    return {
        name: md_frames(
            start,
            temperature_K=temperature,
            n_frames=count,
            config_type=label,
            seed=seed + number,
            **common,
        )
        for number, (name, start, temperature, count, label) in enumerate(plan)
    }
