"""Dask scale-out of LTAU: 1 vs 2 LocalCluster workers, peak memory per worker, recall.

A synthetic trajectory store (N atoms x E epochs x M models, float32 error norms,
gamma-distributed) and synthetic 64-d descriptors (a Gaussian mixture of low
intrinsic dimension, as in ``benchmarks/ltau_index.py``) are written once into
``--cache`` (outside the repository). For each worker count the script starts a
``LocalCluster`` (processes, 1 thread each) and times:

- **distributions**: per-atom histograms and p_i over every epoch of every model,
  one task per ``--chunk-size`` atoms (:func:`mlipuq.distributed.ltau.
  distributions_on_cluster`, both passes: error range and counts);
- **index train**: the IVF index trained on a seeded sample in the client (serial:
  the same for every worker count);
- **index add**: the rows added shard by shard on the workers, shards written to disk;
- **search**: ``--queries`` query atoms searched shard by shard with a top-k merge.

"fit" is distributions + train + add, "predict" the search. The peak resident memory
of every worker process (psutil RSS sampled every 50 ms in each worker) is reported,
and recall@k of the approximate index against an exact sharded flat search of the
same queries.
Timings are wall times of one run; the ratio column is t(1 worker) / t(2 workers).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dask_scaling.py --atoms 1e6 --epochs 100 \\
        --models 3 --cache /work/bench_cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from ltau_index import cluster_bases, mixture, recall_at_k  # noqa: E402
from mlipuq.atom_table import AtomTable  # noqa: E402
from mlipuq.distributed.chunked import (  # noqa: E402
    as_dask_array,
    read_manifest,
    row_blocks,
    write_chunk,
    write_manifest,
)
from mlipuq.distributed.ltau import (  # noqa: E402
    build_group_index,
    distributions_on_cluster,
    search_on_cluster,
)
from mlipuq.trajectory_store import TrajectoryStore  # noqa: E402

DIM = 64
ATOMS_PER_CONFIG = 100


def synthetic_store(cache: Path, n_atoms: int, n_epochs: int, n_models: int,
                    seed: int = 0) -> TrajectoryStore:
    """The cached store (written once): errors ~ Gamma(2, 0.05 eV/Å) per atom and epoch,
    each atom with its own scale, shrinking over the epochs."""
    path = cache / f"store_N{n_atoms}_E{n_epochs}_M{n_models}"
    sizes = [ATOMS_PER_CONFIG] * (n_atoms // ATOMS_PER_CONFIG)
    if n_atoms % ATOMS_PER_CONFIG:
        sizes.append(n_atoms % ATOMS_PER_CONFIG)
    table = AtomTable.from_sizes(sizes, np.full(n_atoms, "Cu"))
    store = TrajectoryStore.create(path, table)
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, n_atoms).astype(np.float32)
    for model in range(n_models):
        writer = store.writer(f"model_{model}", seed=model)
        for epoch in range(writer.next_epoch, n_epochs):
            decay = np.float32(0.05 * (1 + 4 * np.exp(-epoch / 20)))
            errors = rng.gamma(2.0, 1.0, n_atoms).astype(np.float32) * scale * decay
            writer.append(errors, epoch=epoch)
            if epoch % 20 == 0:
                print(f"  store: model {model} epoch {epoch}", flush=True)
    return store


def synthetic_descriptors(cache: Path, n_rows: int, name: str, seed: int,
                          chunk: int) -> Path:
    """A chunked (n_rows, 64) float32 array of the mixture, written once."""
    path = cache / f"{name}_N{n_rows}_D{DIM}"
    if (path / "manifest.json").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    centres_rng = np.random.default_rng(12345)  # the same mixture for training and queries
    centres = centres_rng.normal(size=(200, DIM)) * 1.0
    bases = cluster_bases(centres_rng, 200, 8, DIM)
    rng = np.random.default_rng(seed)
    blocks = row_blocks(n_rows, chunk)
    for number, block in enumerate(blocks):
        write_chunk(path, number, mixture(rng, block.stop - block.start, DIM, centres, bases))
    write_manifest(path, blocks, (n_rows, DIM), np.float32)
    return path


def start_rss_sampler(client, interval: float = 0.05) -> None:
    """Sample every worker's resident memory (psutil RSS) every ``interval`` s in a
    thread of its own. ``ru_maxrss`` is not used: a worker process forked from the
    client inherits the client's high-water mark."""

    def start(dask_worker) -> None:
        import threading

        import psutil

        process = psutil.Process()
        dask_worker.rss_peak = process.memory_info().rss

        def sample() -> None:
            while dask_worker.status.name not in ("closing", "closed"):
                dask_worker.rss_peak = max(dask_worker.rss_peak, process.memory_info().rss)
                time.sleep(interval)

        threading.Thread(target=sample, daemon=True).start()

    client.run(start)


