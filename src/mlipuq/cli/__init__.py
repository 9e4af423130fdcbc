"""The ``mlipuq`` command: a thin layer over the Python API.

Each verb lives in its own module ``mlipuq.cli.<verb>`` exposing
``register(subparsers)``, which adds an ``argparse`` sub-parser and sets its
``func`` default to a callable ``func(args) -> int``. Heavy imports (torch,
nequip, faiss) happen inside ``func``, never at module import, so
``mlipuq --help`` stays fast.

Every parser is a :class:`mlipuq.cli._parser.Parser`: the shared vocabulary
(``--run``, ``--out``, ``--threads``, ``--seed``, ``--model-id``, ``--per-element``),
defaults written once by the help formatter, and ``-q``/``-v`` before or after the
verb. While a verb runs, progress goes through :mod:`mlipuq.log` to stderr; results
(``report: PATH``, summary tables) are printed on stdout.

User mistakes (:class:`~mlipuq.exceptions.InputError`) are printed as one line
``mlipuq: error: ...`` with exit status 2 and no traceback; I/O failures (an output
location that is read-only, full or not a directory) as one line naming the path, with
exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mlipuq.cli._parser import Parser, verbosity
from mlipuq.exceptions import MlipuqError

# One entry per verb module, in the order shown by --help.
COMMAND_MODULES: tuple[str, ...] = (
    # one line per verb module
    "train",
    "ltau",
    "fit",
    "simulate",
    "select",
    "evaluate",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered verb."""
    from mlipuq import __version__

    parser = Parser(
        prog="mlipuq",
        description="Uncertainty for machine-learning interatomic potentials. Progress "
        "messages go to stderr, results to stdout; 'mlipuq COMMAND --help' lists the "
        "options of a command.",
    )
    parser.set_defaults(quiet=False, verbose=False)
    parser.add_argument("--version", action="version", version=f"mlipuq {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"mlipuq.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlipuq`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from mlipuq.log import logging_to_stderr

    try:
        with logging_to_stderr(verbosity(args)):
            return int(args.func(args) or 0)
    except MlipuqError as exc:
        print(f"mlipuq: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # I/O failure: read-only, full disk, a file where a folder is
        paths = [str(p) for p in (exc.filename, exc.filename2) if p]
        where = f"{' -> '.join(paths)}: " if paths else ""
        print(f"mlipuq: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlipuq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
