"""pacemaker ACE from the command line: train (linear ACE fit or your own potentials),
fit (with ``.asi`` files), evaluate, simulate, select.

Small EMT copper sets generated here (:func:`mlipuq.emt_data.md_frames`); every
comparison with pacemaker is against python-ace's own ``PyACECalculator``
(energies, forces, ``set_active_set`` gamma).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("pyace", reason="python-ace is not installed (pip install 'mlipuq[pace]')")

from pyace.activelearning import load_active_inverse_set  # noqa: E402
from pyace.asecalc import PyACECalculator  # noqa: E402

from mlipuq.backends.pace import PaceBackend  # noqa: E402
from mlipuq.cli import main  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402


def _write(path, frames):
    from ase.io import write

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unhashable information")
        write(path, frames, format="extxyz")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Bulk 300 K training frames and vacancy / 1200 K test frames (32-atom cells)."""
    from mlipuq.emt_data import bulk_copper, md_frames

    root = tmp_path_factory.mktemp("pace_data")
    cell = bulk_copper(2)
    vacancy = cell.copy()
    del vacancy[0]
    common = {"interval": 3, "equilibration": 10}
    sets = {
        "train": md_frames(cell, temperature_K=300.0, n_frames=20, config_type="bulk_300K",
                           seed=0, **common),
        "bulk_300K": md_frames(cell, temperature_K=300.0, n_frames=6, config_type="bulk_300K",
                               seed=1, **common),
        "hot": md_frames(cell, temperature_K=1200.0, n_frames=4, config_type="hot", seed=2,
                         **common),
        "vacancy": md_frames(vacancy, temperature_K=300.0, n_frames=4, config_type="vacancy",
                             seed=3, **common),
    }
    return {name: _write(root / f"{name}.extxyz", frames) for name, frames in sets.items()}


def _cli(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def fitted_run(data, tmp_path_factory):
    """``mlipuq train --backend pace`` (linear ACE, 2 members) then ``mlipuq fit``."""
    run = str(tmp_path_factory.mktemp("pace_run") / "run")
    assert main(["-q", "train", "--backend", "pace", data["train"], "--run", run,
                 "--preset", "tiny", "--epochs", "30", "-M", "2", "--r-max", "4.0",
                 "--val-fraction", "0.25"]) == 0
    assert main(["-q", "fit", "--run", run, "--clusters", "2"]) == 0
    return RunFolder.open(run)


# ---------------------------------------------------------------------------- train


def test_linear_fit_gives_a_usable_potential_with_trajectories(fitted_run):
    run = fitted_run
    assert run.backend == "pace" and run.model_ids == ["model_0", "model_1"]
    assert run.unfinished_members() == []
    store = run.store
    assert store.model_ids() == ["model_0", "model_1"]
    norms = store.read_norms("model_0")
    assert norms.shape == (30, store.n_atoms)
    assert norms[-1].mean() < norms[0].mean()  # the solver reduces the training errors
    for model_id in run.model_ids:
        errors = run.meta["fit_errors"][model_id]
        assert errors["val_force_rmse"] < 0.05  # eV/Å, EMT forces are ~0.3 eV/Å
    # bootstrap members differ
    first, second = (PaceBackend.from_run(run, m).basis.basis_coeffs for m in run.model_ids)
    assert not np.allclose(first, second)


def test_last_logged_epoch_equals_errors_of_the_saved_potential(fitted_run):
    """The store's last epoch is the force error of the potential written to the run,
    recomputed here by pyace on every training atom (atom-table order)."""
    run = fitted_run
    frames = run.train_frames()
    reference = np.concatenate([atoms.get_forces() for atoms in frames])
    for model_id in run.model_ids:
        predicted = PaceBackend.from_run(run, model_id).outputs(frames).forces
        recomputed = np.linalg.norm(reference - predicted, axis=1)
        logged = run.store.read_norms(model_id)[-1]
        np.testing.assert_allclose(logged, recomputed, rtol=1e-4, atol=1e-6)


def test_calculator_forces_equal_pyace(fitted_run, data):
    from ase.io import read

    atoms = read(data["vacancy"], 0)
    reference = atoms.copy()
    reference.calc = PyACECalculator(str(run_model(fitted_run)))
    reference.calc.set_active_set(
        str(fitted_run.path / "methods" / "doptimality" / "active_set.asi"))
    calc = PaceBackend.uq_calculator(fitted_run, "model_0")
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-12)
    assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(),
                                                         abs=1e-10)
    assert {"doptimality", "clustered_doptimality", "llpr", "ltau"} <= set(calc.estimators)
    # the same evaluation's projections give pacemaker's own gamma (float64 kept)
    np.testing.assert_allclose(calc.results["doptimality_uncertainty"],
                               reference.calc.results["gamma"], rtol=1e-8, atol=1e-10)
    # the backend's outputs (one evaluation per frame) are pyace's numbers too
    outputs = PaceBackend.from_run(fitted_run, "model_0").outputs([atoms])
    np.testing.assert_allclose(outputs.forces, reference.get_forces(), atol=1e-12)


def run_model(run):
    return PaceBackend.model_path(run, "model_0")


# ---------------------------------------------------------------------------- .asi


