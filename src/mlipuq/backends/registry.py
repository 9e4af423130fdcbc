"""Which backend a name means: built-ins, :func:`register` calls and entry points.

A run folder records its backend by name (``run.json["backend"]``); this module turns
the name into the backend class (:class:`mlipuq.backends.base.Backend`). Classes are
imported only when asked for, so ``import mlipuq`` never imports torch, NequIP or
python-ace, and listing the names imports nothing.

Third-party packages add a backend without touching mlipuq, through an entry point::

    # pyproject.toml of the package "mlipuq-mace"
    [project.entry-points."mlipuq.backends"]
    mace = "mlipuq_mace:MACEBackend"

or at run time with ``register("mace", "mlipuq_mace:MACEBackend")``.

Examples
--------
>>> from mlipuq.backends import registry
>>> "nequip" in registry.available() and "arrays" in registry.available()
True
>>> registry.get("arrays").name
'arrays'
"""

from __future__ import annotations

import importlib
import os
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    from mlipuq.backends.base import Backend
    from mlipuq.run_folder import RunFolder

ENTRY_POINT_GROUP = "mlipuq.backends"
"""Entry-point group scanned for third-party backends (value ``"module:Class"``)."""

DEFAULT = "nequip"
"""Backend of a run folder whose ``run.json`` has no ``"backend"`` field (older runs)."""

