"""``mlipuq evaluate --run RUN --test NAME=PATH ... --out DIR``: compare every UQ method."""

from __future__ import annotations

import argparse
from typing import Any

from mlipuq.cli._parser import (
    add_per_element_option,
    add_run_option,
    add_scheduler_option,
    add_threads_option,
)

PARAM_ALIASES = {
    "k": ("ltau", "k"),
    "transfer": ("ltau", "transfer"),
    "window": ("ltau", "window"),
    "clusters": ("clustered_doptimality", "n_clusters"),
    "per_element": ("ltau", "per_element"),
}
"""Short options that set one method parameter (``--k 8`` = ``--param ltau.k=8``)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` verb."""
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate every UQ method on test sets (HTML report)",
        description=(
            "Fit (or reuse the saved) UQ methods of a run folder made by 'mlipuq train', "
            "predict every test set, and write a report (index.html, metrics.json, PNGs): "
            "Spearman correlations, detection rates, ROC-AUC, LTAU calibration, cost. "
            "Prints 'report: PATH' at the end."
        ),
    )
    add_run_option(parser, "run folder written by 'mlipuq train'")
    parser.add_argument(
        "--test", action="append", required=True, metavar="NAME=PATH",
        help="a test set (extxyz; repeat the option); without forces: energies only",
    )
    parser.add_argument("-o", "--out", required=True, help="report directory to write")
    parser.add_argument(
        "--calibrate-on", metavar="NAME[:FRACTION]",
        help="in-domain set whose FRACTION (default: 0.5) of configurations fits LTAU's scale "
        "factor and every method's threshold; metrics use the rest (default: the run's "
        "validation frames, as the set 'validation')",
    )
    parser.add_argument(
        "--fpr", type=float, default=0.05,
        help="in-domain false-positive rate (per configuration) of the fitted thresholds",
    )
    parser.add_argument(
        "--threshold", action="append", metavar="METHOD=VALUE",
        help="use this threshold for METHOD instead of the fitted one (repeat the option)",
    )
    parser.add_argument(
        "--transfer", choices=("distance", "mean"), default=None,
        help="LTAU transfer: distance-aware, or the paper's plain mean (default: the saved "
        "estimator's, else distance)",
    )
    parser.add_argument(
        "--in-domain", nargs="+", metavar="NAME",
        help="in-domain test sets for ROC-AUC (default: the --calibrate-on set)",
    )
    add_method_options(parser)
    parser.add_argument("--model-id", default="model_0",
                        help="member for LTAU and D-optimality (and whose errors they are "
                        "judged on)")
    parser.add_argument("--refit", action="store_true",
                        help="refit the methods even if saved ones are in the run")
    parser.add_argument("--k", type=int, default=None,
                        help="LTAU neighbours (default: the saved estimator's, else 5)")
    add_per_element_option(parser, "LTAU: one k-NN index per element, or one for all "
                           "(default: the saved estimator's, else per element)", default=None)
    parser.add_argument(
        "--window", nargs=2, metavar=("START", "SIZE"),
        help="LTAU epoch window: start position and size (SIZE 'all': to the end); "
        "e.g. '-10 all' keeps the last 10 logged epochs (default: the saved estimator's, "
        "else every epoch)",
    )
    parser.add_argument("--clusters", type=int, default=None,
                        help="clusters of clustered D-optimality (default: the saved "
                        "estimator's, else the class default, 8)")
    add_threads_option(parser, "torch and FAISS threads")
    add_scheduler_option(parser, "fit the methods that need fitting on a Dask cluster")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration split and clustering")
    parser.set_defaults(func=run_evaluate)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """``--methods`` (registered names) and ``--param METHOD.NAME=VALUE``."""
    from mlipuq.registry import method_names

    parser.add_argument(
        "--methods", nargs="+", choices=method_names(), metavar="METHOD",
        help=f"methods ({', '.join(method_names())}; default: all the run supports, "
        "committee methods need >= 2 models)",
    )
    parser.add_argument(
        "--param", action="append", metavar="METHOD.NAME=VALUE",
        help="a constructor parameter of one method (repeat the option), e.g. "
        "ltau.k=8 or clustered_doptimality.n_clusters=6; VALUE is read as JSON "
        "(numbers, true/false, null, lists), else as a string",
    )


