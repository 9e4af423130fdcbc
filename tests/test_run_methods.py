"""Methods of a run folder, on a fast arrays run: provenance, reasons, options, edge
cases of fit -> evaluate that the full pipeline tests do not reach."""

from __future__ import annotations

import json
import shutil

import pytest

from mlipuq.cli import main
from mlipuq.exceptions import InputError
from mlipuq.method import load_method
from mlipuq.run_methods import (
    calculator_methods,
    fit_methods,
    load_methods,
    load_run_method,
    method_dir,
)
from test_arrays_backend import make_run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An arrays run (2 members) with every method fitted for model_0."""
    run, tests = make_run(tmp_path_factory.mktemp("rm") / "run")
    fit_methods(run)
    return run, tests


def test_evaluate_an_uncalibrated_llpr_alone(fitted, tmp_path):
    """A method whose p has no tolerance yet (LLPR before calibration) is evaluated
    without one: no ECE, no crash."""
    from mlipuq.pipeline import evaluate_run

    run, tests = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    fit_methods(type(run).open(copy), methods=["llpr"], calibrate=False)
    metrics = evaluate_run(copy, tests, out_dir=tmp_path / "report", methods=["llpr"])
    assert set(metrics["methods"]) == {"llpr", "llpr_calibrated"}
    assert metrics["atol_from"] == "llpr_calibrated"  # the one result with a tolerance
    assert metrics["methods"]["llpr"]["metrics"]["all"]["ece"] is None
    assert metrics["methods"]["llpr_calibrated"]["metrics"]["all"]["ece"] is not None


def test_provenance_refuses_another_member(fitted):
    run, _ = fitted
    loaded, reasons = load_methods(run, ["doptimality", "ensemble"], model_id="model_1")
    assert "doptimality" not in loaded and "member" in reasons["doptimality"]
    assert "ensemble" in loaded  # a committee method is every member's
    with pytest.raises(InputError, match=r"member 'model_0', not 'model_1'.*mlipuq fit --run"):
        load_run_method(run, "doptimality", model_id="model_1")


def test_an_attached_method_of_another_member_is_refused(fitted):
    from mlipuq.cli.simulate import check_attached

    run, _ = fitted
    method = load_method(method_dir(run, "doptimality"))
    check_attached(run, method, "model_0", "DIR")  # its own member: fine
    with pytest.raises(InputError, match="--method DIR: fitted with member"):
        check_attached(run, method, "model_1", "DIR")


def test_missing_and_damaged_methods_give_reasons(fitted, tmp_path):
    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    moved = type(run).open(copy)
    shutil.rmtree(method_dir(moved, "llpr"))
    (copy / "ltau").mkdir()  # what mlipuq 0.1 left: never read
    header = method_dir(moved, "ltau") / "estimator.json"
    damaged = json.loads(header.read_text())
    del damaged["state"]["groups"]
    header.write_text(json.dumps(damaged))
    loaded, reasons = load_methods(moved, ["ltau", "llpr", "doptimality"], model_id="model_0")
    assert set(loaded) == {"doptimality"}
    assert reasons["llpr"] == "not fitted yet"
    assert "damaged, or written by another mlipuq version" in reasons["ltau"]


def test_a_method_directory_of_an_unknown_plugin_is_skipped(fitted, tmp_path, caplog):
    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    (copy / "methods" / "uninstalled_plugin").mkdir()
    with caplog.at_level("WARNING"):
        methods = calculator_methods(type(run).open(copy), "model_0")
    assert {"ltau", "doptimality", "clustered_doptimality", "llpr"} <= set(methods)
    assert "uninstalled_plugin" in caplog.text


@pytest.mark.parametrize("argv,message", [
    (["--param", "ltua.k=8"], "--param ltua.k=8: unknown method 'ltua'"),
    (["--methods", "ensemble", "--param", "ltau.k=8"], "'ltau' is not among the methods"),
    (["--methods", "ensemble", "--k", "8"], "--k: sets ltau.k, but 'ltau' is not among"),
    (["--methods", "doptimality", "--param", "doptimality.tol=abc"],
     r"--param doptimality: .*given: \{'tol': 'abc'\}"),
])
def test_fit_options_are_checked(fitted, tmp_path, capsys, argv, message):
    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    assert main(["fit", "--run", str(copy), "--no-calibrate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlipuq: error: ")
    import re

    assert re.search(message, err[0]), err[0]


def test_stop_bounds_apply_to_the_uncertainty_key_only():
    from mlipuq.simulation import upper_bound

    assert upper_bound("ltau_uncertainty") == 1.0
    assert upper_bound("ltau_uncertainty_max") == 1.0
    assert upper_bound("ltau_expected_error") is None  # eV/Å, unbounded
    assert upper_bound("doptimality_uncertainty") is None
