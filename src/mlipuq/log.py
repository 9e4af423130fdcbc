"""One logging style for mlipuq: progress and warnings on stderr, results on stdout.

Every progress message of the command line, the demo and the pipeline goes through the
``mlipuq`` logger (:data:`logger`, standard :mod:`logging`). The library never
configures logging itself (a :class:`logging.NullHandler` keeps it silent until the
application does); the ``mlipuq`` command calls :func:`logging_to_stderr`, which writes
every record as one line on stderr with the time since the command started::

    mlipuq: [  12.3 s] fitting ltau on 1234 training atoms
    mlipuq: [  15.0 s] warning: s = 8 is at the search bound

``-q/--quiet`` keeps warnings only, ``-v/--verbose`` adds debug messages; Python
warnings raised meanwhile are logged the same way. Long loops take a
:func:`progress_bar` (tqdm, on stderr), drawn only when info messages are shown and
stderr is a terminal. What a user pipes (``report: PATH``, a summary table) is printed
on stdout by the command, never logged.

In Python, ``logging.basicConfig(level=logging.INFO)`` shows the same messages; the
``progress=`` callbacks of :func:`mlipuq.pipeline.evaluate_run` and
:func:`mlipuq.run_methods.fit_methods` take ``logger.info``.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

LOGGER_NAME = "mlipuq"
logger = logging.getLogger(LOGGER_NAME)
"""The ``mlipuq`` logger; modules log to it (or to a child ``mlipuq.<module>``)."""
logger.addHandler(logging.NullHandler())

QUIET, NORMAL, VERBOSE = -1, 0, 1
"""Verbosity of :func:`logging_to_stderr`: warnings only, progress, debug."""

_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


class ElapsedFormatter(logging.Formatter):
    """``mlipuq: [  12.3 s] message``; warnings and errors carry their level name."""

    def __init__(self, start: float | None = None) -> None:
        super().__init__()
        self.start = time.time() if start is None else start
        """Wall-clock time (``time.time()``) the elapsed seconds count from."""

    def format(self, record: logging.LogRecord) -> str:
        elapsed = max(record.created - self.start, 0.0)
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"{LOGGER_NAME}: [{elapsed:6.1f} s] {level}{record.getMessage()}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


class StderrHandler(logging.Handler):
    """Writes each record to the *current* ``sys.stderr`` (so redirection applies),
    above any progress bar drawn there."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr
            if "tqdm" in sys.modules:  # clears and redraws a bar that is on screen
                from tqdm import tqdm

                tqdm.write(text, file=stream)
            else:
                stream.write(text + "\n")
            stream.flush()
        except Exception:  # logging must never raise
            self.handleError(record)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """:func:`warnings.showwarning` replacement: one log line, no source excerpt."""
    text = str(message)
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    logger.warning(text)


@contextmanager
def logging_to_stderr(verbosity: int = NORMAL, *, start: float | None = None
                      ) -> Iterator[logging.Handler]:
    """Log the ``mlipuq`` messages to stderr for the duration of a command.

    Parameters
    ----------
    verbosity : int
        :data:`QUIET` (warnings only), :data:`NORMAL` (progress) or :data:`VERBOSE`
        (debug too).
    start : float, optional
        ``time.time()`` the elapsed seconds count from (default: now).

    The logger's level, propagation and :func:`warnings.showwarning` are restored on
    exit, so that calling ``mlipuq.cli.main`` in-process leaves no trace.
    """
    handler = StderrHandler()
    handler.setFormatter(ElapsedFormatter(start))
    saved = (logger.level, logger.propagate, warnings.showwarning)
    logger.addHandler(handler)
    logger.setLevel(_LEVELS[max(QUIET, min(VERBOSE, int(verbosity)))])
    logger.propagate = False  # one line per message even if the root logger has handlers
    warnings.showwarning = _show_warning
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if warnings.showwarning is _show_warning:
            warnings.showwarning = saved[2]


def progress_enabled() -> bool:
    """Whether progress is shown: info messages are logged (not ``--quiet``)."""
    return logger.isEnabledFor(logging.INFO)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str | None = None, unit: str = "it") -> Any:
    """A tqdm progress bar on stderr over ``iterable``.

    Drawn only when :func:`progress_enabled` and stderr is a terminal; otherwise the
    bar is disabled and iterating it is iterating ``iterable``. The bar is removed when
    done (``leave=False``): the log line after the loop says what it did. Call
    ``close()`` when leaving the loop early.
    """
    from tqdm import tqdm

    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    drawn = progress_enabled() and bool(isatty and isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream,
                disable=not drawn, leave=False, dynamic_ncols=True)
