"""The vocabulary every ``mlipuq`` verb shares: parser class, help formatter, options.

One concept, one spelling, in every verb that takes it:

==========================  ===============================================
concept                     option
==========================  ===============================================
run folder                  ``--run RUN`` (``train`` writes it, the others read it)
output file / directory     ``-o, --out``
threads                     ``--threads N``
seed                        ``--seed S``
ensemble member             ``--model-id ID``
per-element k-NN search     ``--per-element / --no-per-element``
Dask cluster                ``--scheduler SPEC``
log level                   ``-q, --quiet`` / ``-v, --verbose`` (before or after the verb)
==========================  ===============================================

Defaults are written once, by :class:`HelpFormatter` from the parser itself.
"""

from __future__ import annotations

import argparse
from typing import Any

HIDDEN = argparse.SUPPRESS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option that has a default, from the parser itself.

    An option whose default is ``None`` or ``False`` (a flag that is off, or a default
    the help text explains, such as "the saved estimator's") gets none. Blank lines in a
    description separate paragraphs, each wrapped to the terminal.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        return "\n\n".join(super(HelpFormatter, self)._fill_text(p, width, indent)
                           for p in paragraphs)


class Parser(argparse.ArgumentParser):
    """The parser of ``mlipuq`` and of each verb: :class:`HelpFormatter`, ``-q``/``-v``.

    Sub-parsers are of this class too (``add_subparsers`` uses the parent's class).
    The log-level options of a verb default to "not given" so that ``mlipuq -q fit``
    and ``mlipuq fit -q`` both work.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        level = self.add_mutually_exclusive_group()
        level.add_argument("-q", "--quiet", action="store_true", default=HIDDEN,
                           help="no progress messages on stderr, only warnings and errors")
        level.add_argument("-v", "--verbose", action="store_true", default=HIDDEN,
                           help="debug messages on stderr too")


def verbosity(args: argparse.Namespace) -> int:
    """-1 with ``--quiet``, 1 with ``--verbose``, else 0 (:mod:`mlipuq.log` levels)."""
    if getattr(args, "quiet", False):
        return -1
    return 1 if getattr(args, "verbose", False) else 0


def add_run_option(parser: argparse.ArgumentParser, help: str, *, required: bool = True
                   ) -> argparse.Action:
    """``--run RUN``: the run folder, spelled so in every verb."""
    return parser.add_argument("--run", metavar="RUN", required=required, default=None,
                               help=help)


def add_threads_option(parser: argparse.ArgumentParser, help: str, *,
                       default: int | None = 1) -> None:
    """``--threads N``."""
    parser.add_argument("--threads", type=int, default=default, metavar="N", help=help)


def add_per_element_option(parser: argparse.ArgumentParser, help: str, *,
                           default: bool | None = True) -> None:
    """``--per-element / --no-per-element``: one k-NN index per element, or one for all."""
    parser.add_argument("--per-element", action=argparse.BooleanOptionalAction,
                        default=default, help=help)


def add_scheduler_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--scheduler SPEC``: run the heavy steps on a Dask cluster (checked before any
    work by :func:`mlipuq.distributed.scheduler.parse_scheduler`)."""
    from mlipuq.distributed.scheduler import SPEC_HELP

    parser.add_argument("--scheduler", default=None, metavar="SPEC",
                        help=f"{help}: {SPEC_HELP} (default: in this process; "
                        "docs/distributed.md)")
