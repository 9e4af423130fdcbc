"""Detection rates of every UQ method on tungsten (uq-ace subsets), NequIP features.

Trains a small NequIP ensemble on elastic + sphere (the uq-ace paper's heterogeneous
training set; reference ``energy`` in eV, identical to ``energy_corrected`` in these
files; no isolated-atom file, so :func:`~mlipuq.backends.nequip.training.train_ensemble`
fits the per-atom energy by least squares) and evaluates on non-elastic,
period-defect and cluster-cluster: the fraction of configurations and atoms each
method flags, next to the paper's figures (ensemble 0.076 % / 0.265 %, global
D-optimality 75.4 % / 10 %).

Methods (all on model_0's ``node_features`` except the ensemble):

- global D-optimality, gamma > 1;
- clustered D-optimality, k-means (``--clusters``) and ``config_type`` labels
  (elastic / sphere), min over clusters of gamma > 1;
- ensemble, Tukey fences (Q3 + 1.5 IQR) of the training-set uncertainty;
- LTAU, 1 - p > 0.5 (an error above atol more likely than not).

Usage (from the repository root)::

    python benchmarks/w_methods.py [DATA] --epochs 30 --models 3 --preset small \
        --threads 1 --max-configs 100 --out /tmp/mlipuq_bench_w

``DATA`` defaults to ``../shared/data`` relative to the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acac import (  # noqa: E402
    DEFAULT_DATA,
    cost_table,
    data_dir,
    fmt,
    metric_table,
    note,
    subsample,
    train_or_reuse,
    write_subset,
)

TRAIN_SETS = ("elastic", "sphere")
TEST_SETS = ("non-elastic", "period-defect", "cluster-cluster")
LABELS = "clustered_doptimality_labels"
PAPER = {  # uq-ace paper, elastic + sphere training set: % of configurations / atoms
    "ensemble": ("0.076 %", "0.265 %"),
    "doptimality": ("75.4 %", "10 %"),
}


def train(args, folder: Path, start: float):
    from mlipuq.backends.nequip.training import train_ensemble
    from mlipuq.io import read_structures

    frames = []
    for name in TRAIN_SETS:
        frames.extend(read_structures(folder / f"{name}.xyz", require_forces=True))
    train_file = write_subset(frames, Path(args.out) / "train_elastic_sphere.extxyz")
    note(f"training {args.models} model(s), preset {args.preset}, {args.epochs} epochs, "
         f"{args.threads} thread(s) on {len(frames)} configurations (elastic + sphere)", start)
    t0 = time.perf_counter()
    run = train_ensemble(
        train_file, Path(args.out) / "run", preset=args.preset, epochs=args.epochs,
        n_models=args.models, seed=args.seed,
        val_fraction=getattr(args, "val_fraction", 0.1), isolated_energies=None,
        threads=args.threads, r_max=args.r_max, package=False, overwrite=True,
        progress=args.verbose,
    )
    return run, time.perf_counter() - t0


def fit_labels(run, train_outputs) -> object:
    """Clustered D-optimality with the training ``config_type`` as clusters."""
    from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator

    base = train_outputs["model_0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ClusteredDOptimalityEstimator(method="labels").fit_arrays(
            base.descriptors.astype(np.float64), base.species,
            labels=run.atom_table.atom_group)


def evaluate_sets(estimators, outputs, forward, data, ltau_threshold: float) -> dict:
    """:func:`mlipuq.evaluation.evaluate` per method (ensemble vs the ensemble mean)."""
    from mlipuq.evaluation import evaluate
    from mlipuq.pipeline import predict_methods

    labels = estimators.pop(LABELS)
    results, seconds = predict_methods(estimators, outputs)
    base = outputs["model_0"]
    t0 = time.perf_counter()
    results[LABELS] = labels.predict_arrays(base.descriptors.astype(np.float64), base.species,
                                            config_index=base.config_index)
    seconds[LABELS] = (time.perf_counter() - t0) / len(base.species)
    seconds["ensemble"] += sum(v for m, v in forward.items() if m != "model_0")

    forces = np.stack([o.forces for o in outputs.values()])
    energies = np.stack([o.energies for o in outputs.values()])
    atol = float(estimators["ltau"].atol_) if "ltau" in estimators else None
    common = {"config_index": data.config_index, "groups": data.groups, "atol": atol,
              "timings": seconds, "forward_seconds_per_atom": forward["model_0"]}
    single = {n: r for n, r in results.items() if n != "ensemble"}
    metrics = evaluate(single, force_errors=np.linalg.norm(data.ref_forces - base.forces, axis=1),
                       energy_errors=np.abs(data.ref_energies - base.energies),
                       thresholds={"ltau": ltau_threshold}, **common)
    ens = evaluate({"ensemble": results["ensemble"]},
                   force_errors=np.linalg.norm(data.ref_forces - forces.mean(0), axis=1),
                   energy_errors=np.abs(data.ref_energies - energies.mean(0)), **common)
    metrics["methods"]["ensemble"] = ens["methods"]["ensemble"]
    order = ["doptimality", "clustered_doptimality", LABELS, "ensemble", "ltau"]
    metrics["methods"] = {n: metrics["methods"][n] for n in order if n in metrics["methods"]}
    return metrics


def train_detection(estimators, train_outputs, ltau_threshold: float) -> dict:
    """Fraction of training configurations / atoms each method flags (reference row)."""
    from mlipuq.pipeline import predict_methods

    estimators = dict(estimators)
    labels = estimators.pop(LABELS)
    results, _ = predict_methods(estimators, train_outputs)
    base = train_outputs["model_0"]
    results[LABELS] = labels.predict_arrays(base.descriptors.astype(np.float64), base.species,
                                            config_index=base.config_index)
    out = {}
    for name, result in results.items():
        atom_flags, config_flags = result.atom_flags, result.config_flags
        if name == "ltau":
            atom_flags = result.atom_uncertainty > ltau_threshold
            config_flags = np.zeros(int(base.config_index.max()) + 1, bool)
            np.logical_or.at(config_flags, base.config_index, atom_flags)
        out[name] = {"config": float(np.mean(config_flags)), "atom": float(np.mean(atom_flags))}
    return out


def force_mae(data, outputs) -> dict:
    """Force MAE per component (eV/Å), model_0 and ensemble mean, per set."""
    forces = np.stack([o.forces for o in outputs.values()])
    atom_groups = data.atom_groups()
    out = {}
    for name in dict.fromkeys(data.groups.tolist()):
        rows = atom_groups == name
        out[name] = {
            "model_0": float(np.mean(np.abs(data.ref_forces[rows] - forces[0][rows]))),
            "ensemble_mean": float(np.mean(np.abs(data.ref_forces[rows]
                                                  - forces.mean(0)[rows]))),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=None,
                        help=f"data directory, laid out as in docs/benchmarks.md "
                        f"(default {DEFAULT_DATA})")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--r-max", type=float, default=5.0, help="cutoff in Å")
    parser.add_argument("--clusters", type=int, default=4, help="k-means clusters")
    parser.add_argument(
        "--ltau-threshold", type=float, default=0.5, help="LTAU flags atoms with 1 - p above this"
    )
    parser.add_argument(
        "--max-configs", type=int, default=100, help="seeded subsample of each test set (0: all)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/mlipuq_bench_w")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", default=None, help="existing run folder: skip training")
    parser.add_argument("--verbose", action="store_true", help="per-epoch training lines")
    args = parser.parse_args(argv)

    folder = data_dir(args.data, "w_uqace", [f"{n}.xyz" for n in TRAIN_SETS + TEST_SETS])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from mlipuq.backends.nequip.features import torch_threads
    from mlipuq.io import read_structures, write_json
    from mlipuq.pipeline import fit_methods, load_test_sets, model_outputs

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run, train_seconds = train_or_reuse(args, folder, start, train)

    full = {name: read_structures(folder / f"{name}.xyz") for name in TEST_SETS}
    n_max = args.max_configs or None
    sets = {name: subsample(frames, n_max, args.seed) for name, frames in full.items()}
    data = load_test_sets(sets, run.elements)
    t0 = time.perf_counter()
    with torch_threads(args.threads):
        note("fitting the methods on the training set", start)
        train_outputs, _ = model_outputs(run, run.train_frames(), threads=args.threads)
        estimators = fit_methods(
            run,
            train_outputs=train_outputs,
            params={"clustered_doptimality": {"n_clusters": args.clusters}},
            threads=args.threads,
            seed=args.seed,
        )
        estimators[LABELS] = fit_labels(run, train_outputs)
        train_rates = train_detection(estimators, train_outputs, args.ltau_threshold)
        note(
            f"predicting {len(data.frames)} test configurations ({len(data.config_index)} "
            f"atoms) with {len(run.model_ids)} models",
            start,
        )
        outputs, forward = model_outputs(run, data.frames, threads=args.threads)
    metrics = evaluate_sets(estimators, outputs, forward, data, args.ltau_threshold)
    eval_seconds = time.perf_counter() - t0
    mae = force_mae(data, outputs)

    settings = {
        "preset": run.meta.get("preset"),
        "epochs": run.meta.get("epochs"),
        "n_models": len(run.model_ids),
        "seed": args.seed,
        "threads": args.threads,
        "r_max": args.r_max,
        "k_means_clusters": args.clusters,
        "n_train_configs": int(run.atom_table.n_configs),
        "n_train_atoms": int(run.atom_table.n_atoms),
        "test_configs": {n: f"{len(sets[n])} of {len(full[n])}" for n in TEST_SETS},
        "test_atoms": {n: int(sum(len(a) for a in sets[n])) for n in TEST_SETS},
        "train_seconds": train_seconds,
        "evaluate_seconds": eval_seconds,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    text = summary(metrics, mae, settings, args.ltau_threshold, train_rates)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    write_json(
        out / "summary.json",
        {"settings": settings, "mae": mae, "metrics": metrics, "train_detection": train_rates},
    )
    note(f"summary {out / 'summary.md'}", start)
    return 0


def summary(
    metrics: dict, mae: dict, settings: dict, ltau_threshold: float, train_rates: dict
) -> str:
    import json

    sets = ["all", *TEST_SETS]
    lines = [
        "Settings: " + json.dumps(settings),
        "\n| set | force MAE model_0 (eV/Å) | force MAE ensemble mean |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {m['model_0']:.4f} | {m['ensemble_mean']:.4f} |" for n, m in mae.items()]
    lines += [
        "\nDetection rate, configurations (fraction flagged):\n",
        metric_table(metrics, "detection_rate_config", sets, "{:.3f}"),
        "\nDetection rate, atoms (fraction flagged):\n",
        metric_table(metrics, "detection_rate_atom", sets, "{:.4f}"),
    ]
    lines += [
        "\nSame thresholds on the training set (elastic + sphere; LTAU's neighbours "
        "include the atom itself):\n",
        "| method | configurations | atoms |",
        "|---|---|---|",
    ]
    lines += [
        f"| {n} | {train_rates[n]['config']:.3f} | {train_rates[n]['atom']:.4f} |"
        for n in metrics["methods"]
        if n in train_rates
    ]
    lines += [
        "\nPaper (uq-ace, pace ACE, elastic + sphere training): "
        + "; ".join(f"{m}: {c} of configurations, {a} of atoms" for m, (c, a) in PAPER.items())
    ]
    lines += [
        "\nSpearman, atom level (force error; ensemble vs the ensemble-mean error):\n",
        metric_table(metrics, "spearman_atom", sets),
        "\nSpearman, configuration level (max force error):\n",
        metric_table(metrics, "spearman_config_force", sets),
        f"\nThresholds (LTAU: 1 - p > {ltau_threshold}; atol = "
        f"{fmt(metrics.get('atol'), '{:.4f}')} eV/Å) and cost per test atom, ratio to "
        "one forward pass of model_0:\n",
        cost_table(metrics),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
