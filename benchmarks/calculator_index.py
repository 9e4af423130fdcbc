"""Which FAISS index is cheapest for LTAU inside an MD step (cold caches after a forward pass)?

For the runs left by ``benchmarks/nequip_calculator.py --workdir DIR`` (a 15-atom
molecule and a 108-atom Cu cell), LTAU is fitted once per index kind -- exact
``flat``, ``hnsw`` (M=16, efSearch 16) and ``ivfflat`` (the ``auto`` default for
1 000-50 000 rows) -- and the UQ step of ``UQCalculator`` (its
``save_extra_outputs`` hook) is timed inside real calculator calls, interleaved with
calls without LTAU (the forward pass baseline). Recall@k of each index against flat
is measured on the descriptors of the run's validation frames. A tight loop over
``predict`` alone would mislead: right after the forward pass the caches are cold,
which penalises the random memory accesses of a graph search.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/nequip_calculator.py --workdir DIR   # trains the runs
    OMP_NUM_THREADS=1 python benchmarks/calculator_index.py --workdir DIR
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nequip_calculator import (  # noqa: E402
    calculators_for,
    molecule_system,
    periodic_system,
    summarise,
    time_calls,
)

KINDS = {"flat": {"index": "flat"}, "hnsw": {"index": "hnsw", "hnsw_m": 16},
         "ivfflat": {"index": "ivfflat"}}


def recall_against_flat(ltau, flat, descriptors: np.ndarray, species: np.ndarray) -> float:
    """Mean fraction of the exact k neighbours found (per-element indices, same k)."""
    from mlipuq.knn_index import search

    hits = []
    for element, index in ltau.indices_.items():
        queries = descriptors[np.asarray(species) == element]
        k = min(ltau.k, index.ntotal)
        found = search(index, queries, k)[1]
        exact = search(flat.indices_[element], queries, k)[1]
        hits.append((exact[:, :, None] == found[:, None, :]).any(axis=2).ravel())
    return float(np.concatenate(hits).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="work directory of benchmarks/nequip_calculator.py")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from mlipuq.backends.nequip.features import NequIPBackend
    from mlipuq.io import read_structures
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.run_folder import RunFolder

    torch.set_num_threads(1)
    for name, make in (("molecule", molecule_system), ("periodic", periodic_system)):
        run = RunFolder.open(Path(args.workdir) / f"{name}_run")
        backend = NequIPBackend(run.model_path("model_0"), threads=1)
        train = backend.outputs(run.train_frames())
        val = backend.outputs(read_structures(run.path / "val.extxyz"))
        test = make(1, 0)[1]
        fitted = {kind: LTAUEstimator(k=args.k, n_threads=1, **options).fit_arrays(
            run.store, train.descriptors, train.species) for kind, options in KINDS.items()}
        for kind, ltau in fitted.items():
            times = time_calls(calculators_for(run.model_path("model_0"), ltau), test,
                               n_repeat=args.repeats, n_warmup=10, seed=0)
            figures = summarise(times)
            recall = recall_against_flat(ltau, fitted["flat"], val.descriptors, val.species)
            print(f"{name:8s} {len(test):4d} atoms  {kind:8s} {ltau.index_kinds_}  forward "
                  f"{figures['uq_ms']:.2f} ms  UQ step {figures['ltau_hook_ms']:.3f} ms = "
                  f"{100 * figures['hook_over_forward']:.1f} % of forward  recall@{args.k} "
                  f"{recall:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
