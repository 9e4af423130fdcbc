"""MACE backend: tiny models trained here on EMT copper, checked against MACE itself.

Runs only where mace-torch is installed (its own virtual environment, ``.ci/mace``:
mace-torch pins e3nn 0.4.4, which NequIP cannot use); skipped elsewhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from mlipuq.backends.mace.model import mace_available

if not mace_available():
    pytest.skip("mace-torch is not installed (MACE tests run in .venv-mace: .ci/mace)",
                allow_module_level=True)

import torch  # noqa: E402
from ase.io import write  # noqa: E402

from mlipuq.backends import registry  # noqa: E402
from mlipuq.backends.mace import model as mace_model  # noqa: E402
from mlipuq.backends.mace.training import checkpoint_path, weights_path  # noqa: E402
from mlipuq.emt_data import QUICK_SIZES, copper_datasets  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402

torch.set_num_threads(1)
EPOCHS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    sets = copper_datasets(seed=0, sizes=QUICK_SIZES)
    folder = tmp_path_factory.mktemp("mace_data")
    paths = {}
    for name, frames in sets.items():
        paths[name] = folder / f"{name}.extxyz"
        write(paths[name], frames, format="extxyz")
    return sets, paths


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Two tiny members, epoch-end logging (EMA weights: the saved ones)."""
    _, paths = data
    return registry.get("mace").train(
        paths["train"], tmp_path_factory.mktemp("mace") / "run", preset="tiny",
        epochs=EPOCHS, n_models=2, seed=0, val_fraction=0.1, threads=1, r_max=4.0,
        package=False, overwrite=True, progress=False, log_mode="epoch_end")


def test_run_folder(run):
    folder = RunFolder.open(run.path)
    assert folder.backend == "mace"
    assert folder.meta["trained_epochs"] == {"model_0": EPOCHS, "model_1": EPOCHS}
    assert folder.model_path("model_1") == weights_path(folder, "model_1")
    for model_id in folder.model_ids:
        assert list(folder.store.epochs(model_id)) == list(range(EPOCHS))
    assert folder.metrics_path("model_0").read_text().count("\n") == EPOCHS + 1


def test_features_in_atom_table_order_equal_mace(run, data):
    """Descriptors of a batch = MACE's own get_descriptors(invariants_only) frame by frame."""
    sets, _ = data
    frames = sets["vacancy"][:3] + sets["bulk_300K"][:2]
    backend = registry.load(run, "model_0")
    out = backend.outputs(frames, batch_size=2)
    assert out.descriptors.shape == (sum(len(a) for a in frames), 16)  # 8 channels x 2 layers
    mace = mace_model.import_mace()
    calc = mace.MACECalculator(models=[backend.model_], default_dtype="float64")
    for number, atoms in enumerate(frames):
        rows = out.config_index == number
        expected = calc.get_descriptors(atoms, invariants_only=True)
        np.testing.assert_allclose(out.descriptors[rows], expected, rtol=1e-5, atol=1e-6)
        atoms = atoms.copy()
        atoms.calc = calc
        np.testing.assert_allclose(out.forces[rows], atoms.get_forces(), atol=1e-10)
        assert out.energies[number] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)


def test_last_epoch_equals_saved_model(run):
    frames = run.train_frames()
    out = registry.load(run, "model_1").outputs(frames)
    reference = np.concatenate([a.get_forces() for a in frames])
    recomputed = np.linalg.norm(out.forces - reference, axis=1)
    np.testing.assert_allclose(run.store.read("model_1")[-1], recomputed, rtol=1e-5,
                               atol=1e-6)
    energy = np.abs(out.energies - np.array([a.get_potential_energy() for a in frames]))
    np.testing.assert_allclose(run.store.read_energy_errors("model_1")[-1], energy,
                               rtol=1e-6, atol=1e-8)


def test_in_batch_rows_map_to_atoms(data, tmp_path):
    """With lr = 0 the weights never move: every in-batch epoch equals the saved model's
    errors, which checks the mapping of shuffled batches to atom-table rows."""
    _, paths = data
    run = registry.get("mace").train(
        paths["train"], tmp_path / "run", preset="tiny", epochs=2, n_models=1, seed=3,
        threads=1, r_max=4.0, progress=False, preset_overrides={"lr": 0.0})
    assert run.meta["log_mode"] == "in_batch"
    frames = run.train_frames()
    out = registry.load(run, "model_0").outputs(frames)
    recomputed = np.linalg.norm(out.forces - np.concatenate([a.get_forces() for a in frames]),
                                axis=1)
    logged = run.store.read("model_0")
    np.testing.assert_allclose(logged, np.stack([recomputed] * 2), rtol=1e-5, atol=1e-6)