def test_asi_written_at_fit_gives_our_gamma_in_pacemaker(fitted_run, data):
    from ase.io import read

    from mlipuq.run_methods import load_run_method

    directory = fitted_run.path / "methods" / "doptimality"
    asi = directory / "active_set.asi"
    assert asi.is_file()
    assert set(load_active_inverse_set(str(asi))) == {0}  # pyace reads it: one species type
    estimator = load_run_method(fitted_run, "doptimality", model_id="model_0")
    backend = PaceBackend.from_run(fitted_run, "model_0")
    frames = read(data["vacancy"], ":") + read(data["hot"], ":2")
    ours = estimator.predict(backend.outputs(frames)).atom_uncertainty
    theirs = []
    for atoms in frames:
        calc = PyACECalculator(str(run_model(fitted_run)))
        calc.set_active_set(str(asi))
        atoms.calc = calc
        atoms.get_potential_energy()
        theirs.append(calc.results["gamma"])
    np.testing.assert_allclose(np.concatenate(theirs), ours, rtol=1e-8, atol=1e-10)
    assert np.max(ours) > 1.0  # the test frames do extrapolate somewhere


def test_clustered_asi_files_give_min_over_clusters(fitted_run, data):
    from ase.io import read

    from mlipuq.run_methods import load_run_method

    files = sorted((fitted_run.path / "methods" / "clustered_doptimality").glob("*.asi"))
    estimator = load_run_method(fitted_run, "clustered_doptimality", model_id="model_0")
    assert len(files) == estimator.n_clusters_ and len(files) >= 1
    atoms = read(data["vacancy"], 0)
    backend = PaceBackend.from_run(fitted_run, "model_0")
    ours = estimator.predict(backend.outputs([atoms])).atom_uncertainty
    grades = []
    for path in files:
        calc = PyACECalculator(str(run_model(fitted_run)))
        calc.set_active_set(str(path))
        atoms.calc = calc
        atoms.get_potential_energy()
        grades.append(calc.results["gamma"])
    np.testing.assert_allclose(np.min(grades, axis=0), ours, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------- evaluate, simulate, select


def test_evaluate_reports_every_method(fitted_run, data, tmp_path, capsys):
    out = tmp_path / "report"
    status, stdout, err = _cli(
        capsys, "-q", "evaluate", "--run", str(fitted_run.path), "-o", str(out),
        "--test", f"bulk_300K={data['bulk_300K']}", "--test", f"hot={data['hot']}",
        "--test", f"vacancy={data['vacancy']}", "--calibrate-on", "bulk_300K:0.5")
    assert status == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    text = json.dumps(metrics)
    for name in ("ltau", "ensemble", "doptimality", "clustered_doptimality", "llpr"):
        assert f'"{name}' in text
    assert (out / "index.html").is_file()


def test_simulate_then_select(fitted_run, data, tmp_path, capsys):
    traj = tmp_path / "md.extxyz"
    status, stdout, err = _cli(
        capsys, "-q", "simulate", "--run", str(fitted_run.path), "--structure", data["vacancy"],
        "--kind", "md", "--steps", "4", "--temperature", "600", "--out", str(traj))
    assert status == 0, err
    from ase.io import read

    frames = read(traj, ":")
    assert len(frames) == 5
    assert frames[-1].arrays["doptimality_uncertainty"].shape == (31,)
    picked = tmp_path / "picked.extxyz"
    status, stdout, err = _cli(
        capsys, "-q", "select", "--candidates", str(traj), "--uncertainty-key",
        "doptimality_uncertainty", "--threshold", "0", "--budget", "2", "--out", str(picked))
    assert status == 0, err
    assert len(read(picked, ":")) == 2


# ---------------------------------------------------------------------------- bring your own


def test_your_own_potentials_make_a_run_without_ltau(fitted_run, data, tmp_path, capsys):
    from mlipuq.provenance import file_sha256
    from mlipuq.run_methods import available_methods

    sources = []
    for model_id in fitted_run.model_ids:  # "your" potentials: copies outside any run
        path = tmp_path / f"{model_id}_mine.yaml"
        path.write_bytes(PaceBackend.model_path(fitted_run, model_id).read_bytes())
        sources.append(str(path))
    run_dir = tmp_path / "byo"
    status, stdout, err = _cli(
        capsys, "-q", "train", "--backend", "pace", "--potential", sources[0], "--potential",
        sources[1], data["train"], "--run", str(run_dir))
    assert status == 0, err
    run = RunFolder.open(run_dir)
    assert run.model_ids == ["model_0", "model_1"] and not run.store_path.exists()
    for record, source in zip(run.meta["potentials"], sources, strict=True):
        assert record["sha256"] == file_sha256(source)
    assert "ltau" not in available_methods(run)
    assert "ensemble" in available_methods(run)
    status, stdout, err = _cli(capsys, "-q", "fit", "--run", str(run_dir), "--methods",
                               "doptimality", "ensemble")
    assert status == 0, err
    assert (run_dir / "methods" / "doptimality" / "active_set.asi").is_file()
    assert not list((run_dir / "methods" / "ensemble").glob("*.asi"))


@pytest.mark.parametrize("argv, message", [
    (["--backend", "nequip", "--potential", "{pot}"], "cannot use your own potentials"),
    (["--backend", "pace", "--potential", "missing.yaml"], "file not found"),
    (["--backend", "pace", "--isolated", "{train}"], "no per-element energy shift"),
])
def test_bad_train_input_is_one_line(data, tmp_path, capsys, fitted_run, argv, message):
    pot = str(run_model(fitted_run))
    argv = [a.format(pot=pot, train=data["train"]) for a in argv]
    status, stdout, err = _cli(capsys, "train", *argv, data["train"], "--run",
                               str(tmp_path / "r"))
    assert status == 2 and message in err and "Traceback" not in err


def test_processes_is_refused_in_one_line(tmp_path, capsys):
    """pace fits run in one process: --processes 2 is a one-line usage error."""

    status = main(["train", str(tmp_path / "train.extxyz"), "--run", str(tmp_path / "run"),
                   "--backend", "pace", "--processes", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "--processes: a pace fit runs in one process" in err[0]
