"""``mlipuq fit --run RUN``: fit the UQ methods of a training run and save them in
``RUN/methods/<name>/``.

Descriptors of the training set come from one member's model (``--model-id``); the
committee methods use every member. Methods that learn from training errors (LTAU)
read the run's error trajectories (all members pooled). Every method is then
calibrated on the run's validation frames (``RUN/val.extxyz``, in domain and never
trained on): its flag threshold at ``--fpr`` of the validation configurations and,
for LTAU, the scale factor; ``--no-calibrate`` skips it. Each method is written to a
temporary directory and swapped in, with its provenance (backend, member, model
files, training set), which the calculator, ``simulate``, ``select`` and ``evaluate``
check.
"""

from __future__ import annotations

import argparse
import time

from mlipuq.cli._parser import (
    add_per_element_option,
    add_run_option,
    add_scheduler_option,
    add_threads_option,
)
from mlipuq.cli.evaluate import add_method_options, parse_params


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fit`` verb."""
    from mlipuq.knn_index import INDEX_KINDS

    parser = subparsers.add_parser(
        "fit",
        help="fit the UQ methods on a training run (writes RUN/methods/)",
        description=(
            "Fit the UQ methods on a run folder made by 'mlipuq train' (descriptors of "
            "the training set from one member's final model; LTAU's error distributions "
            "from all members' trajectories), calibrate them on the validation frames and "
            "write RUN/methods/<method>/. Prints one line per method written."
        ),
    )
    add_run_option(parser, "run folder written by 'mlipuq train'")
    parser.add_argument("--model-id", default="model_0",
                        help="member whose descriptors the single-model methods use")
    add_method_options(parser)
    parser.add_argument("--k", type=int, default=None,
                        help="LTAU neighbours per atom (ltau.k; default: 5)")
    parser.add_argument("--index", choices=("auto", *INDEX_KINDS), default=None,
                        help="LTAU FAISS index kind (ltau.index; default: auto, by size)")
    parser.add_argument("--atol", type=float, default=None,
                        help="LTAU tolerance in eV/Å (ltau.atol; default: mean force-error "
                        "norm |F_ref - F_pred| of the final models on the training atoms)")
    parser.add_argument("--transfer", choices=("distance", "mean"), default=None,
                        help="LTAU transfer: distance-aware, or the paper's plain mean "
                        "(ltau.transfer; default: distance)")
    parser.add_argument("--clusters", type=int, default=None,
                        help="clusters of clustered D-optimality "
                        "(clustered_doptimality.n_clusters; default: the class default, 8)")
    add_per_element_option(parser, "LTAU: one k-NN index per element, or one for all "
                           "(ltau.per_element; default: per element)", default=None)
    parser.add_argument("--fpr", type=float, default=0.05,
                        help="in-domain false-positive rate (per configuration) of the "
                        "thresholds fitted on the validation frames")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="do not calibrate on the validation frames")
    add_threads_option(parser, "torch and FAISS threads")
    add_scheduler_option(parser, "fit on a Dask cluster")
    parser.add_argument("--seed", type=int, default=0, help="seed of the methods")
    parser.set_defaults(func=run_fit)


FIT_ALIASES = {"index": ("ltau", "index"), "atol": ("ltau", "atol")}
"""``mlipuq fit``'s short options beyond those of ``evaluate``."""


def run_fit(args: argparse.Namespace) -> int:
    """Execute ``mlipuq fit``; returns the exit status."""
    from mlipuq.distributed.scheduler import client_for, parse_scheduler
    from mlipuq.exceptions import InputError
    from mlipuq.log import logger
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import DEFAULT_FPR, fit_methods, method_dir

    started = time.perf_counter()
    parse_scheduler(args.scheduler)  # a bad value: one line, before any work
    if not 0.0 < args.fpr < 1.0:
        raise InputError(f"--fpr: expected a rate in (0, 1), got {args.fpr!r}")
    run = RunFolder.open(args.run)
    from mlipuq.cli.evaluate import PARAM_ALIASES
    from mlipuq.run_methods import available_methods

    chosen = available_methods(run, args.methods)
    params = parse_params(args.param, args, methods=chosen,
                          aliases={**PARAM_ALIASES, **FIT_ALIASES})
    with client_for(args.scheduler) as client:
        methods = fit_methods(run, model_id=args.model_id, methods=chosen, params=params,
                              calibrate=not args.no_calibrate, fpr=args.fpr or DEFAULT_FPR,
                              threads=args.threads, seed=args.seed, progress=logger.info,
                              client=client)
    logger.info(f"fitted {len(methods)} method(s) in {time.perf_counter() - started:.1f} s")
    for name, method in methods.items():  # the result: what was written where
        print(f"{name}: {method_dir(run, name)} ({method.summary()})")
    return 0