BUILTIN: dict[str, str] = {
    "nequip": "mlipuq.backends.nequip.features:NequIPBackend",
    "allegro": "mlipuq.backends.nequip.allegro:AllegroBackend",
    "pace": "mlipuq.backends.pace:PaceBackend",
    "arrays": "mlipuq.backends.arrays:ArraysBackend",
    "mace": "mlipuq.backends.mace:MaceBackend",
}
"""The backends shipped with mlipuq, as ``"module:Class"`` (imported on first use)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_registered: dict[str, Any] = {}  # name -> class or "module:Class", from register()
_loaded: dict[str, type] = {}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"backend: {name!r} is not a valid backend name (lower-case letters, digits, "
            "'_', starting with a letter)"
        )
    return name


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    """Entry points of the ``mlipuq.backends`` group, by name (scanned once)."""
    from importlib.metadata import entry_points

    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def _targets() -> dict[str, Any]:
    """Every known name -> class, "module:Class" or entry point (later sources win)."""
    return {**_entry_points(), **BUILTIN, **_registered}


def register(name: str, backend: type | str, *, overwrite: bool = False) -> None:
    """Make ``backend`` available under ``name`` (for this process).

    Parameters
    ----------
    name : str
        Registry key (lower-case letters, digits, ``_``); the backend's ``name``
        attribute must be the same.
    backend : class or str
        The backend class, or ``"module:Class"`` to import it on first use.
    overwrite : bool
        Replace a backend already registered under ``name`` (built-ins included).

    Raises
    ------
    InputError
        Invalid name, or the name is taken and ``overwrite`` is False.
    """
    _check_name(name)
    if not isinstance(backend, (type, str)):
        raise InputError(
            f"backend {name!r}: expected a class or 'module:Class', got "
            f"{type(backend).__name__}"
        )
    if isinstance(backend, str) and backend.count(":") != 1:
        raise InputError(f"backend {name!r}: expected 'module:Class', got {backend!r}")
    if name in _targets() and not overwrite:
        raise InputError(f"backend {name!r}: already registered (pass overwrite=True)")
    _registered[name] = backend
    _loaded.pop(name, None)


def unregister(name: str) -> None:
    """Forget a backend added by :func:`register` (built-ins and entry points stay)."""
    _registered.pop(name, None)
    _loaded.pop(name, None)


def available() -> list[str]:
    """Names of every backend: built-in, registered and from entry points (sorted)."""
    return sorted(_targets())


def check(name: Any) -> str:
    """``name`` if it is a known backend, else InputError listing the known ones."""
    if not isinstance(name, str) or name not in _targets():
        raise InputError(
            f"backend: unknown backend {name!r} (registered: {', '.join(available())})"
        )
    return name


def get(name: str) -> type[Backend]:
    """The backend class registered as ``name``, imported now if needed.

    Raises
    ------
    InputError
        Unknown name (the message lists the registered ones), or the backend's module
        cannot be imported (e.g. its optional dependency is missing).
    """
    check(name)
    if name in _loaded:
        return _loaded[name]
    target = _targets()[name]
    if isinstance(target, type):
        cls = target
    else:
        spec = target if isinstance(target, str) else target.value
        module_name, _, attribute = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attribute)
        except ImportError as exc:
            raise InputError(f"backend {name!r}: cannot import {spec} ({exc})") from None
        except AttributeError:
            raise InputError(f"backend {name!r}: {module_name} has no {attribute!r}") from None
    if getattr(cls, "name", None) != name:
        raise InputError(
            f"backend {name!r}: {cls.__module__}.{cls.__qualname__}.name is "
            f"{getattr(cls, 'name', None)!r}, expected {name!r}"
        )
    _loaded[name] = cls
    return cls


def load(
    run: RunFolder | str | os.PathLike,
    model_id: str,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    threads: int | None = 1,
) -> Backend:
    """Member ``model_id`` of ``run``, loaded by the run's backend.

    Parameters
    ----------
    run : RunFolder or path
    model_id : str
        One of ``run.model_ids``.
    device : str
        Device of the model (torch device for NequIP; ignored by array backends).
    batch_size : int
        Frames per forward pass.
    threads : int or None
        Threads while predicting (restored afterwards); None leaves them alone.

    Returns
    -------
    Backend
        Ready to :meth:`~mlipuq.backends.base.Backend.outputs`.
    """
    from mlipuq.run_folder import RunFolder

    run = run if isinstance(run, RunFolder) else RunFolder.open(run)
    return get(run.backend).from_run(run, model_id, device=device, batch_size=batch_size,
                                     threads=threads)


def calculator(
    run: RunFolder | str | os.PathLike,
    model_id: str = "model_0",
    *,
    estimators: dict[str, Any] | str | None = "auto",
    device: str = "cpu",
    **kwargs: Any,
) -> Any:
    """ASE calculator of member ``model_id`` of ``run``, with uncertainty attached.

    ``estimators="auto"`` attaches what the run has fitted (``RUN/methods``); a dict
    attaches those estimators; None none. Other keyword arguments go to the backend's
    calculator (e.g. ``threads``, ``keep_descriptors``, ``store_arrays`` for NequIP).

    Raises
    ------
    InputError
        The run's backend has no ASE calculator (e.g. ``"arrays"``: stored predictions
        only).
    """
    from mlipuq.run_folder import RunFolder

    run = run if isinstance(run, RunFolder) else RunFolder.open(run)
    backend = get(run.backend)
    factory = getattr(backend, "uq_calculator", None)
    if factory is None:
        raise InputError(
            f"{run.path}: backend {run.backend!r} has no ASE calculator (backends with one: "
            f"{', '.join(n for n in available() if _offers(n, 'uq_calculator')) or 'none'})"
        )
    return factory(run, model_id, estimators=estimators, device=device, **kwargs)


def _offers(name: str, capability: str) -> bool:
    """True when backend ``name`` imports and has ``capability`` (False if it fails)."""
    try:
        return getattr(get(name), capability, None) is not None
    except InputError:
        return False


def capability(name: str, what: str, doing: str) -> Any:
    """Backend ``name``'s optional class method ``what``, or InputError saying so.

    ``doing`` names the action in the message, e.g. ``"train models"``.
    """
    method = getattr(get(name), what, None)
    if method is None:
        others = [n for n in available() if n != name and _offers(n, what)]
        raise InputError(
            f"backend {name!r} cannot {doing} (backends that can: "
            f"{', '.join(others) or 'none'})"
        )
    return method
