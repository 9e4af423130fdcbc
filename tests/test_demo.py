"""``mlipuq demo --quick`` end to end: data, training, four methods, report (slow, ~1-2 min)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.cli import main  # noqa: E402

METHODS = {"ltau", "ltau_calibrated", "knn_distance", "ensemble", "doptimality",
           "clustered_doptimality", "llpr",
           "llpr_calibrated"}
SETS = {"bulk_300K", "bulk_1200K", "vacancy", "surface", "nanoparticle"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the quick demo once in-process; returns (folder, (stdout, stderr), metrics)."""
    out = tmp_path_factory.mktemp("demo") / "mlipuq-demo"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["demo", "--quick", "--out", str(out), "--threads", "1", "--seed", "0"])
    assert status == 0, stderr.getvalue()[-2000:]
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    return out, (stdout.getvalue(), stderr.getvalue()), metrics


pytestmark = pytest.mark.slow


def test_progress_lines_and_report_path(demo):
    out, (stdout, stderr), _ = demo
    assert stdout.splitlines() == [f"report: {out / 'report' / 'index.html'}"]  # the result
    progress = [line for line in stderr.splitlines() if line.startswith("mlipuq: [")]
    stamps = [float(re.match(r"mlipuq: \[\s*([\d.]+) s\]", line).group(1))
              for line in progress]
    assert len(stamps) >= 5 and stamps == sorted(stamps)  # elapsed time per stage
    assert any("training 2 nequip model(s)" in line for line in progress)
    for name in SETS | {"train"}:
        assert (out / "data" / f"{name}.extxyz").is_file()


def test_metrics_cover_every_method_and_group(demo):
    out, _, metrics = demo
    assert set(metrics["methods"]) == METHODS
    from ase.io import read

    for name in SETS:  # group sizes agree with the written test files
        frames = read(out / "data" / f"{name}.extxyz", ":")
        expected = {"n_atoms": sum(len(a) for a in frames), "n_configs": len(frames)}
        if name == "bulk_300K":  # half of the calibration set fits s and the thresholds
            held = len(frames) - round(0.5 * len(frames))
            expected = {"n_atoms": held * len(frames[0]), "n_configs": held}
        assert metrics["groups"][name] == expected, name
        assert metrics["test_sets"][name]["n_configs"] == expected["n_configs"]
    for name, method in metrics["methods"].items():
        assert set(method["metrics"]) == SETS | {"all"}, name
        for group, entry in method["metrics"].items():
            rho = entry["spearman_atom"]
            assert rho is None or -1.0 <= rho <= 1.0, (name, group)
            assert 0.0 <= entry["detection_rate_config"] <= 1.0, (name, group)
            atom_rate = entry["detection_rate_atom"]
            if name in ("ltau", "ltau_calibrated", "knn_distance"):  # thresholds on a mean
                # over a configuration's atoms: no atom flags
                assert atom_rate is None, (name, group)
            else:
                assert 0.0 <= atom_rate <= 1.0, (name, group)
        cost = method["cost"]
        assert cost["seconds_per_atom"] > 0 and cost["relative_to_forward"] > 0
    for name in ("ltau", "ltau_calibrated"):
        entry = metrics["methods"][name]["metrics"]["all"]
        assert math.isfinite(entry["spearman_atom"])
        assert 0.0 <= entry["ece"] <= 1.0 and 0.0 <= entry["sharpness"] <= 0.5
    # ROC-AUC over all configurations (bulk_300K in domain, the rest out of domain)
    for name in ("ensemble", "doptimality"):
        assert 0.0 <= metrics["methods"][name]["metrics"]["all"]["roc_auc"] <= 1.0


def test_calibration_section(demo):
    _, _, metrics = demo
    cal = metrics["calibration"]["ltau"]
    assert cal["calibration_set"] == "bulk_300K" and cal["fraction"] == 0.5
    assert 0.1 <= cal["scale"] <= 20.0
    assert set(cal["ece_before"]) == set(cal["ece_after"]) == SETS
    # the fitted s can only lower the ECE on the atoms it was fitted on; on the held-out
    # half we only ask for a number in [0, 1]
    assert all(0.0 <= v <= 1.0 for v in cal["ece_after"].values())
    assert metrics["atol"] == pytest.approx(cal["atol"])


def test_doptimality_flags_nanoparticle_more_than_bulk(demo):
    """Physics check: surface atoms of a nanoparticle extrapolate from bulk training data."""
    _, _, metrics = demo
    for name in ("doptimality", "clustered_doptimality"):
        rates = {g: e["detection_rate_atom"]
                 for g, e in metrics["methods"][name]["metrics"].items()}
        assert rates["nanoparticle"] >= rates["bulk_300K"] + 0.3, (name, rates)
        assert rates["nanoparticle"] >= rates["surface"] - 0.1, (name, rates)


def test_numbers_match_the_saved_estimators(demo):
    """Recompute D-optimality and the ensemble on one test set from the run folder."""
    out, _, metrics = demo
    from ase.io import read

    from mlipuq.backends.nequip.features import NequIPBackend
    from mlipuq.doptimality import DOptimalityEstimator
    from mlipuq.run_folder import RunFolder

    run = RunFolder.open(out / "run")
    frames = read(out / "data" / "surface.extxyz", ":")
    outs = [NequIPBackend(run.model_path(m)).outputs(frames) for m in run.model_ids]
    gamma = DOptimalityEstimator.load(out / "run" / "methods" / "doptimality").gamma(
        outs[0].descriptors.astype(float), outs[0].species)
    entry = metrics["methods"]["doptimality"]["metrics"]["surface"]
    assert entry["mean_uncertainty"] == pytest.approx(gamma.mean(), rel=1e-6)
    threshold = metrics["thresholds"]["doptimality"]
    assert threshold["source"] == "fitted" and threshold["calibration_set"] == "bulk_300K"
    assert entry["detection_rate_atom"] == pytest.approx(np.mean(gamma > threshold["value"]))
    # the in-domain held-out half is flagged at about the target rate (small sample)
    assert metrics["methods"]["doptimality"]["metrics"]["bulk_300K"]["fpr"] <= 0.3
    forces = np.stack([o.forces for o in outs])
    deviation = np.linalg.norm(forces - forces.mean(axis=0), axis=2).max(axis=0)
    assert metrics["methods"]["ensemble"]["metrics"]["surface"][
        "mean_uncertainty"] == pytest.approx(deviation.mean(), rel=1e-6)


def test_index_html_references_existing_pngs(demo):
    out, _, _ = demo
    report = out / "report"
    html = (report / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", html)
    assert len(images) >= 6
    for name in images:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "LTAU calibration" in html and "calibration_ltau.png" in images


def test_rerun_into_the_same_folder_and_refuses_foreign_folder(demo, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    assert main(["demo", "--quick", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an mlipuq demo folder" in err[0]
    assert main(["demo", "--quick", "--models", "0"]) == 2
    assert "--models: expected a positive integer" in capsys.readouterr().err


def test_demo_backend_must_be_one_that_trains(tmp_path, capsys):
    """--backend names a registered backend with a train capability, in one line."""
    assert main(["demo", "--quick", "--backend", "arrays", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backend 'arrays' cannot train models" in err[0]
    assert "nequip" in err[0] and "pace" in err[0]
    assert main(["demo", "--quick", "--backend", "schnet", "--out", str(tmp_path / "b")]) == 2
    assert "unknown backend 'schnet'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
