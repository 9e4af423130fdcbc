"""The registry of uncertainty methods: name -> :class:`~mlipuq.method.UQMethod` class.

Built-in methods are listed in :data:`BUILTIN_METHODS` as ``"module:Class"`` strings
(imported on first use, so ``import mlipuq`` stays light). Third-party packages add
methods through the entry-point group ``mlipuq.methods``::

    [project.entry-points."mlipuq.methods"]
    my_method = "my_package.my_module:MyMethod"

Adding a method is its module plus one entry here (or an entry point); the pipeline,
CLI, report, calculator, ``simulate`` and ``select`` then use it unchanged.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    from mlipuq.method import UQMethod

BUILTIN_METHODS: dict[str, str] = {
    "ltau": "mlipuq.ltau:LTAUEstimator",
    "ensemble": "mlipuq.ensemble:EnsembleEstimator",
    "doptimality": "mlipuq.doptimality:DOptimalityEstimator",
    "clustered_doptimality": "mlipuq.clustered_doptimality:ClusteredDOptimalityEstimator",
    "llpr": "mlipuq.llpr:LLPREstimator",
}
"""Built-in methods in report order."""

ENTRY_POINT_GROUP = "mlipuq.methods"

_registered: dict[str, type[UQMethod]] = {}


def register_method(cls: type[UQMethod]) -> type[UQMethod]:
    """Register a :class:`~mlipuq.method.UQMethod` subclass under ``cls.name``
    (usable as a class decorator)."""
    from mlipuq.method import UQMethod

    if not (isinstance(cls, type) and issubclass(cls, UQMethod)) or not cls.name:
        raise InputError(f"register_method: {cls!r} is not a UQMethod subclass with a name")
    _registered[cls.name] = cls
    return cls


@cache
def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def method_names() -> tuple[str, ...]:
    """Every known method: built-in (report order), then registered and entry points."""
    return tuple(dict.fromkeys([*BUILTIN_METHODS, *_registered, *_entry_points()]))


def method_class(name: str) -> type[UQMethod]:
    """The class registered as ``name``.

    Raises
    ------
    InputError
        Unknown name (the message lists the known ones).
    """
    if name in _registered:
        return _registered[name]
    target = BUILTIN_METHODS.get(name) or _entry_points().get(name)
    if target is None:
        raise InputError(f"method: unknown method {name!r} (known: {', '.join(method_names())})")
    module, _, attribute = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise InputError(f"method {name!r}: cannot load {target} ({error})") from None
    if getattr(cls, "name", None) != name:
        raise InputError(f"method {name!r}: {target} has name {getattr(cls, 'name', None)!r}")
    _registered[name] = cls
    return cls