def peak_rss_mb(client) -> list[float]:
    """Peak resident memory (MB) of every worker process since the sampler started."""

    def peak(dask_worker) -> float:
        return dask_worker.rss_peak / 1e6

    return sorted(client.run(peak).values())


def run_workers(n_workers: int, store: TrajectoryStore, train: Path, queries: np.ndarray,
                args: argparse.Namespace, work: Path) -> dict:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           memory_limit=args.memory_limit, dashboard_address=":0")
    client = Client(cluster)
    try:
        client.run(lambda: __import__("faiss") and None)  # imports outside the timings
        start_rss_sampler(client)
        out = Path(tempfile.mkdtemp(dir=work, prefix=f"w{n_workers}-"))
        times, peaks = {}, {}
        start = time.perf_counter()
        distributions_on_cluster(store, client, out=out / "dist", limits=0.1,
                                 chunk_size=args.chunk_size)
        times["distributions"] = time.perf_counter() - start
        peaks["distributions"] = max(peak_rss_mb(client))

        desc = as_dask_array(train)
        n_rows = desc.shape[0]
        options = {"ivf_nlist": args.nlist, "nprobe": args.nprobe or None, "pq_m": args.pq_m,
                   "seed": 0, "n_threads": 1}
        timings: dict = {}
        _, shards = build_group_index(client, desc, np.arange(n_rows), kind=args.index,
                                      options=options, out=out / "index", name="all",
                                      chunk_size=args.chunk_size, merge=False,
                                      timings=timings)
        times["index train"], times["index add"] = timings["train"], timings["add"]
        peaks["index"] = max(peak_rss_mb(client))
        import faiss

        nprobe = faiss.read_index(shards[0][0]).nprobe
        start = time.perf_counter()
        _, found = search_on_cluster(client, shards, queries, args.k, nprobe=nprobe,
                                     chunk_size=args.query_chunk)
        times["search"] = time.perf_counter() - start
        peaks["search"] = max(peak_rss_mb(client))
        result = {"times": times, "peak_rss_mb": peak_rss_mb(client), "found": found,
                  "peaks": peaks}
        if n_workers == max(args.workers) and not args.skip_recall:
            # the exact reference: flat shards, searched by the same machinery
            _, flat = build_group_index(
                client, desc, np.arange(n_rows), kind="flat", options={"seed": 0},
                out=out / "flat", name="flat", chunk_size=args.chunk_size, merge=False)
            start = time.perf_counter()
            n_recall = int(args.recall_queries or len(queries))
            _, exact = search_on_cluster(client, flat, queries[:n_recall], args.k,
                                         chunk_size=args.query_chunk)
            result["exact search"] = time.perf_counter() - start
            result["exact"] = exact
        return result
    finally:
        client.close()
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=float, default=1e6, help="training atoms N")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--queries", type=float, default=1e5, help="query atoms")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--index", choices=("ivfflat", "ivfpq"), default="ivfflat")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default by size)")
    parser.add_argument("--nprobe", type=int, default=8,
                        help="lists scanned per query (0: mlipuq's default by kind, "
                        "max(4, nlist / 16) for IVF-flat)")
    parser.add_argument("--pq-m", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=100_000,
                        help="atoms per task / rows per shard")
    parser.add_argument("--query-chunk", type=int, default=25_000, help="queries per task")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory-limit", default="4GB", help="per worker")
    parser.add_argument("--cache", type=Path, default=Path("/work/bench_cache"))
    parser.add_argument("--recall-queries", type=float, default=None,
                        help="exact search of only the first this many queries (default: "
                        "all; cost N x queries distance evaluations)")
    parser.add_argument("--skip-recall", action="store_true",
                        help="no exact search (no recall figure): timings and memory only")
    parser.add_argument("--merge-fan-in", type=int, default=None,
                        help="shard results per top-k merge task (default: mlipuq's "
                             "MERGE_FAN_IN; a huge value merges all shards in one task)")
    args = parser.parse_args()
    if args.merge_fan_in is not None:
        import mlipuq.distributed.ltau as distributed_ltau

        distributed_ltau.MERGE_FAN_IN = args.merge_fan_in
    n_atoms, n_queries = int(args.atoms), int(args.queries)
    args.cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    store = synthetic_store(args.cache, n_atoms, args.epochs, args.models)
    train = synthetic_descriptors(args.cache, n_atoms, "train", 1, args.chunk_size)
    query_path = synthetic_descriptors(args.cache, n_queries, "queries", 2, args.chunk_size)
    queries = np.asarray(as_dask_array(query_path).compute())
    disk = sum(f.stat().st_size for f in Path(store.path).rglob("*.npy")) / 1e9
    print(f"data ready in {time.perf_counter() - start:.0f} s: store {disk:.2f} GB, "
          f"descriptors {read_manifest(train)['shape']}")
    work = Path(tempfile.mkdtemp(dir=args.cache, prefix="run-"))
    try:
        runs = {n: run_workers(n, store, train, queries, args, work) for n in args.workers}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    low, high = min(args.workers), max(args.workers)
    steps = ["distributions", "index train", "index add", "search"]
    print(f"\nN = {n_atoms:,} atoms x {args.epochs} epochs x {args.models} models; "
          f"{n_queries:,} queries, k = {args.k}, index {args.index}, "
          f"chunk {args.chunk_size:,}; cpus {os.cpu_count()}")
    print(f"{'step':<22}" + "".join(f"{f'{n} worker(s) [s]':>18}" for n in args.workers)
          + f"{f'ratio {low}->{high}':>14}")
    rows = {step: [runs[n]["times"][step] for n in args.workers] for step in steps}
    rows["LTAU fit (train+add)"] = [runs[n]["times"]["index train"]
                                    + runs[n]["times"]["index add"] for n in args.workers]
    rows["LTAU fit+predict"] = [rows["LTAU fit (train+add)"][i] + rows["search"][i]
                                for i in range(len(args.workers))]
    rows["LTAU add+search"] = [rows["index add"][i] + rows["search"][i]
                               for i in range(len(args.workers))]
    for step, values in rows.items():
        ratio = values[0] / values[-1]
        print(f"{step:<22}" + "".join(f"{v:18.2f}" for v in values) + f"{ratio:14.2f}")
    for n in args.workers:
        peaks = ", ".join(f"{p:.0f}" for p in runs[n]["peak_rss_mb"])
        steps_peak = ", ".join(f"{k} {v:.0f}" for k, v in runs[n]["peaks"].items())
        print(f"peak RSS per worker, {n} worker(s): {peaks} MB (largest, after each step: "
              f"{steps_peak} MB)")
    if args.skip_recall:
        return
    exact = runs[high]["exact"]
    for n in args.workers:
        found = runs[n]["found"][:len(exact)]
        print(f"recall@{args.k} ({args.index}, {n} worker(s)) vs exact flat search of "
              f"{len(exact):,} queries: {recall_at_k(exact, found):.4f}")
    print(f"exact sharded flat search ({high} workers): {runs[high]['exact search']:.1f} s")


if __name__ == "__main__":
    main()
