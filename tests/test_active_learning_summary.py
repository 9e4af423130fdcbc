"""The multi-seed summary of the active-learning benchmark (active_learning_summary.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "active_learning_summary.py"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("active_learning_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(path: Path, seed: int, active: list[float], random: list[float]) -> Path:
    """One seed's --json file with one round; errors (hot, surface, nanoparticle)."""
    sets = ("hot", "surface", "nanoparticle")
    history = [
        {"round": 0, "active": dict.fromkeys(sets, 1.0), "random": dict.fromkeys(sets, 1.0)},
        {"round": 1, "active": dict(zip(sets, active, strict=True)),
         "random": dict(zip(sets, random, strict=True))},
    ]
    path.write_text(json.dumps({"args": {"seed": seed}, "history": history}))
    return path


def test_ratio_interval_is_a_t_interval_of_log_ratios(summary):
    ratios = np.array([0.5, 1.0, 2.0, 1.0])
    centre, low, high = summary.ratio_interval(ratios)
    assert centre == pytest.approx(1.0)
    # log ratios: mean 0, sample s.d. sqrt(2 ln(2)^2 / 3); t(0.975, 3) = 3.182
    half = 3.1824463 * np.sqrt(2 * np.log(2) ** 2 / 3) / 2
    assert low == pytest.approx(np.exp(-half), rel=1e-6)
    assert high == pytest.approx(np.exp(half), rel=1e-6)


def test_goal_counts_cells_and_seed_means(summary, tmp_path, capsys):
    files = [
        _write_run(tmp_path / "s0.json", 0, [0.9, 0.5, 0.5], [1.0, 1.0, 1.0]),
        # seed 1 loses hot bulk by a little, so the seed-mean hot error still wins
        _write_run(tmp_path / "s1.json", 1, [1.05, 0.5, 0.5], [1.0, 1.0, 1.0]),
    ]
    assert summary.main([str(f) for f in files]) == 0
    out = capsys.readouterr().out
    assert "every (seed, round, set) cell: 5 of 6 won" in out
    assert "seed-mean error of every (round, set): 3 of 3 won" in out
    assert "| 1 | hot | 1 / 2 | " in out
    assert "| 1 | 1 | 1.0500 / 1.0000 (1.05) |" in out


def test_a_file_that_is_not_a_benchmark_result_is_refused(summary, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"history": []}))
    with pytest.raises(SystemExit, match="bad.json: not an active_learning.py --json file"):
        summary.main([str(bad)])


def test_a_seed_given_twice_is_refused(summary, tmp_path):
    first = _write_run(tmp_path / "a.json", 3, [0.9, 0.9, 0.9], [1.0, 1.0, 1.0])
    second = _write_run(tmp_path / "b.json", 3, [0.8, 0.8, 0.8], [1.0, 1.0, 1.0])
    with pytest.raises(SystemExit, match="b.json: seed 3 given twice"):
        summary.main([str(first), str(second)])
