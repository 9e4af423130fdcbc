"""``mlipuq ltau fit/predict`` in-process on small EMT Cu/Au data with random descriptors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from mlipuq import AtomTable
from mlipuq.cli import main
from mlipuq.ltau import LTAUEstimator
from mlipuq.trajectory_store import TrajectoryStore

DIM = 6


def emt_frames(n_frames: int, seed: int, config_types: list[str]) -> list:
    """Rattled fcc Cu with some Au, EMT energies (eV) and forces (eV/Å)."""
    rng = np.random.default_rng(seed)
    frames = []
    for number in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))  # 8 atoms
        symbols = atoms.get_chemical_symbols()
        symbols[number % 8] = "Au"
        atoms.set_chemical_symbols(symbols)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        atoms.info["config_type"] = config_types[number % len(config_types)]
        frames.append(atoms)
    return frames


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    train = emt_frames(12, 1, ["bulk"])
    test = emt_frames(6, 2, ["bulk", "hot"])
    write(tmp_path / "train.extxyz", train)
    write(tmp_path / "test.extxyz", test)
    n_train, n_test = 8 * len(train), 8 * len(test)
    np.save(tmp_path / "train_desc.npy", rng.normal(size=(n_train, DIM)).astype(np.float32))
    np.save(tmp_path / "test_desc.npy", rng.normal(size=(n_test, DIM)).astype(np.float32))
    np.save(tmp_path / "errors_m0.npy", rng.gamma(2.0, 0.05, size=(20, n_train)))
    np.save(tmp_path / "errors_m1.npy", rng.gamma(2.0, 0.04, size=(12, n_train)))
    return tmp_path


def test_fit_predict_writes_arrays_and_summary(files, capsys):
    status = main([
        "ltau", "fit", "--errors", str(files / "errors_m0.npy"), str(files / "errors_m1.npy"),
        "--descriptors", str(files / "train_desc.npy"), "--structures",
        str(files / "train.extxyz"), "--out", str(files / "est"), "--k", "3", "--rtol", "0.01",
    ])
    assert status == 0
    captured = capsys.readouterr()  # the result on stdout, progress on stderr
    assert captured.out.startswith(f"estimator: {files / 'est'} (atol = ")
    assert "atol = " not in captured.err and "mlipuq: [" in captured.err
    status = main([
        "ltau", "predict", "--estimator", str(files / "est"), "--descriptors",
        str(files / "test_desc.npy"), "--structures", str(files / "test.extxyz"),
        "--out", str(files / "results.extxyz"), "--summary", str(files / "summary.json"),
        "--scale", "2.0", "--threshold", "0.5",
    ])
    assert status == 0
    assert capsys.readouterr().out.splitlines() == [
        f"results: {files / 'results.extxyz'}", f"summary: {files / 'summary.json'}"]

    # the same computation through the API
    train = read(files / "train.extxyz", ":")
    test = read(files / "test.extxyz", ":")
    table = AtomTable.from_atoms(test)
    errors = [np.load(files / f"errors_m{m}.npy") for m in (0, 1)]
    est = LTAUEstimator(k=3, rtol=0.01).fit_arrays(
        errors, np.load(files / "train_desc.npy"), AtomTable.from_atoms(train).species,
        force_norm=AtomTable.from_atoms(train).force_norm,
        config_index=AtomTable.from_atoms(train).config_index,
    )
    expected = est.predict_arrays(np.load(files / "test_desc.npy"), table.species, scale=2.0,
                           config_index=table.config_index, threshold=0.5)

    results = read(files / "results.extxyz", ":")
    assert len(results) == 6
    got = {key: np.concatenate([a.arrays[key] for a in results]) for key in
           ("ltau_uncertainty", "ltau_p", "ltau_expected_error", "ltau_knn_distance")}
    np.testing.assert_allclose(got["ltau_uncertainty"], expected.atom_uncertainty, atol=1e-7)
    np.testing.assert_allclose(got["ltau_p"], expected.extras["p"], atol=1e-7)
    np.testing.assert_allclose(got["ltau_expected_error"], expected.extras["expected_error"],
                               rtol=1e-6)
    np.testing.assert_allclose(got["ltau_knn_distance"], expected.extras["knn_distance"],
                               rtol=1e-6)
    np.testing.assert_allclose([a.info["ltau_config_uncertainty"] for a in results],
                               expected.config_uncertainty, atol=1e-7)
    np.testing.assert_allclose(results[0].get_forces(), test[0].get_forces())  # kept

    summary = json.loads((files / "summary.json").read_text())
    assert summary["atol"] == pytest.approx(est.atol_)
    assert summary["scale"] == 2.0 and summary["k"] == 3
    assert summary["index_kinds"] == {"Au": "flat", "Cu": "flat"}
    assert summary["overall"]["n_atoms"] == 48 and summary["overall"]["n_configs"] == 6
    hot = table.atom_group == "hot"
    assert summary["by_config_type"]["hot"]["n_atoms"] == 24
    assert summary["by_config_type"]["hot"]["mean_atom_uncertainty"] == pytest.approx(
        expected.atom_uncertainty[hot].mean()
    )
    assert summary["by_config_type"]["bulk"]["max_config_uncertainty"] == pytest.approx(
        expected.config_uncertainty[0::2].max()
    )
    assert summary["overall"]["n_flagged_atoms"] == int((expected.atom_uncertainty > 0.5).sum())


def test_fit_from_store_checks_the_atom_table(files, capsys):
    train = read(files / "train.extxyz", ":")
    table = AtomTable.from_atoms(train)
    store = TrajectoryStore.create(files / "store", table)
    writer = store.writer("m0")
    for row in np.load(files / "errors_m0.npy"):
        writer.append(row)
    args = ["ltau", "fit", "--store", str(files / "store"), "--descriptors",
            str(files / "train_desc.npy"), "--out", str(files / "est"), "--index", "hnsw"]
    assert main([*args, "--structures", str(files / "train.extxyz")]) == 0
    loaded = LTAUEstimator.load(files / "est")
    assert loaded.index_kinds_ == {"Au": "hnsw", "Cu": "hnsw"}
    assert loaded.atol_ == pytest.approx(np.load(files / "errors_m0.npy")[-1].mean(), rel=1e-6)
    capsys.readouterr()

    write(files / "other.extxyz", train[::-1])  # same atoms, other order
    assert main([*args, "--structures", str(files / "other.extxyz")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mlipuq: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]  # after the stage lines
    assert errors[0].startswith("mlipuq: error: --structures:")
    assert "is not the training set of the store" in errors[0]


def test_bad_input_exits_2_with_one_line(files, capsys):
    fit = ["ltau", "fit", "--errors", str(files / "errors_m0.npy"), "--structures",
           str(files / "train.extxyz"), "--out", str(files / "est")]
    np.save(files / "short.npy", np.zeros((5, DIM)))
    assert main([*fit, "--descriptors", str(files / "short.npy")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("mlipuq: error: descriptors:")
    assert "has 5 rows but" in err and "has 96 atoms" in err

    assert main([*fit, "--descriptors", str(files / "missing.npy")]) == 2
    assert "descriptors: file" in capsys.readouterr().err

    assert main([*fit, "--descriptors", str(files / "train_desc.npy")]) == 0
    capsys.readouterr()
    np.save(files / "narrow.npy", np.zeros((48, 4)))
    status = main(["ltau", "predict", "--estimator", str(files / "est"), "--descriptors",
                   str(files / "narrow.npy"), "--structures", str(files / "test.extxyz"),
                   "--out", str(files / "r.extxyz")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "mlipuq: error: descriptors: expected 6 features per row, got 4"
    )
    assert not (files / "r.extxyz").exists()

    status = main(["ltau", "predict", "--estimator", str(files), "--descriptors",
                   str(files / "test_desc.npy"), "--structures", str(files / "test.extxyz"),
                   "--out", str(files / "r.extxyz")])
    assert status == 2
    assert "not an mlipuq estimator" in capsys.readouterr().err


def test_calibrate_stores_scale_and_threshold_used_by_predict(files, capsys):
    """Plain-files calibration: descriptors, reference forces (extxyz), predicted forces."""
    status = main([
        "ltau", "fit", "--errors", str(files / "errors_m0.npy"), "--descriptors",
        str(files / "train_desc.npy"), "--structures", str(files / "train.extxyz"),
        "--out", str(files / "est"), "--k", "3",
    ])
    assert status == 0
    capsys.readouterr()
    cal = emt_frames(10, 3, ["bulk"])
    write(files / "cal.extxyz", cal)
    rng = np.random.default_rng(4)
    cal_desc = rng.normal(size=(80, DIM)).astype(np.float32)
    np.save(files / "cal_desc.npy", cal_desc)
    reference = np.concatenate([a.get_forces() for a in cal])
    predicted = reference + rng.normal(0, 0.08, size=reference.shape)  # eV/Å
    np.save(files / "cal_forces.npy", predicted)
    status = main([
        "ltau", "calibrate", "--estimator", str(files / "est"), "--descriptors",
        str(files / "cal_desc.npy"), "--structures", str(files / "cal.extxyz"),
        "--predicted-forces", str(files / "cal_forces.npy"), "--fpr", "0.1",
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.startswith(f"estimator: {files / 'est'} (s = ")
    assert "threshold" in captured.out
    stored = LTAUEstimator.load(files / "est")
    # the same calibration through the API
    table = AtomTable.from_atoms(cal)
    direct = LTAUEstimator.load(files / "est")
    direct.calibrate_arrays(cal_desc, table.species, np.linalg.norm(reference - predicted, axis=1),
                     config_index=table.config_index, fpr=0.1)
    assert stored.scale_ == pytest.approx(direct.scale_) and stored.scale_ != 1.0
    assert stored.threshold_ == pytest.approx(direct.threshold_)
    assert stored.calibration_["fpr"] == 0.1
    # predict without --scale / --threshold uses the stored ones
    status = main([
        "ltau", "predict", "--estimator", str(files / "est"), "--descriptors",
        str(files / "test_desc.npy"), "--structures", str(files / "test.extxyz"),
        "--out", str(files / "results.extxyz"), "--summary", str(files / "summary.json"),
    ])
    assert status == 0
    test = AtomTable.from_atoms(read(files / "test.extxyz", ":"))
    expected = stored.predict_arrays(np.load(files / "test_desc.npy"), test.species,
                              config_index=test.config_index)
    results = read(files / "results.extxyz", ":")
    got = np.concatenate([a.arrays["ltau_p"] for a in results])
    np.testing.assert_allclose(got, expected.extras["p"], atol=1e-7)
    # the fitted threshold is on the mean of 1 - p per configuration: configuration flags
    flags = [a.info["ltau_config_flag"] for a in results]
    np.testing.assert_array_equal(flags, expected.config_uncertainty > stored.threshold_)
    assert "ltau_flag" not in results[0].arrays
    assert "ltau_knn_distance_normalised" in results[0].arrays
    summary = json.loads((files / "summary.json").read_text())
    assert summary["scale"] == stored.scale_ and summary["threshold_source"] == "fitted"
    # wrong shape of the predicted forces: one line, exit 2, estimator untouched
    np.save(files / "bad.npy", predicted[:5])
    before = (files / "est" / "estimator.json").read_text()
    status = main([
        "ltau", "calibrate", "--estimator", str(files / "est"), "--descriptors",
        str(files / "cal_desc.npy"), "--structures", str(files / "cal.extxyz"),
        "--predicted-forces", str(files / "bad.npy"),
    ])
    assert status == 2
    assert "--predicted-forces: expected shape (80, 3), got (5, 3)" in capsys.readouterr().err
    assert (files / "est" / "estimator.json").read_text() == before


def test_io_failure_is_one_line_with_exit_1(files, capsys):
    """An output path under a regular file: an OSError, reported as one line."""
    blocker = files / "not_a_dir"
    blocker.write_text("x")
    status = main([
        "ltau", "fit", "--errors", str(files / "errors_m0.npy"), "--descriptors",
        str(files / "train_desc.npy"), "--structures", str(files / "train.extxyz"),
        "--out", str(blocker / "est"),
    ])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mlipuq: error: ") and str(blocker) in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    assert blocker.read_text() == "x"


def test_calibrate_keeps_the_run_provenance_file(files, capsys):
    """``ltau calibrate`` on a run's method directory must keep its provenance."""
    status = main([
        "ltau", "fit", "--errors", str(files / "errors_m0.npy"), "--descriptors",
        str(files / "train_desc.npy"), "--structures", str(files / "train.extxyz"),
        "--out", str(files / "est"),
    ])
    assert status == 0
    header = json.loads((files / "est" / "estimator.json").read_text())
    header["provenance"] = {"member": "model_0"}
    (files / "est" / "estimator.json").write_text(json.dumps(header))
    cal = emt_frames(6, 3, ["bulk"])
    write(files / "cal.extxyz", cal)
    rng = np.random.default_rng(5)
    np.save(files / "cal_desc.npy", rng.normal(size=(48, DIM)).astype(np.float32))
    reference = np.concatenate([a.get_forces() for a in cal])
    np.save(files / "cal_forces.npy", reference + rng.normal(0, 0.05, size=reference.shape))
    status = main([
        "ltau", "calibrate", "--estimator", str(files / "est"), "--descriptors",
        str(files / "cal_desc.npy"), "--structures", str(files / "cal.extxyz"),
        "--predicted-forces", str(files / "cal_forces.npy"),
    ])
    assert status == 0, capsys.readouterr().err
    assert LTAUEstimator.load(files / "est").provenance_ == {"member": "model_0"}
    assert LTAUEstimator.load(files / "est").calibration_ is not None