def parse_params(values: list[str] | None, args: argparse.Namespace | None = None, *,
                 methods: tuple[str, ...] | None = None,
                 aliases: dict[str, tuple[str, str]] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """``["ltau.k=8"]`` (plus the short options of ``aliases``, default
    :data:`PARAM_ALIASES`, set in ``args``) -> ``{"ltau": {"k": 8}}``.

    With ``methods`` (those that will run), a parameter of another method is refused
    in one line naming the option that set it.
    """
    import json

    from mlipuq.exceptions import InputError
    from mlipuq.registry import method_names

    out: dict[str, dict[str, Any]] = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise InputError(f"--param: expected METHOD.NAME=VALUE, got {value!r}")
        if method not in method_names():
            raise InputError(f"--param {value}: unknown method {method!r} "
                             f"(methods: {', '.join(method_names())})")
        if methods is not None and method not in methods:
            raise InputError(f"--param {value}: {method!r} is not among the methods run "
                             f"({', '.join(methods)})")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        out.setdefault(method, {})[name] = parsed
    for option, (method, name) in (PARAM_ALIASES if aliases is None else aliases).items():
        given = getattr(args, option, None) if args is not None else None
        if given is None:
            continue
        if methods is not None and method not in methods:
            flag = "--" + option.replace("_", "-")
            raise InputError(f"{flag}: sets {method}.{name}, but {method!r} is not among the "
                             f"methods run ({', '.join(methods)})")
        out.setdefault(method, {})[name] = given
    return out


def parse_tests(values: list[str]) -> dict[str, str]:
    """``["name=path", "path2"]`` -> ``{"name": "path", "<stem of path2>": "path2"}``."""
    from pathlib import Path

    from mlipuq.exceptions import InputError

    tests: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name.split(".")[0], value
        if not name or not path:
            raise InputError(f"--test: expected NAME=PATH, got {value!r}")
        if name in tests:
            raise InputError(f"--test: test set name {name!r} given twice")
        tests[name] = path
    return tests


def parse_calibration(value: str | None) -> tuple[str, float] | None:
    """``"name"`` or ``"name:0.3"`` -> ``(name, fraction)``."""
    from mlipuq.exceptions import InputError

    if value is None:
        return None
    name, sep, fraction = value.rpartition(":")
    if not sep:
        return value, 0.5
    try:
        return name, float(fraction)
    except ValueError:
        raise InputError(
            f"--calibrate-on: expected NAME or NAME:FRACTION, got {value!r}"
        ) from None


def parse_thresholds(values: list[str] | None) -> dict[str, str]:
    """``["ltau=0.8"]`` -> ``{"ltau": "0.8"}`` (values checked by the pipeline)."""
    from mlipuq.exceptions import InputError

    out: dict[str, str] = {}
    for value in values or []:
        name, sep, number = value.partition("=")
        if not sep or not name or not number:
            raise InputError(f"--threshold: expected METHOD=VALUE, got {value!r}")
        out[name] = number
    return out


def parse_window(values: list[str] | None) -> tuple[int, int | None] | None:
    """``["-10", "all"]`` -> ``(-10, None)``; ``["0", "20"]`` -> ``(0, 20)``."""
    from mlipuq.exceptions import InputError

    if values is None:
        return None
    start, size = values
    try:
        return int(start), None if size == "all" else int(size)
    except ValueError:
        raise InputError(
            f"--window: expected START SIZE (integers; SIZE may be 'all'), got {' '.join(values)}"
        ) from None


def run_evaluate(args: argparse.Namespace) -> int:
    """Execute ``mlipuq evaluate``."""
    from mlipuq.distributed.scheduler import client_for, parse_scheduler
    from mlipuq.log import logger
    from mlipuq.pipeline import evaluate_run
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import available_methods

    parse_scheduler(args.scheduler)  # a bad value: one line, before any work
    args.window = parse_window(args.window)
    run = RunFolder.open(args.run)
    methods = available_methods(run, args.methods)
    with client_for(args.scheduler) as client:
        metrics = evaluate_run(
            run, parse_tests(args.test), out_dir=args.out, methods=methods,
            calibration_set=parse_calibration(args.calibrate_on), in_domain=args.in_domain,
            model_id=args.model_id, refit=args.refit, fpr=args.fpr,
            params=parse_params(args.param, args, methods=methods),
            thresholds=parse_thresholds(args.threshold),
            threads=args.threads, seed=args.seed,
            progress=logger.info, client=client,
        )
    print(f"report: {metrics['report']}")
    return 0
