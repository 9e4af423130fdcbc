"""Benchmark: MaxVol active-set build and extrapolation-grade throughput.

Every measurement runs in its own subprocess (1 thread) so that its peak memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process, i.e. peak RSS
including the input matrix) is its own. Baselines are measured in the same run:
pacemaker's python implementation (``pyace.activelearning.compute_active_set`` /
``compute_extrapolation_grade``, compiled ``c_maxvol``) when ``pyace`` imports,
and a plain numpy one-liner for gamma.

Synthetic features: x = z @ M with z ~ N(0, 1) and M a fixed random (D, D) matrix
whose singular values decay geometrically from 1 to 1e-3 (ACE-like conditioning).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/doptimality.py                 # 1e5 and 1e6 x 64
    OMP_NUM_THREADS=1 python benchmarks/doptimality.py --sizes 20000 --no-pyace   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

GOAL_SECONDS = 60.0
GOAL_MEMORY_MB = 2048.0
GOAL_GAMMA_RATE = 1e6


def make_features(n_rows: int, dim: int, seed: int = 0, chunk: int = 20_000) -> np.ndarray:
    """(n_rows, dim) float64 features, generated chunk by chunk (no large temporaries)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    q2, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    mixing = (q1 * np.geomspace(1.0, 1e-3, dim)) @ q2
    out = np.empty((n_rows, dim))
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        out[start:stop] = rng.standard_normal((stop - start, dim)) @ mixing
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(task: str, n_rows: int, dim: int, batch_size: int) -> dict:
    """One measurement in this process; returns a JSON-able dict."""
    features = make_features(n_rows, dim)
    rss_input = _peak_mb()
    info: dict = {"task": task, "n": n_rows, "dim": dim}
    if task in ("ours_batch", "ours_dense"):
        from mlipuq.maxvol import active_set_inverse, extrapolation_grade, maxvol

        start = time.perf_counter()
        result = maxvol(features, batch_size=batch_size if task == "ours_batch" else None)
        info["seconds"] = time.perf_counter() - start
        rows = features[result.indices]
        info["swaps"] = result.n_swaps
        info["logdet"] = float(np.linalg.slogdet(rows)[1])
        info["max_train_gamma"] = float(
            extrapolation_grade(features, active_set_inverse(rows)).max()
        )
    elif task == "pyace_active_set":
        from pyace.activelearning import compute_active_set

        start = time.perf_counter()
        sets = compute_active_set({0: features}, tol=1.01, max_iters=100_000)
        info["seconds"] = time.perf_counter() - start
        rows = sets[0]
        info["logdet"] = float(np.linalg.slogdet(rows)[1])
        inverse = np.linalg.pinv(rows)
        info["max_train_gamma"] = float(np.abs(features @ inverse).max())
    elif task.startswith("gamma_"):
        from mlipuq.maxvol import extrapolation_grade

        inverse = np.linalg.inv(features[:dim] + np.eye(dim))
        runs = {}
        for _ in range(2):  # best of two
            start = time.perf_counter()
            if task == "gamma_ours":
                gamma = extrapolation_grade(features, inverse)
            elif task == "gamma_numpy":
                gamma = np.abs(features @ inverse).max(axis=1)
            else:
                from pyace.activelearning import compute_extrapolation_grade

                gamma = compute_extrapolation_grade({0: features}, {0: inverse})[0]
            runs[time.perf_counter() - start] = float(gamma.sum())
        info["seconds"] = min(runs)
        info["atoms_per_s"] = n_rows / info["seconds"]
    info["peak_rss_mb"] = _peak_mb()
    info["peak_above_input_mb"] = info["peak_rss_mb"] - rss_input
    return info


def run_task(task: str, n_rows: int, dim: int, batch_size: int) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", task, str(n_rows), str(dim), str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(f"  {task} n={n_rows}: failed ({proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--no-pyace", action="store_true", help="skip the pacemaker baseline")
    parser.add_argument("--no-dense", action="store_true", help="skip our non-batch MaxVol")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, n_rows, dim, batch = args.worker
        print(json.dumps(worker(task, int(n_rows), int(dim), int(batch))))
        return 0
    try:
        import pyace.activelearning  # noqa: F401

        have_pyace = not args.no_pyace
    except ImportError:
        have_pyace = False
        print("pyace not importable: no pacemaker baseline")
    print(f"D = {args.dim}, batch_size = {args.batch_size}, 1 thread, peak = ru_maxrss per process")
    for n_rows in args.sizes:
        print(f"\n== n = {n_rows:,} rows x {args.dim} ==")
        tasks = ["ours_batch"] + ([] if args.no_dense else ["ours_dense"])
        tasks += ["pyace_active_set"] if have_pyace else []
        build = {t: run_task(t, n_rows, args.dim, args.batch_size) for t in tasks}
        for task, info in build.items():
            if info:
                print(
                    f"  active set {task:17s} {info['seconds']:8.2f} s  "
                    f"peak {info['peak_rss_mb']:7.0f} MB (+{info['peak_above_input_mb']:.0f} "
                    f"over input)  log|det| {info['logdet']:.3f}  "
                    f"max train gamma {info['max_train_gamma']:.4f}"
                )
        ours = build.get("ours_batch")
        if ours:
            ok_t, ok_m = ours["seconds"] <= GOAL_SECONDS, ours["peak_rss_mb"] <= GOAL_MEMORY_MB
            print(
                f"  goal <= {GOAL_SECONDS:.0f} s: {ok_t}; goal <= {GOAL_MEMORY_MB:.0f} MB: {ok_m}"
            )
            for base in ("ours_dense", "pyace_active_set"):
                if build.get(base):
                    print(
                        f"  time ratio {base} / ours_batch = "
                        f"{build[base]['seconds'] / ours['seconds']:.2f}; "
                        f"|det| ratio ours_batch / {base} = "
                        f"exp({ours['logdet'] - build[base]['logdet']:+.3f})"
                    )
        gamma_tasks = ["gamma_ours", "gamma_numpy"] + (["gamma_pyace"] if have_pyace else [])
        grades = {t: run_task(t, n_rows, args.dim, args.batch_size) for t in gamma_tasks}
        for task, info in grades.items():
            if info:
                print(
                    f"  {task:12s} {info['atoms_per_s'] / 1e6:7.2f} M atoms/s  "
                    f"peak +{info['peak_above_input_mb']:.0f} MB over input"
                )
        if grades.get("gamma_ours"):
            rate = grades["gamma_ours"]["atoms_per_s"]
            print(f"  goal >= {GOAL_GAMMA_RATE:.0e} atoms/s: {rate >= GOAL_GAMMA_RATE}")
            for base in ("gamma_numpy", "gamma_pyace"):
                if grades.get(base):
                    print(f"  speed ratio ours / {base} = {rate / grades[base]['atoms_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
