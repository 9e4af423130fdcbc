"""``mlipuq evaluate``: bad input (fast, no model) and one real run (slow, tiny NequIP)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlipuq.cli import main
from mlipuq.run_folder import RunFolder


def _frames(n: int, symbols: str = "Cu", seed: int = 0) -> list:
    """``n`` rattled 4-atom cells with EMT-like labels (random numbers; never evaluated)."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.set_chemical_symbols([symbols] * len(atoms)) if symbols != "Cu" else None
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3))
        )
        frames.append(atoms)
    return frames


def _write(path, frames):
    from ase.io import write

    write(path, frames, format="extxyz")
    return str(path)


@pytest.fixture()
def fake_run(tmp_path):
    """A run folder with run.json only: input checks happen before any model is loaded."""
    meta = {"elements": ["Cu"], "model_ids": ["model_0", "model_1"], "n_models": 2}
    return str(RunFolder.create(tmp_path / "run", meta).path)


def _evaluate(capsys, run, *args):
    status = main(["evaluate", "--run", run, "--out", "unused_report", *args])
    captured = capsys.readouterr()
    return status, captured.err.strip().splitlines()


def test_foreign_elements_exit_2_naming_file_and_elements(fake_run, tmp_path, capsys):
    water = _write(tmp_path / "oxide.extxyz", _frames(2, symbols="O"))
    status, err = _evaluate(capsys, fake_run, "--test", f"ox={water}")
    assert status == 2
    assert len(err) == 1
    assert "oxide.extxyz" in err[0] and "element(s) O not in the training set" in err[0]
    assert "trained on Cu" in err[0]


def test_missing_file_exit_2(fake_run, tmp_path, capsys):
    status, err = _evaluate(capsys, fake_run, "--test", f"a={tmp_path / 'nope.extxyz'}")
    assert status == 2
    assert err == [f"mlipuq: error: {tmp_path / 'nope.extxyz'}: file not found"]


