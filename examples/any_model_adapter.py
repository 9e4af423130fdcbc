"""Any model in mlipuq: an ASE calculator plus a per-atom descriptor function.

The adapter below (about 30 lines) is a complete mlipuq backend
(:class:`mlipuq.backends.base.Backend`): ``outputs`` runs the calculator and the
descriptor function on each frame, ``from_run``/``model_path`` say where a member's
model lives in a run folder. Registered under a name, it drives the same pipeline as
the built-in backends: D-optimality, clustered D-optimality, LLPR and (with two or more
members) the ensemble are fitted, calibrated and evaluated, and the report is written.
LTAU also needs per-epoch training errors (``mlipuq.backends.arrays.write_run`` takes
them as ``error_trajectories``), which a finished model does not have.

Here the "model" is a Lennard-Jones potential for copper (two members with slightly
different parameters), the descriptors are radial Gaussian densities of each atom's
neighbours, and the reference data is ASE's EMT copper (bulk at 300 K for training;
1200 K bulk, vacancy, surface and nanoparticle as new conditions).

Run: ``python examples/any_model_adapter.py`` (about half a minute).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from ase.calculators.lj import LennardJones
from ase.neighborlist import neighbor_list

from mlipuq.backends.base import ModelOutputs
from mlipuq.backends.registry import register
from mlipuq.emt_data import QUICK_SIZES, copper_datasets
from mlipuq.pipeline import evaluate_run
from mlipuq.training_data import create_run

CENTRES = np.linspace(1.8, 5.0, 16)  # Å, centres of the radial Gaussians


def radial_descriptors(atoms, cutoff: float = 5.5, width: float = 0.3) -> np.ndarray:
    """(n_atoms, 16): sum over neighbours j of exp(-(r_ij - mu)^2 / 2 width^2) f_c(r_ij)."""
    i, d = neighbor_list("id", atoms, cutoff)
    weight = 0.5 * (np.cos(np.pi * d / cutoff) + 1.0)
    gauss = np.exp(-((d[:, None] - CENTRES) ** 2) / (2 * width**2)) * weight[:, None]
    out = np.zeros((len(atoms), len(CENTRES)))
    np.add.at(out, i, gauss)
    return out


class CalculatorBackend:
    """An ASE calculator and a descriptor function as an mlipuq backend."""

    name = "lj_radial"

    def __init__(self, calc, describe, species: list[str]) -> None:
        self.calc, self.describe, self.known_species = calc, describe, species

    def outputs(self, frames, *, batch_size=None) -> ModelOutputs:
        energies, forces, descriptors, species, config = [], [], [], [], []
        for number, atoms in enumerate(frames):
            atoms = atoms.copy()
            atoms.calc = self.calc
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
            descriptors.append(self.describe(atoms))
            species += atoms.get_chemical_symbols()
            config += [number] * len(atoms)
        return ModelOutputs(species=np.array(species), config_index=np.array(config),
                            descriptors=np.vstack(descriptors), energies=np.array(energies),
                            forces=np.vstack(forces))

    @classmethod
    def model_path(cls, run, model_id: str) -> Path:
        return run.models_dir / f"{model_id}.json"

    @classmethod
    def from_run(cls, run, model_id: str, **_) -> CalculatorBackend:
        parameters = json.loads(cls.model_path(run, model_id).read_text())
        return cls(LennardJones(**parameters), radial_descriptors, run.elements)


def main() -> None:
    register(CalculatorBackend.name, CalculatorBackend, overwrite=True)
    data = copper_datasets(seed=0, sizes=QUICK_SIZES)
    train = data.pop("train")
    members = {"model_0": {"sigma": 2.33, "epsilon": 0.41, "rc": 5.5, "smooth": True},
               "model_1": {"sigma": 2.34, "epsilon": 0.40, "rc": 5.5, "smooth": True}}
    with tempfile.TemporaryDirectory() as tmp:
        run = create_run(Path(tmp) / "run", train[:-4], train[-4:],
                         backend=CalculatorBackend.name,
                         meta={"model_ids": list(members), "n_models": len(members)})
        run.models_dir.mkdir(parents=True, exist_ok=True)
        for model_id, parameters in members.items():
            CalculatorBackend.model_path(run, model_id).write_text(json.dumps(parameters))
        metrics = evaluate_run(run, data, out_dir=Path(tmp) / "report",
                               calibration_set=("bulk_300K", 0.5), in_domain=["bulk_300K"])
    print(f"methods fitted: {', '.join(sorted(metrics['methods']))}")
    for name in ("doptimality", "llpr", "ensemble"):
        scores = metrics["methods"][name]["metrics"]
        print(f"{name:12s} ROC-AUC vs in-domain: " + ", ".join(
            f"{test} {scores[test]['roc_auc']:.2f}" for test in data if test != "bulk_300K"))


if __name__ == "__main__":
    main()