def test_resume_after_a_kill(data, tmp_path):
    """A member stopped after epoch 0 (checkpoint kept, run.json unfinished) continues
    to the same result as an uninterrupted run."""
    _, paths = data
    options = dict(preset="tiny", n_models=1, seed=5, threads=1, r_max=4.0, progress=False)
    whole = registry.get("mace").train(paths["train"], tmp_path / "whole", epochs=2, **options)
    part = registry.get("mace").train(paths["train"], tmp_path / "part", epochs=1, **options)
    # pretend the kill came after epoch 0: training unfinished, no final model
    part.meta["trained_epochs"] = {}
    part.save_meta()
    weights_path(part, "model_0").unlink()
    with pytest.raises(InputError, match="did not finish"):
        RunFolder.open(part.path)
    resumed = registry.get("mace").train(paths["train"], part.path, epochs=2, resume=True,
                                         **options)
    assert list(resumed.store.epochs("model_0")) == [0, 1]
    assert checkpoint_path(resumed, "model_0").is_file()
    np.testing.assert_allclose(resumed.store.read("model_0"), whole.store.read("model_0"),
                               rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def evaluated(run, data, tmp_path_factory):
    """``evaluate_run`` on the MACE run (fits and saves LTAU, D-optimality, ensemble)."""
    from mlipuq.pipeline import evaluate_run

    _, paths = data
    out = tmp_path_factory.mktemp("mace_report")
    tests = {name: paths[name] for name in ("bulk_300K", "vacancy")}
    metrics = evaluate_run(run, tests, out_dir=out / "report",
                           calibration_set=("bulk_300K", 0.5), in_domain=["bulk_300K"],
                           methods=["ltau", "doptimality", "ensemble"], refit=True)
    return metrics, out / "report"


def test_evaluate(evaluated):
    metrics, report = evaluated
    assert (report / "index.html").is_file()
    assert {"ltau", "doptimality", "ensemble"} <= set(metrics["methods"])
    assert metrics["run"]["backend"] == "mace"


def test_calculator_forces_and_uncertainty(run, data, evaluated):
    """Forces equal MACE's MACECalculator; LTAU and D-optimality come from the same pass
    and equal the estimators' predictions on the backend's outputs."""
    sets, _ = data
    calc = registry.calculator(run, "model_0", keep_descriptors=True)
    assert set(calc.estimators) == {"ltau", "doptimality"}
    atoms = sets["vacancy"][0].copy()
    atoms.calc = calc
    forces = atoms.get_forces()
    mace = mace_model.import_mace()
    plain = mace.MACECalculator(models=[calc.models[0]], default_dtype="float64")
    reference = sets["vacancy"][0].copy()
    reference.calc = plain
    np.testing.assert_allclose(forces, reference.get_forces(), atol=1e-12)
    out = registry.load(run, "model_0").outputs([atoms])
    np.testing.assert_allclose(calc.results["descriptors"], out.descriptors, rtol=1e-5,
                               atol=1e-6)
    for name, estimator in calc.estimators.items():
        expected = estimator.predict(out).atom_uncertainty
        np.testing.assert_allclose(calc.results[f"{name}_uncertainty"], expected, rtol=1e-4,
                                   atol=1e-6)


def test_simulate_a_few_md_steps(run, data, evaluated, tmp_path):
    from mlipuq.simulation import run_simulation

    sets, _ = data
    calc = registry.calculator(run, "model_0")
    log = run_simulation(sets["bulk_300K"][0], calc, steps=3, timestep_fs=1.0,
                         log_path=tmp_path / "md.extxyz")
    from ase.io import read

    frames = read(tmp_path / "md.extxyz", ":")
    assert len(frames) >= 3
    assert "ltau_uncertainty" in frames[-1].arrays
    assert np.all(np.isfinite(frames[-1].arrays["ltau_uncertainty"]))
    assert list(log.steps) == [0, 1, 2, 3]
    assert {"ltau_uncertainty", "doptimality_uncertainty"} <= set(log.uncertainty_max)


def test_safe_loading(run, tmp_path):
    """mlipuq reads weights with weights_only=True: a pickled module is refused; the
    MACE-format export is an explicit extra file; importing mace changes no env."""
    path = weights_path(run, "model_0")
    export = mace_model.export_mace_model(path, tmp_path / "model_0.model")
    assert export.is_file()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(export.read_bytes())
    bad.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(InputError, match="not a plain weights file"):
        mace_model.load_model(bad)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_processes_and_build_leave_no_side_effects(tmp_path, capsys):
    """--processes 2 is a one-line error (MACE members train in one process), and
    building a model from its hyper-parameters leaves the caller's torch RNG alone."""
    from mlipuq.cli import main

    status = main(["train", str(tmp_path / "train.extxyz"), "--run", str(tmp_path / "run"),
                   "--backend", "mace", "--processes", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--processes 2: the MACE backend" in err[0]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    from mlipuq.backends.mace.training import PRESETS

    keys = ("num_interactions", "num_channels", "max_L", "max_ell", "correlation",
            "num_bessel", "num_polynomial_cutoff", "radial_mlp", "mlp_irreps", "dtype")
    hyper = {**{key: PRESETS["tiny"][key] for key in keys}, "seed": 7, "r_max": 4.0,
             "elements": ["Cu"], "atomic_numbers": [29], "atomic_energies": [0.0],
             "avg_num_neighbors": 10.0, "atomic_inter_scale": 1.0, "atomic_inter_shift": 0.0}
    first = mace_model.build_model(hyper)
    np.testing.assert_array_equal(torch.rand(3), expected)
    again = mace_model.build_model(hyper)  # the weights still follow the seed
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