@pytest.mark.parametrize("what", ["forces", "energy"])
def test_nan_reference_exit_2(fake_run, tmp_path, capsys, what):
    """NaN labels are refused, not silently dropped from the metrics."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = _frames(3)
    forces = frames[1].get_forces()
    energy = frames[1].get_potential_energy()
    if what == "forces":
        forces[2, 1] = np.nan
    else:
        energy = float("nan")
    frames[1].calc = SinglePointCalculator(frames[1], energy=energy, forces=forces)
    bad = _write(tmp_path / "bad.extxyz", frames)
    status, err = _evaluate(capsys, fake_run, "--test", f"a={bad}")
    assert status == 2
    noun = "reference forces" if what == "forces" else "a NaN or infinite reference energy"
    assert len(err) == 1 and f"{bad}: configuration 1 has" in err[0] and noun in err[0]


def test_empty_file_exit_2(fake_run, tmp_path, capsys):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    status, err = _evaluate(capsys, fake_run, "--test", f"a={empty}")
    assert status == 2
    assert err == [f"mlipuq: error: {empty}: empty file (no configurations)"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibrate-on", "hot"], "--calibrate-on: no test set named 'hot'"),
        (["--calibrate-on", "a:1.5"], "--calibrate-on: fraction must be in (0, 1)"),
        (["--calibrate-on", "a:x"], "expected NAME or NAME:FRACTION"),
        (["--in-domain", "zzz"], "--in-domain: no test set named ['zzz']"),
        (["--test", "a=other.extxyz"], "--test: test set name 'a' given twice"),
        (["--model-id", "model_7"], "--model-id: 'model_7' is not a member"),
        (["--window", "-5", "x"], "--window: expected START SIZE"),
    ],
)
def test_bad_options_exit_2(fake_run, tmp_path, capsys, args, message):
    good = _write(tmp_path / "good.extxyz", _frames(2))
    status, err = _evaluate(capsys, fake_run, "--test", f"a={good}", *args)
    assert status == 2
    assert len(err) == 1 and message in err[0]


def test_ensemble_needs_two_models(tmp_path, capsys):
    run = RunFolder.create(tmp_path / "one", {"elements": ["Cu"], "model_ids": ["model_0"]})
    good = _write(tmp_path / "good.extxyz", _frames(2))
    status, err = _evaluate(capsys, str(run.path), "--test", f"a={good}", "--methods",
                            "ensemble")
    assert status == 2
    assert "'ensemble' needs at least 2 models" in err[0] and "has 1" in err[0]


def test_not_a_run_folder(tmp_path, capsys):
    good = _write(tmp_path / "good.extxyz", _frames(2))
    status, err = _evaluate(capsys, str(tmp_path), "--test", f"a={good}")
    assert status == 2
    assert "not an mlipuq run folder" in err[0]


def test_parse_tests_defaults_name_to_file_stem():
    from mlipuq.cli.evaluate import parse_calibration, parse_tests

    assert parse_tests(["x=a.extxyz", "dir/hot_1200K.extxyz"]) == {
        "x": "a.extxyz", "hot_1200K": "dir/hot_1200K.extxyz"}
    assert parse_calibration("bulk_300K") == ("bulk_300K", 0.5)
    assert parse_calibration("bulk_300K:0.25") == ("bulk_300K", 0.25)


# ---------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_evaluate_tiny_run_matches_direct_formulas(tmp_path, capsys):
    """Energy-only set, saved estimators, and numbers checked against numpy formulas."""
    pytest.importorskip("nequip")
    from ase.io import read

    from mlipuq.backends.nequip.features import NequIPBackend
    from mlipuq.doptimality import DOptimalityEstimator
    from mlipuq.ensemble import force_max_deviation
    from nequip_support import make_emt_copper_frames, make_tiny_run

    run_dir = make_tiny_run(tmp_path / "t", n_models=2, epochs=3, n_frames=12)
    test_frames = make_emt_copper_frames(6, seed=5, temperature=300.0)
    test = _write(tmp_path / "test.extxyz", test_frames)
    calib = _write(tmp_path / "calib.extxyz", make_emt_copper_frames(6, seed=6,
                                                                      temperature=300.0))
    energy_only = []
    for atoms in make_emt_copper_frames(4, seed=9, temperature=1500.0):
        copy = atoms.copy()
        copy.info["energy"] = float(atoms.get_potential_energy())
        energy_only.append(copy)  # no calculator, no forces: energies only
    hot = _write(tmp_path / "hot.extxyz", energy_only)
    out = tmp_path / "report"
    status = main(["evaluate", "--run", str(run_dir), "--test", f"cold={test}", "--test",
                   f"hot={hot}",
                   "--test", f"calib={calib}", "--out", str(out), "--calibrate-on", "calib",
                   "--in-domain", "calib", "cold", "--k", "3"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip().splitlines() == [f"report: {out / 'index.html'}"]
    assert "fitting ltau, " in captured.err  # progress: stderr only
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ltau", "ltau_calibrated", "knn_distance", "ensemble",
                                       "doptimality", "clustered_doptimality", "llpr",
                                       "llpr_calibrated"}
    # the normalised k-NN distance is scored as an out-of-domain detector of its own
    assert metrics["methods"]["knn_distance"]["metrics"]["hot"]["roc_auc"] is not None
    assert metrics["thresholds"]["knn_distance"]["source"] == "fitted"
    # every method was saved in the run folder, with its provenance
    for name in ("ltau", "ensemble", "doptimality", "clustered_doptimality", "llpr"):
        header = json.loads((run_dir / "methods" / name / "estimator.json").read_text())
        assert header["provenance"]["backend"] == "nequip", name
    # ... with thresholds fitted on the run's validation frames (5 % in-domain FPR)
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.pipeline import fit_thresholds, model_outputs, predict_methods

    saved_run = RunFolder.open(run_dir)
    val_frames = read(saved_run.val_path, ":")
    val_out, _ = model_outputs(saved_run, val_frames)
    from mlipuq.ensemble import EnsembleEstimator

    saved = {"doptimality": DOptimalityEstimator.load(run_dir / "methods" / "doptimality"),
             "ensemble": EnsembleEstimator.load(run_dir / "methods" / "ensemble")}
    expected = fit_thresholds(predict_methods(saved, val_out)[0])
    assert saved["doptimality"].threshold_ == pytest.approx(expected["doptimality"])
    fences = saved["ensemble"].thresholds_
    assert fences["config_force"] == pytest.approx(expected["ensemble"])
    assert fences["atom_force"] == fences["config_force"]
    assert saved["ensemble"].threshold_source_.startswith("forces: FPR 0.05 on val.extxyz")
    ltau_saved = LTAUEstimator.load(run_dir / "methods" / "ltau")
    assert ltau_saved.calibration_["n_configs"] == len(val_frames)

    run = RunFolder.open(run_dir)
    outs = [NequIPBackend(run.model_path(m)).outputs(test_frames) for m in run.model_ids]
    forces = np.stack([o.forces for o in outs])
    ens = metrics["methods"]["ensemble"]["metrics"]["cold"]
    np.testing.assert_allclose(ens["mean_uncertainty"], force_max_deviation(forces).mean(),
                               rtol=1e-6)
    ref = np.concatenate([a.get_forces() for a in test_frames])
    from scipy.stats import spearmanr

    err0 = np.linalg.norm(ref - outs[0].forces, axis=1)

    gamma = DOptimalityEstimator.load(run_dir / "methods" / "doptimality").predict_arrays(
        outs[0].descriptors.astype(float), outs[0].species).atom_uncertainty
    dopt = metrics["methods"]["doptimality"]["metrics"]["cold"]
    np.testing.assert_allclose(dopt["spearman_atom"], spearmanr(gamma, err0).statistic,
                               rtol=1e-6)
    threshold = metrics["thresholds"]["doptimality"]
    assert threshold["source"] == "fitted" and threshold["fpr"] == 0.05
    np.testing.assert_allclose(dopt["detection_rate_atom"], np.mean(gamma > threshold["value"]))
    # the energy-only set: no atom-level numbers, a configuration-level energy Spearman
    hot_ltau = metrics["methods"]["ltau"]["metrics"]["hot"]
    assert hot_ltau["spearman_atom"] is None and hot_ltau["ece"] is None
    assert metrics["test_sets"]["hot"]["has_forces"] is False
    assert -1.0 <= metrics["methods"]["ensemble"]["metrics"]["hot"]["spearman_config_energy"] <= 1
    cal = metrics["calibration"]["ltau"]
    assert cal["calibration_set"] == "calib" and cal["scale"] > 0
    assert metrics["calibration"]["llpr"]["alpha"] > 0
    # the energy-only set has no atoms to calibrate; calib counts its held-out half only
    assert cal["ece_before"]["hot"] is None and cal["ece_before"]["cold"] is not None
    assert metrics["test_sets"]["calib"]["n_configs"] == 3
    assert metrics["test_sets"]["cold"]["n_configs"] == 6
    table = metrics["test_sets"]["cold"]["model_0"]
    np.testing.assert_allclose(table["force_mae_component"], np.abs(ref - outs[0].forces).mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(table["force_mae_norm"], err0.mean(), rtol=1e-6)
    # the hot set is out of domain: scored against the held-out in-domain configurations
    assert metrics["methods"]["ensemble"]["metrics"]["hot"]["roc_auc"] is not None
    assert metrics["methods"]["ensemble"]["metrics"]["cold"]["in_domain"] is True

    # a second call reuses the saved estimators: identical LTAU numbers
    status = main(["evaluate", "--run", str(run_dir), "--test", f"cold={test}", "--out",
                   str(tmp_path / "again"), "--k", "3"])
    assert status == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert "using saved" in capsys.readouterr().err
    assert again["methods"]["ltau"]["metrics"]["cold"]["mean_uncertainty"] == pytest.approx(
        metrics["methods"]["ltau"]["metrics"]["cold"]["mean_uncertainty"], rel=1e-9)
    # another k refits LTAU only (and saves it with the new k)
    status = main(["evaluate", "--run", str(run_dir), "--test", f"cold={test}", "--out",
                   str(tmp_path / "k4"), "--k", "4", "--methods", "ltau", "doptimality"])
    assert status == 0
    err = capsys.readouterr().err
    assert "using saved doptimality" in err and "fitting ltau on" in err
    header = json.loads((run_dir / "methods" / "ltau" / "estimator.json").read_text())
    assert header["params"]["k"] == 4
    # another member: D-optimality fitted in model_0's latent space is not reused
    status = main(["evaluate", "--run", str(run_dir), "--test", f"cold={test}", "--out",
                   str(tmp_path / "m1"), "--model-id", "model_1", "--methods", "doptimality"])
    assert status == 0
    err = capsys.readouterr().err
    assert "using saved" not in err and "fitting doptimality on" in err
    # a test set the user calls "validation" is the calibration set (not judged with
    # thresholds fitted on the run's own validation frames)
    status = main(["evaluate", "--run", str(run_dir), "--test", f"validation={test}", "--out",
                   str(tmp_path / "v"), "--model-id", "model_1", "--methods", "doptimality"])
    assert status == 0
    own = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert own["thresholds"]["doptimality"]["source"] == "fitted"
    assert own["thresholds"]["doptimality"]["calibration_set"] == "validation"
    assert own["test_sets"]["validation"]["n_configs"] == 3  # the held-out half of 6
    def provenance(name):
        header = json.loads((run_dir / "methods" / name / "estimator.json").read_text())
        return header["provenance"]

    assert provenance("doptimality")["member"] == "model_1"
    assert set(provenance("ensemble")["models"]) == {"model_0", "model_1"}
    # simulate refuses the run's D-optimality for a member it was not fitted for
    from mlipuq.cli.simulate import uq_calculator
    from mlipuq.exceptions import InputError

    with pytest.raises(InputError, match="fitted with member 'model_1', not 'model_0'"):
        uq_calculator(str(run_dir), "model_0")


# ---------------------------------------------------------------------- calibration
def test_calibrate_ltau_and_thresholds_on_held_out_configurations(rng):
    """Synthetic LTAU: in-domain errors = 2 x training-like errors."""
    from mlipuq import metrics
    from mlipuq.backends.base import ModelOutputs
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.pipeline import (
        fit_thresholds,
        for_evaluation,
        predict_methods,
        split_configurations,
    )

    n, epochs = 2000, 60
    desc = rng.normal(size=(n, 4)).astype(np.float32)
    width = np.exp(rng.normal(size=n)) * 0.01  # per-atom error scale, eV/Å
    trajectory = rng.exponential(size=(epochs, n)) * width
    species = np.array(["Cu"] * n)
    ltau = LTAUEstimator(k=1, index="flat").fit_arrays(trajectory, desc, species)
    errors = 2.0 * rng.exponential(size=n) * width
    outputs = ModelOutputs(energies=np.zeros(n // 10), forces=np.zeros((n, 3)),
                           descriptors=desc, species=species,
                           config_index=np.repeat(np.arange(n // 10), 10))
    groups = np.array(["warm"] * (n // 10))
    is_cal = split_configurations(groups, "warm", 0.5, seed=1)
    assert is_cal.sum() == n // 20
    cal_out, held_out = outputs.subset(is_cal), outputs.subset(~is_cal)
    assert np.array_equal(np.unique(cal_out.config_index), np.arange(n // 20))
    atoms = is_cal[outputs.config_index]
    calibrated = for_evaluation({"ltau": ltau}, cal_out, errors[atoms], fpr=0.1)[
        "ltau_calibrated"]
    assert calibrated is not ltau and ltau.calibration_ is None  # the original is untouched
    assert calibrated.scale_ == pytest.approx(2.0, rel=0.2)  # p = CDF_train(atol / s)
    results, _ = predict_methods({"ltau": ltau, "ltau_calibrated": calibrated},
                                 {"model_0": held_out})
    p_before = results["ltau"].extras["p"]
    p_after = results["ltau_calibrated"].extras["p"]
    assert metrics.ece(p_before, errors[~atoms], ltau.atol_) > 0.1
    assert metrics.ece(p_after, errors[~atoms], ltau.atol_) < 0.06
    # thresholds at 10 % in-domain FPR flag about 10 % of held-out configurations
    cal_results, _ = predict_methods({"ltau_calibrated": calibrated}, {"model_0": cal_out})
    threshold = fit_thresholds(cal_results, fpr=0.1)["ltau_calibrated"]
    assert threshold == pytest.approx(calibrated.threshold_)
    held_rate = np.mean(results["ltau_calibrated"].config_uncertainty > threshold)
    assert 0.02 <= held_rate <= 0.2
