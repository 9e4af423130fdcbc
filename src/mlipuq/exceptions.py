"""Exception types raised by mlipuq.

Every error a user can cause (bad file, wrong shape, NaN, unknown element) is an
:class:`InputError`: its message is one line that names the input, what was
expected and what was found. The CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations


class MlipuqError(Exception):
    """Base class of every error mlipuq raises on purpose."""


class InputError(MlipuqError, ValueError):
    """A user input (array, file, option) is invalid; the message says which and why."""


class NotFittedError(MlipuqError, AttributeError):
    """An estimator was used before ``fit`` was called (or ``load``-ed)."""
