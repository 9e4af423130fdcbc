"""``mlipuq demo``: the whole workflow on self-generated EMT copper data (no network)."""

from __future__ import annotations

import argparse

from mlipuq.cli._parser import add_threads_option
from mlipuq.demo import BACKEND


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` verb."""
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on EMT copper: train, fit every UQ method, report",
        description=(
            "Generate EMT copper data (bulk 300 K training set; bulk 300 K, bulk 1200 K, "
            "vacancy, surface and nanoparticle test sets), train a small ensemble "
            "(NequIP by default; --backend) with per-epoch error trajectories, fit every "
            "registered UQ method, and write an HTML report. No network needed; about "
            "5-10 minutes on 2 CPU cores (--quick: 1-2 minutes)."
        ),
    )
    parser.add_argument("-o", "--out", default="mlipuq-demo",
                        help="demo folder: new, empty, or an earlier demo folder (reused)")
    parser.add_argument("--quick", action="store_true",
                        help="much smaller data and models (a smoke test, ~1-2 min)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the training and the calibration split")
    add_threads_option(parser, "torch and FAISS threads", default=2)
    parser.add_argument("--models", type=int, default=None,
                        help="ensemble size (default: 3; 2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per model (default: 40; 6 with --quick)")
    parser.add_argument("--backend", default=BACKEND,
                        help="model backend that trains the ensemble: one with a train "
                             "capability (nequip, allegro, mace, pace)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``mlipuq demo``."""
    from mlipuq.demo import run_demo, settings_for
    from mlipuq.log import progress_enabled

    settings = settings_for(quick=args.quick, models=args.models, epochs=args.epochs)
    metrics = run_demo(args.out, settings=settings, seed=args.seed, threads=args.threads,
                       progress=progress_enabled(), backend=args.backend)
    print(f"report: {metrics['report']}")
    return 0
