"""Neighbour-search cost of LTAU: exact flat index vs HNSW, with recall against flat.

Training descriptors are a seeded Gaussian mixture (clustered, as latent features
are: 200 unit-normal centres), 64 features; by default each cluster spreads along 8
of its own directions (low intrinsic dimension, as real latent features),
``--intrinsic-dim 0`` makes the clusters isotropic (the hard case). Queries
come from the same mixture. For each training size the script builds
``IndexFlatL2`` (the baseline) and ``IndexHNSWFlat(M=32, efConstruction=40)``,
times the search of the queries at several ``efSearch`` values and reports the time
per query atom, the ratio flat / HNSW and recall@k against the flat result.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/ltau_index.py --sizes 100000 1000000 --threads 2

``bench_index`` is also called by ``benchmarks/ltau_core.py --part index``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from mlipuq.knn_index import build_index, faiss_threads, search, set_search_params


def mixture(
    rng: np.random.Generator,
    n: int,
    dim: int,
    centres: np.ndarray,
    bases: np.ndarray | None = None,
) -> np.ndarray:
    """``n`` float32 points of a Gaussian mixture around ``centres``.

    Without ``bases`` each cluster is isotropic (spread 0.35 in every one of the
    ``dim`` directions: intrinsic dimension ``dim``, the hard case for HNSW). With
    ``bases`` (n_clusters, d_int, dim), cluster c spreads 0.35 * sqrt(dim / d_int)
    along its own d_int orthonormal directions (same total variance) plus 0.02
    isotropic noise: low intrinsic dimension, as latent features have (3BPA NequIP
    descriptors: 95 % of the variance of an element in 4-5 of 32 directions).
    """
    labels = rng.integers(len(centres), size=n)
    out = np.empty((n, dim), dtype=np.float32)
    if bases is None:
        for start in range(0, n, 100_000):  # bounded float64 temporaries
            part = slice(start, min(start + 100_000, n))
            noise = rng.standard_normal((part.stop - part.start, dim))
            out[part] = centres[labels[part]] + 0.35 * noise
        return out
    spread = 0.35 * np.sqrt(dim / bases.shape[1])
    for cluster in range(len(centres)):
        rows = np.flatnonzero(labels == cluster)
        z = rng.standard_normal((len(rows), bases.shape[1]))
        noise = 0.02 * rng.standard_normal((len(rows), dim))
        out[rows] = centres[cluster] + spread * (z @ bases[cluster]) + noise
    return out


def cluster_bases(rng: np.random.Generator, n_clusters: int, d_int: int, dim: int) -> np.ndarray:
    """Random orthonormal (d_int, dim) bases, one per cluster."""
    return np.stack(
        [np.linalg.qr(rng.standard_normal((dim, d_int)))[0].T for _ in range(n_clusters)]
    )


def recall_at_k(reference: np.ndarray, found: np.ndarray) -> float:
    """Mean fraction of the exact k neighbours that were returned."""
    hits = (reference[:, :, None] == found[:, None, :]).any(axis=2)
    return float(hits.mean())


def _timed_search(index, queries: np.ndarray, k: int, n_threads: int, repeats: int):
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = search(index, queries, k, n_threads=n_threads)
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_index(
    sizes: Sequence[int] = (100_000, 1_000_000),
    *,
    dim: int = 64,
    n_queries: int = 2_000,
    k: int = 5,
    ef_search: Sequence[int] = (16, 32, 64, 128),
    hnsw_m: int = 32,
    ef_construction: int = 40,
    n_threads: int = 2,
    repeats: int = 3,
    intrinsic_dim: int | None = 8,
    seed: int = 0,
    verbose: bool = True,
) -> list[dict]:
    """Time flat vs HNSW search per query atom; recall@k of HNSW against flat.

    ``intrinsic_dim`` (default 8) gives each cluster a low-dimensional spread, like
    real latent features; ``None`` gives isotropic clusters (worst case).

    Returns
    -------
    list of dict
        One row per (size, index, efSearch): ``n_train``, ``index``, ``ef_search``,
        ``build_s``, ``us_per_query`` (µs per query atom, best of ``repeats``),
        ``recall`` (1.0 for flat), ``flat_over_index`` (flat time / this time).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim))
    bases = None if intrinsic_dim is None else cluster_bases(rng, 200, intrinsic_dim, dim)
    queries = mixture(rng, n_queries, dim, centres, bases)
    rows: list[dict] = []
    for n_train in sizes:
        train = mixture(
            np.random.default_rng(seed + int(n_train)), int(n_train), dim, centres, bases
        )
        with faiss_threads(n_threads):
            start = time.perf_counter()
            flat = build_index(train, kind="flat", n_threads=n_threads)
            flat_build = time.perf_counter() - start
            flat_s, (_, exact) = _timed_search(flat, queries, k, n_threads, repeats)
            del flat
            flat_row = {"n_train": int(n_train), "index": "flat", "ef_search": None,
                        "build_s": flat_build, "us_per_query": 1e6 * flat_s / n_queries,
                        "recall": 1.0, "flat_over_index": 1.0}
            rows.append(flat_row)
            _report(flat_row, verbose)
            start = time.perf_counter()
            hnsw = build_index(train, kind="hnsw", hnsw_m=hnsw_m,
                               ef_construction=ef_construction, n_threads=n_threads)
            hnsw_build = time.perf_counter() - start
            for ef in ef_search:
                set_search_params(hnsw, ef_search=ef)
                seconds, (_, found) = _timed_search(hnsw, queries, k, n_threads, repeats)
                row = {"n_train": int(n_train), "index": "hnsw", "ef_search": int(ef),
                       "build_s": hnsw_build, "us_per_query": 1e6 * seconds / n_queries,
                       "recall": recall_at_k(exact, found), "flat_over_index": flat_s / seconds}
                rows.append(row)
                _report(row, verbose)
            del hnsw, train
    return rows


def _report(row: dict, verbose: bool) -> None:
    if not verbose:
        return
    ef = "-" if row["ef_search"] is None else row["ef_search"]
    print(
        f"{row['n_train']:>9d}  {row['index']:<5s} ef={ef:<4}  build {row['build_s']:7.1f} s  "
        f"{row['us_per_query']:9.2f} µs/query  recall@k {row['recall']:.4f}  "
        f"flat/index {row['flat_over_index']:7.1f}x",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python benchmarks/ltau_index.py [--sizes ...] [--threads 2]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M")
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--intrinsic-dim", type=int, default=8,
                        help="per-cluster intrinsic dimension; 0: isotropic clusters")
    parser.add_argument("--quick", action="store_true", help="20 000 atoms, 500 queries")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries = [20_000], 500
    intrinsic = args.intrinsic_dim or None
    shape = "isotropic clusters" if intrinsic is None else f"clusters of intrinsic dim {intrinsic}"
    print(f"LTAU neighbour search: {args.dim}-d Gaussian mixture ({shape}), k={args.k}, "
          f"{args.queries} queries, {args.threads} threads (baseline: IndexFlatL2); HNSW M="
          f"{args.hnsw_m}, efConstruction={args.ef_construction}")
    bench_index(args.sizes, dim=args.dim, n_queries=args.queries, k=args.k,
                ef_search=args.ef_search, hnsw_m=args.hnsw_m,
                ef_construction=args.ef_construction, n_threads=args.threads, repeats=args.repeats,
                intrinsic_dim=intrinsic, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
