"""``mlipuq fit RUN``: fit LTAU on a training run and save it as ``RUN/ltau``.

Descriptors of the training set come from one member's model (``--model-id``, the
model file the calculator loads: packaged zip, else best, else last checkpoint); the
per-atom error distributions pool the trajectories of all M members. The estimator
is written to a temporary directory inside RUN and renamed onto ``RUN/ltau``, so a
reader never sees a half-written estimator. ``RUN/ltau/fit.json`` records which
member's descriptors it was fitted on (the calculator checks it).

The estimator is then calibrated on the run's validation frames (``RUN/val.extxyz``,
in domain and never trained on): the scale factor s and the flag threshold (at
``--fpr`` of the validation configurations) are stored in ``RUN/ltau`` and used by the
calculator, ``simulate``, ``select`` and ``evaluate``. ``--no-calibrate`` skips it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fit`` verb."""
    from mlipuq.knn_index import INDEX_KINDS

    parser = subparsers.add_parser(
        "fit",
        help="fit LTAU on a training run (writes RUN/ltau)",
        description=(
            "Fit LTAU on a run folder made by 'mlipuq train': descriptors of the training "
            "set from one member's final model, error distributions from all members' "
            "trajectories. Writes RUN/ltau."
        ),
    )
    parser.add_argument("run", metavar="RUN", help="run folder written by 'mlipuq train'")
    parser.add_argument("--model-id", default="model_0",
                        help="member whose descriptors are used (default: model_0)")
    parser.add_argument("--k", type=int, default=5, help="neighbours per atom (default: 5)")
    parser.add_argument("--index", choices=("auto", *INDEX_KINDS),
                        default="auto",
                        help="FAISS index kind (default: auto, chosen by size)")
    parser.add_argument("--atol", type=float, default=None,
                        help="tolerance in eV/Å (default: mean force-error norm |F_ref - F_pred| "
                        "of the final models on the training atoms)")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="relative tolerance on |F_ref| (default: 0)")
    parser.add_argument("--n-bins", type=int, default=100,
                        help="histogram bins of the error distributions (default: 100)")
    parser.add_argument("--all-elements", action="store_true",
                        help="one index over all elements (default: one per element)")
    parser.add_argument("--transfer", choices=("distance", "mean"), default="distance",
                        help="distance-aware transfer, or the paper's plain mean of the "
                        "neighbours (default: distance)")
    parser.add_argument("--fpr", type=float, default=0.05,
                        help="in-domain false-positive rate (per configuration) of the "
                        "threshold fitted on the validation frames (default: 0.05)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="do not calibrate on the validation frames (s = 1, no threshold)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="frames per forward pass (default: 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS threads (default: 1)")
    parser.set_defaults(func=run_fit)


def _say(message: str) -> None:
    print(f"mlipuq fit: {message}", flush=True)


def run_fit(args: argparse.Namespace) -> int:
    """Execute ``mlipuq fit``; returns the exit status."""
    from mlipuq.exceptions import InputError
    from mlipuq.pipeline import save_ltau
    from mlipuq.run_folder import RunFolder

    started = time.perf_counter()
    run = RunFolder.open(args.run)
    if args.model_id not in run.model_ids:
        raise InputError(
            f"--model-id: {args.model_id!r} is not a member of {run.path} "
            f"(members: {run.model_ids})"
        )
    model_path = run.model_path(args.model_id)
    if not 0.0 < args.fpr < 1.0:
        raise InputError(f"--fpr: expected a rate in (0, 1), got {args.fpr!r}")
    if not run.store_path.is_dir():
        raise InputError(f"{run.store_path}: the run has no error trajectories")
    store = run.store
    frames = run.train_frames()

    _say(f"descriptors of {sum(len(a) for a in frames)} training atoms "
         f"({len(frames)} configurations) from {model_path.relative_to(run.path)}")
    outputs = _descriptors(model_path, frames, args)
    _say(f"error distributions from {len(store.model_ids())} model(s) in "
         f"{store.path.relative_to(run.path)}")
    estimator = _fit(store, outputs, args)
    if not args.no_calibrate:
        _calibrate(run, estimator, args)
    save_ltau(run, estimator, args.model_id)
    _summary(run, estimator, outputs.descriptors.shape, time.perf_counter() - started)
    return 0


def _calibrate(run: Any, estimator: Any, args: argparse.Namespace) -> None:
    """Scale factor, beta and threshold from the run's validation frames."""
    from mlipuq.pipeline import fit_on_validation

    skipped = fit_on_validation(run, {"ltau": estimator}, model_id=args.model_id,
                                fpr=args.fpr, threads=args.threads,
                                batch_size=args.batch_size, device=args.device)
    if skipped is not None:
        _say(f"{skipped}: not calibrated (s = 1, no threshold)")
        return
    cal = estimator.calibration_
    bound = " (at the search bound: see docs/ltau.md)" if cal["at_bound"] else ""
    _say(f"calibrated on {cal['n_configs']} validation configurations: s = {cal['scale']:.4g}"
         f"{bound}, beta {cal['distance_power']:g}, ECE {cal['ece_before']:.3f} -> "
         f"{cal['ece_after']:.3f}, threshold {cal['threshold']:.4g} on the mean of 1 - p "
         f"per configuration (flags {cal['fpr']:.0%} of them)")


def _descriptors(model_path: Path, frames: list, args: argparse.Namespace) -> Any:
    from mlipuq.backends.nequip.features import NequIPBackend

    backend = NequIPBackend(model_path, device=args.device, batch_size=args.batch_size,
                            threads=args.threads)
    return backend.outputs(frames)


def _fit(store: Any, outputs: Any, args: argparse.Namespace) -> Any:
    from mlipuq.ltau import LTAUEstimator

    estimator = LTAUEstimator(
        k=args.k, atol=args.atol, rtol=args.rtol, index=args.index, n_bins=args.n_bins,
        per_element=not args.all_elements, n_threads=args.threads, transfer=args.transfer,
    )
    return estimator.fit(store, outputs.descriptors, outputs.species)


def _summary(run: Any, estimator: Any, shape: tuple[int, int], seconds: float) -> None:
    atol_source = "given" if estimator.atol is not None else (
        "mean force-error norm |F_ref - F_pred| of the final models on the training atoms")
    kinds = ", ".join(f"{name}={kind}" for name, kind in estimator.index_kinds_.items())
    _say(f"wrote {run.ltau_dir} in {seconds:.1f} s")
    print(f"  atol   {estimator.atol_:.4g} eV/Å ({atol_source})", file=sys.stdout)
    print(f"  index  {kinds} (k={estimator.k})", file=sys.stdout)
    print(f"  N      {shape[0]} training atoms, D={shape[1]} descriptors", file=sys.stdout)
