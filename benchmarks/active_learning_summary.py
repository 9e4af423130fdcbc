"""Summarise several seeds of ``benchmarks/active_learning.py`` (its ``--json`` files).

Prints, in Markdown:

1. one row per (seed, round): force MAE (eV/Å) active / random and the ratio, per
   test set and for the mean of the three sets;
2. one row per (round, set) over the seeds: cells won, the geometric-mean ratio
   active / random with its 95 % t-interval (on log ratios), and the ratio of the
   seed-mean errors;
3. the goal (lower error than random at every round, on every test set) under two
   readings: every (seed, round, set) cell, and the seed-mean error of every
   (round, set).

Usage::

    python benchmarks/active_learning_summary.py /tmp/al/s0.json /tmp/al/s1.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

TEST_SETS = ("hot", "surface", "nanoparticle")
MEAN_OF_SETS = "mean of sets"


def read_history(path: Path) -> tuple[int, list[dict]]:
    """(seed, rounds >= 1 of the history) of one ``--json`` file."""
    try:
        data = json.loads(path.read_text())
        return int(data["args"]["seed"]), [r for r in data["history"] if r["round"] >= 1]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not an active_learning.py --json file ({exc})") from None


def round_errors(record: dict) -> dict[str, tuple[float, float]]:
    """{set: (active, random)} force MAE in eV/Å, with the mean of the three sets."""
    errors = {name: (record["active"][name], record["random"][name]) for name in TEST_SETS}
    errors[MEAN_OF_SETS] = tuple(float(np.mean([errors[n][k] for n in TEST_SETS]))
                                 for k in (0, 1))
    return errors


def ratio_interval(ratios: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, lower, upper) of ``ratios`` (shape (n,)): t-interval of the
    mean log ratio; the interval is (nan, nan) for fewer than two ratios."""
    logs = np.log(np.asarray(ratios, dtype=float))
    centre = float(np.mean(logs))
    if logs.size < 2:
        return float(np.exp(centre)), float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, logs.size - 1) * np.std(logs, ddof=1) / np.sqrt(logs.size)
    return float(np.exp(centre)), float(np.exp(centre - half)), float(np.exp(centre + half))


def cell_table(runs: dict[int, list[dict]]) -> dict[tuple[int, str], np.ndarray]:
    """{(round, set): array (n_seeds, 2) of (active, random) errors in eV/Å}."""
    cells: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for history in runs.values():
        for record in history:
            for name, pair in round_errors(record).items():
                cells.setdefault((record["round"], name), []).append(pair)
    order = {name: k for k, name in enumerate(TEST_SETS + (MEAN_OF_SETS,))}
    keys = sorted(cells, key=lambda key: (key[0], order[key[1]]))
    return {key: np.asarray(cells[key]) for key in keys}


def print_seed_rows(runs: dict[int, list[dict]]) -> None:
    print("| seed | round | " + " | ".join(TEST_SETS + (MEAN_OF_SETS,)) + " |")
    print("|---" * (len(TEST_SETS) + 3) + "|")
    for seed, history in sorted(runs.items()):
        for record in history:
            cells = [f"{a:.4f} / {r:.4f} ({a / r:.2f})" for a, r in round_errors(record).values()]
            print(f"| {seed} | {record['round']} | " + " | ".join(cells) + " |")


def cell_statistics(pairs: np.ndarray) -> dict[str, float]:
    """Over the seeds of one (round, set), ``pairs`` shape (n_seeds, 2) of (active,
    random) errors in eV/Å: cells won, geometric-mean ratio with its 95 % interval,
    and the seed-mean errors."""
    ratios = pairs[:, 0] / pairs[:, 1]
    centre, low, high = ratio_interval(ratios)
    mean_active, mean_random = pairs.mean(axis=0)
    return {"won": int(np.sum(ratios < 1)), "n": len(ratios), "centre": centre, "low": low,
            "high": high, "mean_active": float(mean_active), "mean_random": float(mean_random)}


def print_cell_rows(statistics: dict[tuple[int, str], dict[str, float]]) -> None:
    print("\n| round | set | cells won | geometric-mean ratio | 95 % interval | "
          "seed-mean active / random (ratio) |")
    print("|---|---|---|---|---|---|")
    for (round_number, name), c in statistics.items():
        print(f"| {round_number} | {name} | {c['won']} / {c['n']} | {c['centre']:.2f} | "
              f"{c['low']:.2f}-{c['high']:.2f} | {c['mean_active']:.4f} / "
              f"{c['mean_random']:.4f} ({c['mean_active'] / c['mean_random']:.2f}) |")


def print_goal(statistics: dict[tuple[int, str], dict[str, float]]) -> None:
    per_set = [c for key, c in statistics.items() if key[1] != MEAN_OF_SETS]
    won = sum(c["won"] for c in per_set)
    total = sum(c["n"] for c in per_set)
    mean_won = sum(c["mean_active"] < c["mean_random"] for c in per_set)
    upper_below = sum(c["high"] < 1 for c in per_set)
    print(f"\ngoal, every (seed, round, set) cell: {won} of {total} won")
    print(f"goal, seed-mean error of every (round, set): {mean_won} of {len(per_set)} won; "
          f"95 % interval of the ratio below 1 in {upper_below} of {len(per_set)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="--json files, one per seed")
    args = parser.parse_args(argv)
    runs: dict[int, list[dict]] = {}
    for path in args.files:
        seed, history = read_history(path)
        if seed in runs:
            raise SystemExit(f"{path}: seed {seed} given twice")
        runs[seed] = history
    statistics = {key: cell_statistics(pairs) for key, pairs in cell_table(runs).items()}
    print_seed_rows(runs)
    print_cell_rows(statistics)
    print_goal(statistics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
