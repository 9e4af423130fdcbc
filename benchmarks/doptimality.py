"""Benchmark: D-optimality's core against pacemaker's, side by side on the same rows.

Measured in one run, for each size n:

* single-pass MaxVol: ``mlipuq.maxvol.maxvol(X)`` and the API around it
  (``DOptimalityEstimator.fit``) against pacemaker's ``compute_active_set``
  (compiled ``c_maxvol``): times, time ratio and both log|det|;
* batch MaxVol (``batch_size``): time and |det| relative to the single pass;
* gamma throughput, one element and two (alternating rows): the API
  (``DOptimalityEstimator.gamma(X, species)``: validation + grade), the kernel
  (``extrapolation_grade`` / ``extrapolation_grade_by_group``) and a numpy
  one-liner against pacemaker's ``compute_extrapolation_grade``, all with the same
  inverse(s); pacemaker receives the rows already split per element, as its API
  expects (the split is not timed);

and once: batch-vs-single |det| on 10^5 x 64 Gaussian matrices, several seeds and
batch sizes, next to the single pass run on the same matrices with permuted
columns (the same problem, other local maxima: the spread to compare with).

Every measurement runs in its own subprocess (OMP/OpenBLAS/MKL threads = 1), so
that its peak memory (``ru_maxrss`` of that process, including the input matrix
and the imported modules) is its own; "MB over input" is the peak minus the RSS
once the imports and the input are in place. Times are the best of ``--repeat``
runs (gamma: of as many runs as fit in 1 s, at least ``--repeat``), wall and CPU
(process) seconds; on a loaded machine the CPU seconds are the steadier figure.
Ratios > 1 mean ours is faster (baseline time / our time). pacemaker parts are
skipped, with a message, when ``pyace`` does not import.

Synthetic features: x = z @ M with z ~ N(0, 1) and M a fixed random (D, D) matrix
whose singular values decay geometrically from 1 to 1e-3 (ACE-like conditioning).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/doptimality.py                    # 1e5 and 1e6 x 64
    OMP_NUM_THREADS=1 python benchmarks/doptimality.py --sizes 100000     # ~1 min
    OMP_NUM_THREADS=1 python benchmarks/doptimality.py --sizes 20000 --no-pyace --seeds 1
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
ELEMENTS = ("Cu", "O")


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


def _best_of(repeat: int, run, min_seconds: float = 0.0, max_runs: int = 50):
    """(best wall s, best CPU s, last result) over at least ``repeat`` calls of ``run()``,
    repeated until ``min_seconds`` of wall time were spent (at most ``max_runs`` calls)."""
    wall, cpu, result, spent, runs = np.inf, np.inf, None, 0.0, 0
    while runs < repeat or (spent < min_seconds and runs < max_runs):
        w0, c0 = time.perf_counter(), time.process_time()
        result = run()
        elapsed = time.perf_counter() - w0
        wall, cpu = min(wall, elapsed), min(cpu, time.process_time() - c0)
        spent, runs = spent + elapsed, runs + 1
    return wall, cpu, result


def _logdet(rows: np.ndarray) -> float:
    return float(np.linalg.slogdet(rows)[1])


def worker(task: str, n_rows: int, dim: int, batch_size: int, repeat: int) -> dict:
    """One measurement in this process; returns a JSON-able dict."""
    info: dict = {"task": task, "n": n_rows, "dim": dim}
    if task == "batch_gaussian":  # n_rows = seed count; batch sizes fixed below
        from mlipuq.maxvol import maxvol

        info["runs"], info["permuted"] = [], []
        for seed in range(n_rows):
            x = np.random.default_rng(seed).standard_normal((100_000, dim))
            start = time.process_time()
            single = _logdet(x[maxvol(x).indices])
            info.setdefault("single_cpu", []).append(time.process_time() - start)
            for size in (8192, 20_000, 50_000):
                start = time.process_time()
                batched = _logdet(x[maxvol(x, batch_size=size).indices])
                info["runs"].append([seed, size, time.process_time() - start, batched - single])
            # the same single pass on column-permuted input (the same problem): a different
            # LU start, a different local maximum; the spread batch mode is compared with
            perms = np.random.default_rng(100 + seed)
            for _ in range(3):
                rows = maxvol(x[:, perms.permutation(dim)]).indices
                info["permuted"].append([seed, _logdet(x[rows]) - single])
        return info
    import mlipuq.doptimality  # noqa: F401  (imports are not counted as the method's memory)

    if "pyace" in task:
        import pyace.activelearning  # noqa: F401
    features = make_features(n_rows, dim)
    rss_input = _peak_mb()
    n_el = 2 if task.endswith("_2el") else 1
    species = np.array(ELEMENTS[:n_el] * (n_rows // n_el) + ELEMENTS[: n_rows % n_el])
    if task in ("maxvol_ours", "maxvol_batch", "fit_ours", "maxvol_pyace"):
        from mlipuq.maxvol import active_set_inverse, extrapolation_grade, maxvol

        if task == "maxvol_pyace":
            from pyace.activelearning import compute_active_set

            def run():
                return compute_active_set({0: features}, tol=1.01, max_iters=10**7)[0]

            wall, cpu, rows = _best_of(repeat, run)
            inverse = np.linalg.pinv(rows)
        elif task == "fit_ours":
            from mlipuq.doptimality import DOptimalityEstimator

            def run():
                est = DOptimalityEstimator()
                return getattr(est, "fit_arrays", est.fit)(features, species)

            wall, cpu, est = _best_of(repeat, run)
            rows, inverse = est.active_sets_["Cu"], est.active_inverse_["Cu"]
        else:
            size = batch_size if task == "maxvol_batch" else None
            wall, cpu, result = _best_of(repeat, lambda: maxvol(features, batch_size=size))
            rows = features[result.indices]
            inverse = active_set_inverse(rows)
            info["swaps"] = result.n_swaps
        info["logdet"] = _logdet(rows)
        info["max_train_gamma"] = float(extrapolation_grade(features, inverse).max())
    elif task.startswith("gamma_"):
        inverses = {
            el: np.linalg.inv(features[k * dim : (k + 1) * dim] + np.eye(dim))
            for k, el in enumerate(ELEMENTS[:n_el])
        }
        kind = task.removeprefix("gamma_").removesuffix("_2el")
        if kind == "api":
            from mlipuq.doptimality import DOptimalityEstimator

            est = DOptimalityEstimator.from_active_sets(
                {el: np.linalg.inv(b) for el, b in inverses.items()}, inverses=inverses
            )

            def run():
                return est.gamma(features, species)
        elif kind == "kernel" and n_el == 1:
            from mlipuq.maxvol import extrapolation_grade

            def run():
                return extrapolation_grade(features, inverses["Cu"])
        elif kind == "kernel":
            from mlipuq.maxvol import extrapolation_grade_by_group

            def run():
                return extrapolation_grade_by_group(features, species, inverses)
        elif kind == "numpy" and n_el == 1:

            def run():
                return np.abs(features @ inverses["Cu"]).max(axis=1)
        elif kind == "numpy":
            masks = [species == el for el in inverses]

            def run():
                gamma = np.empty(n_rows)
                for mask, inverse in zip(masks, inverses.values(), strict=True):
                    gamma[mask] = np.abs(features[mask] @ inverse).max(axis=1)
                return gamma
        else:
            from pyace.activelearning import compute_extrapolation_grade

            split = {0: features}  # pacemaker's input: one (n_s, D) array per species type
            if n_el > 1:
                split = {k: features[species == el] for k, el in enumerate(inverses)}
            by_type = dict(enumerate(inverses.values()))

            def run():
                return compute_extrapolation_grade(split, by_type)

        wall, cpu, _ = _best_of(repeat, run, min_seconds=1.0)
    else:
        raise ValueError(f"unknown task {task}")
    info.update(wall=wall, cpu=cpu)
    info["peak_rss_mb"] = _peak_mb()
    info["peak_above_input_mb"] = info["peak_rss_mb"] - rss_input
    return info


def run_task(task: str, n_rows: int, dim: int, batch_size: int, repeat: int) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", task, str(n_rows), str(dim), str(batch_size)]
    cmd += ["--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(f"  {task} n={n_rows}: failed ({proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(base: dict | None, ours: dict | None) -> str:
    if not base or not ours:
        return "n/a"
    return f"{base['wall'] / ours['wall']:.2f}x wall, {base['cpu'] / ours['cpu']:.2f}x cpu"


def _maxvol_section(n_rows: int, args: argparse.Namespace, have_pyace: bool) -> None:
    tasks = {
        "maxvol_ours": "ours  maxvol(X)",
        "fit_ours": "ours  DOptimalityEstimator.fit",
        "maxvol_batch": f"ours  maxvol(X, batch_size={args.batch_size})",
    }
    if have_pyace:
        tasks["maxvol_pyace"] = "pyace compute_active_set"
    print(
        f"  {'MaxVol (tol 1.01)':34s} {'wall s':>7s} {'cpu s':>7s} {'peak MB':>8s} "
        f"{'log|det|':>9s} {'swaps':>6s}  max train gamma"
    )
    done = {}
    for task, label in tasks.items():
        info = run_task(task, n_rows, args.dim, args.batch_size, args.repeat)
        done[task] = info
        if info:
            print(
                f"  {label:34s} {info['wall']:7.2f} {info['cpu']:7.2f} "
                f"{info['peak_rss_mb']:8.0f} {info['logdet']:9.3f} "
                f"{info.get('swaps', ''):>6}  {info['max_train_gamma']:.4f}"
            )
    ours, pyace, batch = done.get("maxvol_ours"), done.get("maxvol_pyace"), done["maxvol_batch"]
    if ours and pyace:
        print(
            f"  single pass, pyace time / our time: {_ratio(pyace, ours)}; "
            f"|det| ours / pyace = exp({ours['logdet'] - pyace['logdet']:+.3f})"
        )
        if done.get("fit_ours"):
            print(f"  DOptimalityEstimator.fit vs pyace: {_ratio(pyace, done['fit_ours'])}")
    if ours and batch:
        gap = batch["logdet"] - ours["logdet"]
        print(
            f"  batch / single pass: time {batch['wall'] / ours['wall']:.2f}x, "
            f"|det| exp({gap:+.3f}) = {np.exp(gap):.3f}"
        )
    if batch:
        ok_t, ok_m = batch["wall"] <= GOAL_SECONDS, batch["peak_rss_mb"] <= GOAL_MEMORY_MB
        print(f"  batch goal <= {GOAL_SECONDS:.0f} s: {ok_t}; <= {GOAL_MEMORY_MB:.0f} MB: {ok_m}")


def _gamma_section(n_rows: int, args: argparse.Namespace, have_pyace: bool, n_el: int) -> None:
    suffix = "_2el" if n_el == 2 else ""
    kernel = "extrapolation_grade" + ("_by_group" if n_el == 2 else "")
    tasks = {
        "gamma_api": "ours  DOptimalityEstimator.gamma",
        "gamma_kernel": f"ours  {kernel}",
        "gamma_numpy": "numpy abs(X @ B).max(1) per element",
    }
    if have_pyace:
        tasks["gamma_pyace"] = "pyace compute_extrapolation_grade"
    title = "gamma, 1 element" if n_el == 1 else "gamma, 2 elements (alternating)"
    print(f"  {title:39s} {'M atoms/s':>9s} {'(cpu)':>7s} {'MB over input':>14s}")
    done = {}
    for task, label in tasks.items():
        info = run_task(task + suffix, n_rows, args.dim, args.batch_size, args.repeat)
        done[task] = info
        if info:
            print(
                f"  {label:39s} {n_rows / info['wall'] / 1e6:9.2f} "
                f"{n_rows / info['cpu'] / 1e6:7.2f} {info['peak_above_input_mb']:14.0f}"
            )
    if done.get("gamma_pyace"):
        for task in ("gamma_api", "gamma_kernel"):
            print(f"  {tasks[task][6:]} / pyace: {_ratio(done['gamma_pyace'], done[task])}")
    if n_el == 1 and done.get("gamma_api"):
        rate = n_rows / done["gamma_api"]["wall"]
        print(f"  goal >= {GOAL_GAMMA_RATE:.0e} atoms/s (API, wall): {rate >= GOAL_GAMMA_RATE}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="none: Gaussian only"
    )
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument(
        "--seeds", type=int, default=3, help="Gaussian seeds for batch |det| (0: skip)"
    )
    parser.add_argument("--no-pyace", action="store_true", help="skip the pacemaker baseline")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, n_rows, dim, batch = args.worker
        print(json.dumps(worker(task, int(n_rows), int(dim), int(batch), args.repeat)))
        return 0
    have_pyace = False
    if args.no_pyace:
        print("--no-pyace: pacemaker baselines skipped")
    else:
        try:
            import pyace.activelearning  # noqa: F401

            have_pyace = True
        except ImportError as exc:
            print(f"pyace not importable ({exc}): pacemaker baselines skipped")
    print(
        f"D = {args.dim}, batch_size = {args.batch_size}, 1 thread, best of {args.repeat} "
        f"(gamma: >= 1 s of runs), peak = ru_maxrss per process, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    for n_rows in args.sizes:
        print(f"\n== n = {n_rows:,} rows x {args.dim} ==")
        _maxvol_section(n_rows, args, have_pyace)
        _gamma_section(n_rows, args, have_pyace, 1)
        _gamma_section(n_rows, args, have_pyace, 2)
    if args.seeds:
        print(
            f"\n== batch vs single-pass |det|, 100,000 x {args.dim} Gaussian, "
            f"seeds 0-{args.seeds - 1} ==\n  |det| / |det| of the single pass on the same matrix:"
        )
        info = run_task("batch_gaussian", args.seeds, args.dim, 0, 1)
        if info:
            for (seed, size, cpu, gap), single_cpu in zip(
                info["runs"], np.repeat(info["single_cpu"], 3), strict=True
            ):
                print(
                    f"  seed {seed} batch_size {size:6d}: {np.exp(gap):.3f}  "
                    f"({cpu:.2f} s cpu; single pass {single_cpu:.2f} s)"
                )
            for seed, gap in info["permuted"]:
                print(f"  seed {seed} single pass, permuted columns: {np.exp(gap):.3f}")
            for label, key in (("batch", "runs"), ("permuted single pass", "permuted")):
                gaps = np.array([row[-1] for row in info[key]])
                print(
                    f"  {label}: range {np.exp(gaps.min()):.3f} - {np.exp(gaps.max()):.3f}, "
                    f"geometric mean {np.exp(gaps.mean()):.3f}, larger than the single pass in "
                    f"{int((gaps > 0).sum())}/{len(gaps)}"
                )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
