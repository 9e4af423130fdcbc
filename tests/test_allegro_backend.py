"""The Allegro backend: tiny Allegro models trained through NequIP on EMT copper.

One module-level run (2 members, 2 epochs, 12 frames, packaged) serves every test:
descriptors against a direct model call, forces against NequIP's own calculator,
the logged last epoch against errors recomputed from the saved model, LTAU /
D-optimality / LLPR on the descriptors, and the run through ``evaluate_run``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("nequip")
pytest.importorskip("allegro")

from mlipuq.atom_table import AtomTable  # noqa: E402
from mlipuq.backends import registry  # noqa: E402
from mlipuq.backends.nequip.allegro import AllegroBackend  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from nequip_support import TINY_R_MAX, make_emt_copper_frames, write_frames  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("allegro")
    data = write_frames(directory / "cu_train.extxyz", make_emt_copper_frames(12, seed=0))
    return registry.get("allegro").train(
        data, directory / "run", preset="tiny", epochs=2, n_models=2, seed=0,
        val_fraction=0.25, threads=1, r_max=TINY_R_MAX, package=True, overwrite=True,
        progress=False,
    )


@pytest.fixture(scope="module")
def frames():
    """Frames of two sizes (8 and 16 atoms), so batches mix graph sizes."""
    small = make_emt_copper_frames(3, seed=3)
    large = make_emt_copper_frames(2, seed=4, repeat=(2, 2, 1))
    return [small[0], large[0], small[1], large[1], small[2]]


@pytest.fixture(scope="module")
def backend(run):
    return registry.load(run, "model_0", batch_size=3)


def _nequip_calculator(path):
    from nequip.integrations.ase import NequIPCalculator

    return NequIPCalculator._from_saved_model(str(path), chemical_species_to_atom_type_map=True)


def _direct_descriptors(model_path, frames) -> np.ndarray:
    """The descriptors rebuilt from a plain model call (no hooks), frame by frame:
    readout MLP minus its last layer on the output ``edge_features``, summed over each
    centre atom's edges with numpy, times 1/sqrt(avg_num_neighbors)/sqrt(2)."""
    import torch
    from nequip.data import AtomicDataDict

    from mlipuq.backends.nequip.allegro import _find_readout
    from mlipuq.backends.nequip.features import _batch, load_model, model_transforms

    model = load_model(model_path)
    readout, energy_sum = _find_readout(model)
    hidden_layers = readout.mlp_module.mlp[:-1]
    norm = float(energy_sum.norm_module.norm_const.reshape(-1)[0])
    transforms = model_transforms(model.metadata)
    rows = []
    for atoms in frames:
        out = model(_batch([atoms], transforms, "cpu"))
        with torch.no_grad():
            hidden = hidden_layers(out[AtomicDataDict.EDGE_FEATURES_KEY]).double().numpy()
        centre = out[AtomicDataDict.EDGE_INDEX_KEY][0].numpy()
        summed = np.zeros((len(atoms), hidden.shape[1]))
        np.add.at(summed, centre, hidden)
        rows.append(summed * norm / math.sqrt(2.0))
    return np.concatenate(rows)


def test_run_is_an_allegro_run(run):
    assert run.backend == "allegro"
    assert registry.get(run.backend) is AllegroBackend
    assert run.meta["nequip_allegro_version"] != "absent"
    from mlipuq.backends.nequip.config import load_yaml

    member = load_yaml(run.config_path("model_0"))
    assert member["training_module"]["model"]["_target_"] == "allegro.model.AllegroModel"
    callbacks = [c["_target_"] for c in member["trainer"]["callbacks"]]
    assert "mlipuq.backends.nequip.callback.ErrorTrajectoryCallback" in callbacks
    assert str(run.model_path("model_0")).endswith(".nequip.zip")


def test_descriptors_in_atom_table_order_equal_a_direct_model_call(run, backend, frames):
    out = backend.outputs(frames)  # batches of 3 mixing 8- and 16-atom frames
    table = AtomTable.from_atoms(frames)
    np.testing.assert_array_equal(out.config_index, table.config_index)
    np.testing.assert_array_equal(out.species, table.species)
    direct = _direct_descriptors(run.model_path("model_0"), frames)
    assert out.descriptors.shape == direct.shape == (table.n_atoms, 8)  # tiny readout width
    assert out.descriptors.dtype == np.float32
    np.testing.assert_allclose(out.descriptors, direct, rtol=1e-5, atol=1e-6)
    assert np.abs(direct).max() > 1e-3  # not trivially zero


