"""Uniform vs easy vs hard LTAU re-weighting: train/validation force-MAE curves.

One source run (``mlipuq train``, M models, uniform loss) on EMT copper (bulk fcc,
300 K Langevin MD, 32 atoms per frame) gives the error trajectories; then
``mlipuq train --reweight easy|hard --from SOURCE -M 1`` retrains with the same
data, split, seed, preset and epochs. "uniform" is member ``model_0`` of the source
run (same seed as the re-weighted members, so only the loss differs).

Figures per scheme: the per-epoch ``train_metric_epoch/forces_mae`` and
``val0_epoch/forces_mae`` of ``metrics/model_0.csv`` (NequIP's own component MAE
in eV/Å; the training figure is accumulated over the epoch's batches with raw
weights, the validation one with EMA weights), the final train/validation gap, and
the same gap from a direct evaluation of the final checkpoint on the training and
validation frames (same weights for both, so the cleaner figure). Gaps are also
given as ratios to the uniform run's gap.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/reweighting_curves.py --epochs 20
    python benchmarks/reweighting_curves.py --quick      # ~2 minutes, 4 epochs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TRAIN_KEY = "train_metric_epoch/forces_mae"
VAL_KEY = "val0_epoch/forces_mae"


def _curves(metrics_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = np.array([float(r.get(TRAIN_KEY) or "nan") for r in rows])
    val = np.array([float(r.get(VAL_KEY) or "nan") for r in rows])
    return train, val


def _direct_mae(run, frames) -> float:
    """Component force MAE (eV/Å) of member model_0 (last checkpoint) on ``frames``."""
    from mlipuq.backends.nequip.features import NequIPBackend
    from mlipuq.io import reference_forces

    backend = NequIPBackend(run.checkpoint_path("model_0", "last"), threads=1, batch_size=16)
    predicted = backend.outputs(frames).forces
    reference = np.concatenate([reference_forces(a) for a in frames])
    return float(np.mean(np.abs(predicted - reference)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="MD frames (train + val)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--models", type=int, default=2, help="source ensemble size M")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--lam-easy", type=float, default=2.0)
    parser.add_argument("--lam-hard", type=float, default=4.5)
    parser.add_argument("--quick", action="store_true", help="12 frames, 4 epochs")
    parser.add_argument("--keep", help="directory to keep the runs in (default: temporary)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.epochs = 12, 4
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from ase.io import write

    from mlipuq.backends.nequip.training import train_ensemble, train_reweighted
    from mlipuq.emt_data import CopperSizes, copper_datasets

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="mlipuq_reweight_"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sizes = CopperSizes(train=args.frames, test=1, supercell=2, interval=10, equilibration=100)
    frames = copper_datasets(seed=args.seed, sizes=sizes)["train"]
    data = workdir / "cu_300K.extxyz"
    write(data, frames, format="extxyz")
    common = {"threads": 1, "package": False, "progress": False}
    source = train_ensemble(
        data, workdir / "uniform", preset=args.preset, epochs=args.epochs,
        n_models=args.models, seed=args.seed, val_fraction=args.val_fraction,
        overwrite=True, **common,
    )
    runs = {"uniform": source}
    for scheme, lam in (("easy", args.lam_easy), ("hard", args.lam_hard)):
        runs[scheme] = train_reweighted(
            source.path, workdir / scheme, scheme=scheme, lam=lam, n_models=1,
            overwrite=True, **common,
        )
    train_frames, val_frames = source.train_frames(), _read(source.val_path)
    results = {}
    for name, run in runs.items():
        train_curve, val_curve = _curves(run.metrics_path("model_0"))
        direct_train = _direct_mae(run, train_frames)
        direct_val = _direct_mae(run, val_frames)
        info = run.meta.get("reweight") or {}
        results[name] = {
            "lam": info.get("lam"),
            "weights": [info.get("weight_min"), info.get("weight_max")] if info else None,
            "train_curve": train_curve.tolist(),
            "val_curve": val_curve.tolist(),
            "csv_gap": float(val_curve[-1] - train_curve[-1]),
            "direct_train_mae": direct_train,
            "direct_val_mae": direct_val,
            "direct_gap": direct_val - direct_train,
        }
    elapsed = time.perf_counter() - start
    _print(results, args, len(train_frames), len(val_frames), elapsed)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _read(path: Path) -> list:
    from mlipuq.io import read_structures

    return read_structures(path, require_forces=True)


def _print(results: dict, args, n_train: int, n_val: int, elapsed: float) -> None:
    print(f"EMT Cu bulk 300 K, {n_train} train / {n_val} val frames (32 atoms), preset "
          f"{args.preset}, {args.epochs} epochs, seed {args.seed}, source M={args.models}; "
          f"{elapsed:.0f} s")
    print("\nper-epoch force MAE (eV/Å) from metrics/model_0.csv: train / val")
    for name, r in results.items():
        pairs = " ".join(f"{t:.3f}/{v:.3f}" for t, v in zip(r["train_curve"], r["val_curve"],
                                                               strict=True))
        print(f"  {name:8s} {pairs}")
    base_csv = results["uniform"]["csv_gap"]
    base_direct = results["uniform"]["direct_gap"]
    print("\nscheme    lam   weights          CSV: train   val    gap   (x uniform) | "
          "direct: train   val    gap   (x uniform)")
    for name, r in results.items():
        lam = "-" if r["lam"] is None else f"{r['lam']:.1f}"
        weights = "1" if not r["weights"] else f"{r['weights'][0]:.2g}..{r['weights'][1]:.3g}"
        print(
            f"{name:8s} {lam:>4s}  {weights:15s}  {r['train_curve'][-1]:.4f} "
            f"{r['val_curve'][-1]:.4f} {r['csv_gap']:+.4f} ({r['csv_gap'] / base_csv:5.2f}) | "
            f"{r['direct_train_mae']:.4f} {r['direct_val_mae']:.4f} {r['direct_gap']:+.4f} "
            f"({r['direct_gap'] / base_direct:5.2f})"
        )


if __name__ == "__main__":
    sys.exit(main())
