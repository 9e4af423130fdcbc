"""Benchmark: two-level MaxVol on a Dask cluster against the single pass, same rows.

For each size n (rows x 64 features of one element), measured in one run:

* single pass: ``mlipuq.maxvol.maxvol(X)`` on the whole matrix in this process (the
  matrix read into memory first, not timed);
* two-level (:func:`mlipuq.distributed.doptimality.two_level_active_sets`) on a
  ``distributed.LocalCluster`` of 1 and of 2 worker processes (1 thread each), the
  matrix stored as a chunked array (:mod:`mlipuq.distributed.chunked`) that each
  chunk task memory-maps: level 1 per chunk, level 2 over the union of the chunks'
  active rows, then the refinement that merges training rows with gamma > tol;
  and, with the most workers, the same without refinement.

Printed per row: wall seconds (cluster start and the workers' imports excluded), CPU
seconds of all processes (this one and the workers), the single pass's wall time over
this one (> 1: faster than the single pass), log|det| of the active set minus the
single pass's (0: the same volume; > 0: larger), refinement rounds, the largest gamma
of any training row on the final set, and the peak resident memory (MB; VmHWM,
including the imported modules) of this process for the single pass, of the largest
worker otherwise.

Synthetic features: x = z @ M, z ~ N(0, 1), M a fixed random (64, 64) matrix with
singular values decaying geometrically from 1 to 1e-3 (as benchmarks/doptimality.py),
generated chunk by chunk (seeded per chunk).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dask_doptimality.py                     # 1e5, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/dask_doptimality.py --sizes 100000 1000000
    OMP_NUM_THREADS=1 python benchmarks/dask_doptimality.py --chunk-rows 50000

On a shared machine the wall times carry the other jobs' load: read the CPU
seconds and the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 64
TOL = 1.01


def write_features(directory: Path, n_rows: int, chunk_rows: int, seed: int = 0) -> None:
    """(n_rows, DIM) features as a chunked array, one chunk of ``chunk_rows`` at a time."""
    from mlipuq.distributed.chunked import row_blocks, write_chunk, write_manifest

    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    q2, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    mixing = (q1 * np.geomspace(1.0, 1e-3, DIM)) @ q2
    directory.mkdir(parents=True)
    blocks = row_blocks(n_rows, chunk_rows)
    for number, block in enumerate(blocks):
        chunk_rng = np.random.default_rng([seed, number])
        write_chunk(directory, number,
                    chunk_rng.standard_normal((block.stop - block.start, DIM)) @ mixing)
    write_manifest(directory, blocks, (n_rows, DIM), np.float64)


def _worker_cpu() -> float:
    return time.process_time()


def _worker_peak_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM: unlike ``ru_maxrss`` not
    inherited from the parent that forked it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def single_pass(directory: Path) -> dict:
    from mlipuq.distributed.chunked import read_all
    from mlipuq.maxvol import maxvol

    features = read_all(directory)
    wall, cpu = time.perf_counter(), time.process_time()
    result = maxvol(features, tol=TOL)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gamma = np.abs(features @ np.linalg.inv(features[result.indices])).max(axis=1)
    return {"wall": wall, "cpu": cpu, "logdet": np.linalg.slogdet(features[result.indices])[1],
            "rounds": 0, "max_gamma": float(gamma.max()), "peak": _worker_peak_mb()}


def two_level(directory: Path, n_workers: int, refine: bool) -> dict:
    from distributed import Client, LocalCluster

    from mlipuq.distributed.chunked import as_dask_array
    from mlipuq.distributed.doptimality import two_level_active_sets

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=50) as cluster, \
            Client(cluster) as client:
        features = as_dask_array(directory)
        species = np.full(features.shape[0], "Cu")
        client.run(importlib.import_module, "mlipuq.distributed.doptimality")  # not timed
        before = sum(client.run(_worker_cpu).values())
        wall, cpu = time.perf_counter(), time.process_time()
        found = two_level_active_sets(features, species, client, tol=TOL, refine=refine)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        cpu += sum(client.run(_worker_cpu).values()) - before
        peak = max(client.run(_worker_peak_mb).values())
    item = found["Cu"]
    return {"wall": wall, "cpu": cpu, "logdet": np.linalg.slogdet(item.active.rows)[1],
            "rounds": item.n_rounds, "max_gamma": item.max_gamma, "peak": peak,
            "chunks": item.n_chunks, "candidates": item.n_candidates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--chunk-rows", type=int, default=25_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; tol {TOL}; "
          f"chunks of {args.chunk_rows} rows")
    header = ("| rows x 64 | path | workers | chunks | wall s | CPU s | single / this (wall) "
              "| log\\|det\\| - single | rounds | max train gamma | peak MB |")
    print(header)
    print("|---" * 11 + "|")
    for n_rows in args.sizes:
        with tempfile.TemporaryDirectory(prefix="dask_dopt_") as tmp:
            directory = Path(tmp) / "features"
            write_features(directory, n_rows, args.chunk_rows, args.seed)
            base = single_pass(directory)
            runs = [("single pass", 1, None, base)]
            for n_workers in args.workers:
                runs.append(("two-level", n_workers, True,
                             two_level(directory, n_workers, refine=True)))
            runs.append(("two-level, no refinement", max(args.workers), False,
                         two_level(directory, max(args.workers), refine=False)))
            for name, workers, _, row in runs:
                gamma = "-" if row["max_gamma"] is None else f"{row['max_gamma']:.4f}"
                print(f"| {n_rows:.0e} | {name} | {workers if name != 'single pass' else '-'} "
                      f"| {row.get('chunks', 1)} | {row['wall']:.2f} | {row['cpu']:.2f} "
                      f"| {base['wall'] / row['wall']:.2f} "
                      f"| {row['logdet'] - base['logdet']:+.3f} | {row['rounds']} "
                      f"| {gamma} | {row['peak']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
