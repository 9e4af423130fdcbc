"""The HTML report: files exist, links resolve, metrics.json round-trips, writes are atomic."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mlipuq import report
from mlipuq.evaluation import evaluate
from mlipuq.exceptions import InputError
from mlipuq.report import summary_text, write_report
from mlipuq.result import UQResult


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    ci = np.repeat(np.arange(30), 5)
    groups = np.array(["300K", "600K", "H_transfer"])[np.arange(30) % 3]
    p = rng.uniform(0.05, 0.95, len(ci))
    err = 0.01 * rng.exponential(size=len(ci)) / -np.log1p(-p)
    err[groups[ci] == "H_transfer"] = np.nan
    energy = rng.normal(size=30)
    results = {
        "ltau": UQResult("ltau", 1 - p, config_index=ci, extras={"p": p}),
        "dopt": UQResult(
            "doptimality", rng.lognormal(size=len(ci)), config_index=ci, threshold=1.5
        ),
    }
    metrics = evaluate(
        results,
        config_index=ci,
        force_errors=err,
        energy_errors=energy,
        groups=groups,
        atol=0.01,
        is_ood=groups == "H_transfer",
        timings={"ltau": 1e-5, "dopt": 4e-5},
        forward_seconds_per_atom=1e-4,
    )
    return metrics, results, err, energy, ci, groups


def _write(case, out_dir):
    metrics, results, err, energy, ci, groups = case
    return write_report(
        metrics,
        out_dir,
        results=results,
        force_errors=err,
        energy_errors=energy,
        config_index=ci,
        groups=groups,
    )


@pytest.fixture(scope="module")
def written(case, tmp_path_factory):
    parent = tmp_path_factory.mktemp("report")
    return parent, _write(case, parent / "rep")


def test_report_files_links_and_json(case, written):
    tmp_path, index = written
    assert index == tmp_path / "rep" / "index.html"
    page = index.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {
        "calibration_ltau.png",
        "scatter_ltau.png",
        "scatter_dopt.png",
        "scatter_energy_ltau.png",  # H_transfer has energies only
        "scatter_energy_dopt.png",
        "detection_rates.png",
        "cost.png",
    }
    for name in images:
        data = (index.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert json.loads((index.parent / "metrics.json").read_text()) == case[0]
    assert 'href="metrics.json"' in page
    assert summary_text(case[0]) in page.replace("&#x27;", "'")
    # nothing besides the report is left in the parent (no temp directories)
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_report_replaces_an_earlier_report_but_not_other_directories(case, tmp_path):
    out = tmp_path / "rep"
    write_report(case[0], out)
    (out / "stale.txt").write_text("old")
    write_report(case[0], out)  # an earlier report (metrics.json): replaced as a whole
    assert not (out / "stale.txt").exists() and (out / "index.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "precious.txt").write_text("keep")
    with pytest.raises(InputError, match="without metrics.json"):
        write_report(case[0], data)
    assert (data / "precious.txt").read_text() == "keep"


def test_failed_report_leaves_nothing(case, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "_detection_plot", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        _write(case, tmp_path / "rep")
    assert list(tmp_path.iterdir()) == []


def test_report_without_arrays_has_no_scatter(case, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_calibration_plots", lambda *a: [])  # speed: one plot less
    index = write_report(case[0], tmp_path / "rep")
    assert "scatter_" not in index.read_text()
    assert (tmp_path / "rep" / "detection_rates.png").exists()


def test_summary_text_reads_the_numbers():
    def entry(**kw):
        return kw

    metrics = {
        "test_sets": {
            "300K": {"in_domain": True, "has_forces": True},
            "600K": {"in_domain": False, "has_forces": True},
            "surface": {"in_domain": False, "has_forces": False},
        },
        "methods": {
            "ltau_calibrated": {
                "cost": {"seconds_per_atom": 1e-6, "relative_to_forward": 0.02},
                "metrics": {
                    "all": entry(ece=0.01, spearman_atom=0.9),  # pooled: never quoted
                    "300K": entry(ece=0.03, spearman_atom=0.5),
                    "600K": entry(ece=0.2, spearman_atom=0.3, roc_auc=0.7, tpr=0.4, fpr=0.05),
                    "surface": entry(roc_auc=0.95, tpr=0.9, fpr=0.05),
                },
            },
            "doptimality": {
                "cost": {"seconds_per_atom": 1e-5, "relative_to_forward": 0.2},
                "metrics": {
                    "all": entry(spearman_atom=0.6),
                    "300K": entry(spearman_atom=0.45),
                    "600K": entry(spearman_atom=0.4, roc_auc=0.9, tpr=0.7, fpr=0.04),
                    "surface": entry(roc_auc=0.8, tpr=0.5, fpr=0.04),
                },
            },
        },
    }
    text = summary_text(metrics)
    assert ("LTAU (calibrated) has its largest calibration error on 600K (ECE 0.200); on "
            "the held-out in-domain atoms of 300K it is 0.030.") in text
    # ranking by each method's worst set: D-optimality 0.40 beats LTAU's 0.30
    assert ("D-optimality ranks atoms by force error best (even on its worst set, 600K: "
            "Spearman 0.40") in text
    assert ("600K: D-optimality separates it from the in-domain data best (ROC-AUC 0.90; "
            "at its threshold it flags 70 % of these configurations and 4 % of the "
            "in-domain ones).") in text
    assert "surface: LTAU (calibrated) separates it from the in-domain data best (ROC-AUC 0.95" \
        in text
    assert "surface has no reference forces: judged on configuration energy errors" in text
    assert "LTAU (calibrated) is the cheapest: its UQ step costs 0.02 × one forward pass." in text
    assert "0.01" not in text and "0.9 " not in text  # the pooled figures hide 600K


def test_report_bad_input(tmp_path):
    with pytest.raises(InputError, match="metrics"):
        write_report({"n_atoms": 3}, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_written_files_follow_the_umask(case, tmp_path):
    import os

    from mlipuq.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        index = _write(case, tmp_path / "rep")
        group_readable = os.umask(0o027)
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert group_readable == 0o022
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
    assert index.parent.stat().st_mode & 0o777 == 0o755
