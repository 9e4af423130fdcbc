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
