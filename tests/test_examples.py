"""The scripts in examples/ run and say what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_custom_method_passes_the_contract_and_registers():
    out = _run("custom_method.py")
    assert "FeatureNorm passes every contract check" in out
    assert "'feature_norm'" in out


def test_ltau_from_arrays_runs():
    assert _run("ltau_from_arrays.py").strip()


def test_any_model_adapter_goes_through_the_pipeline():
    """An ASE calculator + a descriptor function, registered as a backend, is fitted,
    evaluated and reported; its D-optimality separates the nanoparticle from bulk."""
    out = _run("any_model_adapter.py")
    fitted = out.split("methods fitted: ")[1].splitlines()[0].split(", ")
    assert {"doptimality", "clustered_doptimality", "llpr", "ensemble"} <= set(fitted)
    assert "ltau" not in fitted  # no training errors: LTAU is not offered
    line = next(row for row in out.splitlines() if row.startswith("doptimality "))
    auc = float(line.split("nanoparticle ")[1])
    assert auc >= 0.9