def test_atom_energy_is_linear_in_the_descriptors(run, backend, frames):
    """The descriptors are what the linear energy readout sees: E_i = a x_i.w + b."""
    calc = _nequip_calculator(run.model_path("model_0"))
    per_atom = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
        per_atom.append(calc.results["energies"])
    per_atom = np.concatenate(per_atom)
    desc = backend.outputs(frames).descriptors.astype(np.float64)
    design = np.hstack([desc, np.ones((len(desc), 1))])
    coef, *_ = np.linalg.lstsq(design, per_atom, rcond=None)
    spread = np.abs(per_atom - per_atom.mean()).max()
    assert len(desc) > desc.shape[1] + 1 and spread > 1e-4
    assert np.abs(per_atom - design @ coef).max() < 1e-4 * spread


def test_forces_equal_nequip_calculator(run, backend, frames):
    from mlipuq.backends.nequip.allegro import AllegroUQCalculator

    out = backend.outputs(frames)
    reference = _nequip_calculator(run.model_path("model_0"))
    ours = AllegroUQCalculator.from_run(run.path, model_id="model_0", estimators=None,
                                        keep_descriptors=True)
    for number in (0, 1):
        atoms = frames[number].copy()
        atoms.calc = reference
        forces, energy = atoms.get_forces(), atoms.get_potential_energy()
        rows = out.config_index == number
        np.testing.assert_allclose(out.forces[rows], forces, atol=1e-6)
        assert out.energies[number] == pytest.approx(energy, rel=1e-9)
        atoms = frames[number].copy()
        atoms.calc = ours
        np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-6)
        assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-9)
        np.testing.assert_allclose(ours.results["descriptors"], out.descriptors[rows],
                                   atol=1e-5)


def test_last_logged_epoch_equals_errors_from_the_saved_model(run):
    """epoch_end logging with EMA weights == last.ckpt (EMA) evaluated afresh."""
    frames = run.train_frames()
    for model_id in run.model_ids:
        saved = AllegroBackend(run.checkpoint_path(model_id, "last")).outputs(frames)
        reference = np.concatenate([atoms.get_forces() for atoms in frames])
        recomputed = np.linalg.norm(saved.forces - reference, axis=1)
        np.testing.assert_array_equal(run.store.epochs(model_id), [0, 1])
        np.testing.assert_allclose(run.store.final_errors(model_id), recomputed,
                                   rtol=1e-5, atol=1e-6)
        energy = np.abs(saved.energies - [a.get_potential_energy() for a in frames])
        np.testing.assert_allclose(run.store.read_energy_errors(model_id)[-1], energy,
                                   rtol=1e-6, atol=1e-7)


def test_ltau_doptimality_llpr_fit_predict_and_attach_to_the_calculator(run, backend,
                                                                         frames):
    from mlipuq.run_methods import fit_methods

    fitted = fit_methods(run, methods=["ltau", "doptimality", "llpr"], threads=1)
    out = backend.outputs(frames)
    for name, method in fitted.items():
        result = method.predict(out)
        assert result.atom_uncertainty.shape == (out.n_atoms,), name
        assert np.all(np.isfinite(result.atom_uncertainty)), name
    # the calculator drives the fitted methods from its own forward pass
    calc = AllegroBackend.uq_calculator(run, "model_0")
    assert set(calc.estimators) == {"ltau", "doptimality", "llpr"}
    atoms = frames[1].copy()
    atoms.calc = calc
    atoms.get_forces()
    rows = out.config_index == 1
    for name, method in fitted.items():
        expected = method.predict(out.subset(np.arange(len(frames)) == 1))
        np.testing.assert_allclose(calc.results[f"{name}_uncertainty"],
                                   expected.atom_uncertainty, rtol=1e-4, atol=1e-6)
        assert calc.results[f"{name}_uncertainty"].shape == (int(rows.sum()),)


def test_a_tiny_run_goes_through_evaluate(run, tmp_path):
    from mlipuq.pipeline import evaluate_run

    tests = {"bulk": make_emt_copper_frames(6, seed=11),
             "hot": make_emt_copper_frames(4, seed=12, temperature=2500.0)}
    metrics = evaluate_run(run, tests, out_dir=tmp_path / "report", in_domain=["bulk"],
                           calibration_set=("bulk", 0.5), threads=1)
    assert {"ltau", "doptimality", "llpr", "ensemble"} <= set(metrics["methods"])
    assert (tmp_path / "report" / "index.html").is_file()
    ltau = metrics["methods"]["ltau"]["metrics"]
    assert ltau["all"]["roc_auc"] is None or 0.0 <= ltau["all"]["roc_auc"] <= 1.0


def test_a_nequip_model_is_refused(tmp_path):
    """The allegro backend on a model without an edge readout: one clear line."""
    from mlipuq.backends.nequip.allegro import install_descriptor_hooks

    class NotAllegro:
        def modules(self):
            return iter(())

    with pytest.raises(InputError, match="not an Allegro model"):
        install_descriptor_hooks(NotAllegro())


def test_train_refuses_another_architecture(tmp_path):
    with pytest.raises(InputError, match="architecture"):
        AllegroBackend.train(tmp_path / "x.extxyz", tmp_path / "run", architecture="nequip")
