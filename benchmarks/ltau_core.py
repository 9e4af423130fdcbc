"""Benchmark of the LTAU core: streaming p_i / histograms vs the naive in-memory approach.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ltau_core.py --epochs 200 --atoms 1000000
    python benchmarks/ltau_core.py --part index     # FAISS part (benchmarks/ltau_index.py)

The streaming part writes a seeded synthetic error-trajectory store (E epochs x N
atoms, float32) under a temporary directory (removed at the end), then runs each
approach in its own subprocess and reports wall seconds and peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss`` of that subprocess, which counts every page it
touched, memory-mapped file pages included), plus the peak resident memory right
after imports and opening the store (the baseline every approach pays, mostly the
atom table). Results of the two approaches are
compared: p_i must be identical and histogram masses equal to 1e-6.

Approaches
----------
streaming_p      ``store_confidence``: one epoch at a time, O(N) memory.
naive_p          ``store.read()`` -> (E, N) array, then ``(errors <= atol).mean(0)``.
streaming_hist   ``distributions_from_store``: two passes over the epochs, (N, B) counts.
naive_hist       (E, N) array in RAM, ``searchsorted`` of all of it, ``bincount`` of
                 flat (atom, bin) indices (in place where numpy allows).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
APPROACHES = ("streaming_p", "naive_p", "streaming_hist", "naive_hist")


def make_store(path: Path, n_epochs: int, n_atoms: int, *, seed: int = 0) -> float:
    """Write a synthetic store of decaying log-normal per-atom errors; return the seconds."""
    from mlipuq.atom_table import AtomTable
    from mlipuq.trajectory_store import TrajectoryStore

    rng = np.random.default_rng(seed)
    configs = max(n_atoms // 20, 1)
    sizes = np.full(configs, n_atoms // configs)
    sizes[-1] += n_atoms - sizes.sum()
    table = AtomTable.from_sizes(sizes, np.full(n_atoms, "C"))
    scale = rng.lognormal(-3.5, 0.6, size=n_atoms).astype(np.float32)
    start = time.perf_counter()
    writer = TrajectoryStore.create(path, table).writer("m0", seed=seed)
    for epoch in range(n_epochs):
        decay = np.float32(0.3 + np.exp(-epoch / 40.0))
        noise = rng.lognormal(0.0, 0.4, size=n_atoms).astype(np.float32)
        writer.append(scale * decay * noise)
    return time.perf_counter() - start


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_approach(approach: str, store_path: Path, out_dir: Path, atol: float, n_bins: int) -> dict:
    """Body of one worker subprocess: run ``approach`` once, save its result, report."""
    from mlipuq.confidence import store_confidence
    from mlipuq.distributions import distributions_from_store, shared_bins
    from mlipuq.trajectory_store import TrajectoryStore

    store = TrajectoryStore.open(store_path)
    baseline = _peak_rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    if approach == "streaming_p":
        result = store_confidence(store, "m0", atol)
    elif approach == "naive_p":
        errors = store.read("m0")
        result = (errors <= atol).mean(axis=0)
    elif approach == "streaming_hist":
        result = distributions_from_store(store, n_bins=n_bins).mass
    elif approach == "naive_hist":
        errors = store.read("m0")
        n_epochs, n_atoms = errors.shape
        edges = shared_bins(float(errors.min()), float(errors.max()), n_bins=n_bins)
        flat = np.searchsorted(edges, errors, side="right")
        flat -= 1
        np.clip(flat, 0, n_bins - 1, out=flat)
        flat += np.arange(n_atoms) * n_bins
        del errors
        counts = np.bincount(flat.ravel(), minlength=n_atoms * n_bins).reshape(n_atoms, n_bins)
        del flat
        result = (counts / n_epochs).astype(np.float32)
    else:
        raise ValueError(f"unknown approach {approach!r}")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    np.save(out_dir / f"{approach}.npy", result)
    return {
        "approach": approach,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "baseline_rss_mib": baseline,
    }


def _spawn(approach: str, store_path: Path, out_dir: Path, atol: float, n_bins: int) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        approach,
        "--store",
        str(store_path),
        "--out",
        str(out_dir),
        "--atol",
        repr(atol),
        "--bins",
        str(n_bins),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_streaming(
    n_epochs: int = 200,
    n_atoms: int = 1_000_000,
    *,
    seed: int = 0,
    n_bins: int = 100,
    workdir: str | None = None,
) -> dict:
    """Run the streaming-vs-naive comparison; print a table and return the figures."""
    from mlipuq.confidence import default_atol
    from mlipuq.trajectory_store import TrajectoryStore

    root = Path(tempfile.mkdtemp(prefix="mlipuq_bench_", dir=workdir))
    try:
        store_path = root / "store"
        write_s = make_store(store_path, n_epochs, n_atoms, seed=seed)
        size_mib = sum(p.stat().st_size for p in store_path.rglob("*.npy")) / 2**20
        print(
            f"store: {n_epochs} epochs x {n_atoms} atoms, {size_mib:.0f} MiB on disk, "
            f"written in {write_s:.1f} s ({size_mib / write_s:.0f} MiB/s, atomic per epoch)"
        )
        # atol exactly representable in float32: both approaches compare the same numbers
        atol = float(np.float32(default_atol(TrajectoryStore.open(store_path))))
        figures = {name: _spawn(name, store_path, root, atol, n_bins) for name in APPROACHES}
        p_stream, p_naive = np.load(root / "streaming_p.npy"), np.load(root / "naive_p.npy")
        h_stream, h_naive = np.load(root / "streaming_hist.npy"), np.load(root / "naive_hist.npy")
        assert np.array_equal(p_stream, p_naive), "p_i differ between streaming and naive"
        max_diff = float(np.max(np.abs(h_stream.astype(np.float64) - h_naive)))
        assert max_diff <= 1e-6, f"histogram masses differ by {max_diff}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"atol = {atol:.6g} eV/Å (training MAE of the final epoch); mean p = "
        f"{p_stream.mean():.4f}; p identical; max |mass difference| = {max_diff:.1e}"
    )
    print(f"{'approach':<16}{'wall s':>9}{'CPU s':>9}{'peak RSS MiB':>14}{'after open MiB':>16}")
    for name, row in figures.items():
        print(
            f"{name:<16}{row['seconds']:>9.2f}{row['cpu_seconds']:>9.2f}{row['peak_rss_mib']:>14.0f}"
            f"{row['baseline_rss_mib']:>16.0f}"
        )
    ratios = {}
    for task in ("p", "hist"):
        stream, naive = figures[f"streaming_{task}"], figures[f"naive_{task}"]
        ratios[task] = {
            "peak_memory_naive_over_streaming": naive["peak_rss_mib"] / stream["peak_rss_mib"],
            "time_naive_over_streaming": naive["seconds"] / stream["seconds"],
            "cpu_naive_over_streaming": naive["cpu_seconds"] / stream["cpu_seconds"],
        }
        extra = [row["peak_rss_mib"] - row["baseline_rss_mib"] for row in (naive, stream)]
        print(
            f"{task:>4}: peak memory naive/streaming = "
            f"{ratios[task]['peak_memory_naive_over_streaming']:.1f}x "
            f"(growth after opening the store: naive {extra[0]:.0f} MiB, "
            f"streaming {extra[1]:.0f} MiB), "
            f"time naive/streaming = {ratios[task]['time_naive_over_streaming']:.2f}x wall, "
            f"{ratios[task]['cpu_naive_over_streaming']:.2f}x CPU"
        )
    return {"figures": figures, "ratios": ratios, "atol": atol, "store_mib": size_mib}


def _run_index_part(args: argparse.Namespace) -> None:
    path = HERE / "ltau_index.py"
    if not path.is_file():
        print("index part skipped: benchmarks/ltau_index.py is not present")
        return
    spec = importlib.util.spec_from_file_location("ltau_index", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bench_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("streaming", "index", "all"), default="all")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--atoms", type=int, default=1_000_000)
    parser.add_argument("--bins", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the temporary store goes")
    parser.add_argument("--worker", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--atol", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = run_approach(args.worker, Path(args.store), Path(args.out), args.atol, args.bins)
        print(json.dumps(row))
        return 0
    if args.part in ("streaming", "all"):
        bench_streaming(
            args.epochs, args.atoms, seed=args.seed, n_bins=args.bins, workdir=args.workdir
        )
    if args.part in ("index", "all"):
        _run_index_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
