"""The UQ methods of a run folder: model outputs, fitting, saving, loading, predicting.

Every step goes through the method registry (:mod:`mlipuq.registry`) and the
:class:`~mlipuq.method.UQMethod` contract; nothing here names a method. Fitted methods
live in ``RUN/methods/<name>/`` in the one persistence format of
:mod:`mlipuq.method`, with their provenance (backend, member, model files with
SHA-256, atom-table fingerprint)::

    run = RunFolder.open("run")
    methods = fit_methods(run)                              # fitted, calibrated, saved
    outputs, forward = model_outputs(run, frames)           # one pass per member
    results, timings = predict_methods(methods, outputs)
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs, committee
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod
from mlipuq.result import UQResult
from mlipuq.run_folder import RunFolder

DEFAULT_FPR = 0.05
"""In-domain false-positive rate (per configuration) of every fitted flag threshold."""

METHODS_DIR = "methods"
"""Sub-directory of a run holding one directory per fitted method."""

LEGACY_FILE_OF = {"ltau": "ltau", "ensemble": "ensemble.json",
                  "doptimality": "doptimality.npz",
                  "clustered_doptimality": "clustered_doptimality.npz"}
"""Which 0.1 file held each built-in method (named in the refit reason)."""

LEGACY_FILES = (*LEGACY_FILE_OF.values(), "methods.json")
"""Estimator files of runs written by mlipuq 0.1 (refitted, never read)."""

CALIBRATED_SUFFIX = "_calibrated"
"""Suffix of a method's name after :meth:`~mlipuq.method.UQMethod.calibrate` in results."""


logger = logging.getLogger(__name__)


def _quiet(_: str) -> None:
    return None


# ---------------------------------------------------------------------- model outputs
def model_outputs(
    run: RunFolder,
    frames: Sequence[Atoms],
    *,
    model_ids: Sequence[str] | None = None,
    threads: int = 1,
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[dict[str, ModelOutputs], dict[str, float]]:
    """Energies, forces and descriptors of ``frames`` from each member of ``run``.

    Parameters
    ----------
    run : RunFolder
    frames : sequence of ase.Atoms
        C configurations, N atoms in total.
    model_ids : sequence of str, optional
        Members to evaluate (default: all).
    threads : int
        torch threads during the passes (restored afterwards).
    batch_size : int
        Frames per forward pass.
    device : str
        torch device.

    Returns
    -------
    outputs : dict of str -> ModelOutputs
        Per member: energies (C,) eV, forces (N, 3) eV/Å, descriptors (N, D).
    seconds_per_atom : dict of str -> float
        Wall time of each member's forward passes per atom (model loading excluded).
    """
    from mlipuq.backends.registry import load
    from mlipuq.log import progress_bar

    outputs, seconds = {}, {}
    n_atoms = sum(len(atoms) for atoms in frames)
    members = list(model_ids or run.model_ids)
    for model_id in progress_bar(members, desc=f"forward passes, {len(frames)} frames",
                                 unit="model"):
        # the run's backend (run.json "backend"), model loaded outside the timed pass
        backend = load(run, model_id, device=device, batch_size=batch_size, threads=threads)
        start = time.perf_counter()
        outputs[model_id] = backend.outputs(frames)
        seconds[model_id] = (time.perf_counter() - start) / max(n_atoms, 1)
    return outputs, seconds


def check_member(run: RunFolder, model_id: str) -> None:
    """Raise :class:`InputError` unless ``model_id`` is a member of ``run``."""
    if model_id not in run.model_ids:
        raise InputError(
            f"--model-id: {model_id!r} is not a member of {run.path} (members: {run.model_ids})"
        )


def members_needed(run: RunFolder, methods: Sequence[str], model_id: str) -> list[str]:
    """Members whose outputs ``methods`` need: all for a committee method, else one."""
    from mlipuq.registry import method_class

    if any(method_class(name).min_members > 1 for name in methods):
        return list(run.model_ids)
    return [model_id]


# ---------------------------------------------------------------------- choosing
def available_methods(run: RunFolder, methods: Sequence[str] | None = None) -> tuple[str, ...]:
    """Check ``methods`` against the registry and the run.

    ``None`` selects every registered method the run supports (enough members; an
    error-trajectory store where the method needs one).
    """
    from mlipuq.registry import BUILTIN_METHODS, method_class, method_names

    def supported(name: str) -> str | None:
        try:
            cls = method_class(name)
        except InputError as error:  # a broken plug-in: reported, not fatal by default
            return str(error)
        if len(run.model_ids) < cls.min_members:
            return (f"{name!r} needs at least {cls.min_members} models, the run {run.path} "
                    f"has {len(run.model_ids)}")
        if cls.needs_store and not run.store_path.is_dir():
            return f"{name!r} needs the run's error trajectories ({run.store_path} is missing)"
        return None

    if methods is None:
        chosen = []
        for name in method_names():
            reason = supported(name)
            if reason is None:
                chosen.append(name)
            elif name not in BUILTIN_METHODS:
                logger.warning("%s: not used (%s)", name, reason)
        return tuple(chosen)
    methods = tuple(dict.fromkeys(methods))
    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise InputError(f"methods: expected some of {list(known)}, got {list(methods)}")
    for name in methods:
        reason = supported(name)
        if reason is not None:
            raise InputError(f"methods: {reason}")
    return methods


def build_method(name: str, params: Mapping[str, Any] | None = None, *, threads: int = 1,
                 seed: int = 0) -> UQMethod:
    """An unfitted method ``name`` with ``params``; ``threads`` and ``seed`` fill the
    method's thread and seed parameters (``n_threads``, ``seed``, ``random_state``) when
    it has them and they are not in ``params``."""
    from mlipuq.registry import method_class

    cls = method_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    given = dict(params or {})
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise InputError(f"{name}: unknown parameter(s) {unknown} (parameters: "
                         f"{sorted(accepted)})")
    for key, value in (("n_threads", threads), ("seed", seed), ("random_state", seed)):
        if key in accepted and key not in given:
            given[key] = value
    return cls(**given)


# ---------------------------------------------------------------------- fitting
def fit_methods(
    run: RunFolder,
    *,
    model_id: str = "model_0",
    methods: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    train_outputs: Mapping[str, ModelOutputs] | None = None,
    calibrate: bool = True,
    fpr: float = DEFAULT_FPR,
    threads: int = 1,
    seed: int = 0,
    save: bool = True,
    progress: Callable[[str], None] = _quiet,
    client: Any = None,
) -> dict[str, UQMethod]:
    """Fit UQ methods on the training set of ``run``, calibrate them on its validation
    frames and save them in ``RUN/methods/``.

    Parameters
    ----------
    run : RunFolder
        A trained run (``mlipuq train``).
    model_id : str
        Member whose outputs the single-model methods use.
    methods : sequence of str, optional
        Registered method names (default: all the run supports).
    params : dict of str -> dict, optional
        Constructor parameters per method, e.g. ``{"ltau": {"k": 8}}``.
    train_outputs : dict of str -> ModelOutputs, optional
        The members' outputs on ``run.train_frames()`` (computed when missing).
    calibrate : bool
        Calibrate every method on the run's validation frames
        (:func:`fit_on_validation`).
    fpr : float
        In-domain false-positive rate of the fitted thresholds.
    threads, seed : int
        Threads and seed given to methods that take them.
    save : bool
        Write every method to ``RUN/methods/<name>/`` (atomic per method).
    progress : callable
        Called with one line per step.
    client : distributed.Client, optional
        Fit on this Dask cluster: each method's
        :meth:`~mlipuq.method.UQMethod.fit_distributed` instead of ``fit``
        (``--scheduler``; :mod:`mlipuq.distributed`).

    Returns
    -------
    dict of str -> UQMethod
    """
    methods = available_methods(run, methods)
    check_member(run, model_id)
    params = dict(params or {})
    unknown = sorted(set(params) - set(methods))
    if unknown:
        raise InputError(f"params: given for methods not fitted: {unknown}")
    built = {name: build_method(name, params.get(name), threads=threads, seed=seed)
             for name in methods}
    for name, method in built.items():  # parameters checked before any work
        try:
            method.check_params()
        except InputError as error:
            raise InputError(f"--param {name}: {error} (given: {params.get(name, {})})") \
                from None
    if train_outputs is None:
        members = members_needed(run, methods, model_id)
        if client is None:
            train_outputs, _ = model_outputs(run, run.train_frames(), model_ids=members,
                                             threads=threads)
        else:
            train_outputs = _worker_outputs(run, members, client, progress, threads=threads)
    X = committee(train_outputs, model_id)
    store = None
    for name, method in built.items():
        progress(f"fitting {name} on {X.n_atoms} training atoms")
        if method.needs_store and store is None:
            store = run.store
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # rank notes of small groups
            try:
                if client is None:
                    method.fit(X, store if method.needs_store else None)
                else:
                    method.fit_distributed(X, store if method.needs_store else None, client)
            except (TypeError, ValueError) as error:
                if not params.get(name):
                    raise
                raise InputError(f"--param {name}: {error} (given: {params[name]})") from None
    if calibrate:
        reason = fit_on_validation(run, built, model_id=model_id, fpr=fpr, threads=threads)
        progress(f"calibration on the validation frames: {reason or 'done'}")
    if save:
        save_methods(run, built, model_id=model_id)
    return built


def _worker_outputs(run: RunFolder, members: Sequence[str], client: Any,
                    progress: Callable[[str], None], *, threads: int = 1
                    ) -> dict[str, ModelOutputs]:
    """The members' outputs on the training frames, computed by the cluster's workers
    (each loads the model once) into a scratch directory beside the run; descriptors and
    forces come back as dask arrays over its files."""
    from mlipuq.distributed.descriptors import worker_outputs
    from mlipuq.distributed.ltau import work_directory

    frames = run.train_frames()
    scratch = work_directory(run.path, owner=client)
    progress(f"model outputs of {len(members)} member(s) on {len(frames)} training "
             "configurations, computed by the workers")
    return {member: worker_outputs(run, frames, scratch / member, client, model_id=member,
                                   threads=threads)
            for member in members}


def fit_on_validation(
    run: RunFolder,
    methods: Mapping[str, UQMethod],
    *,
    model_id: str,
    fpr: float = DEFAULT_FPR,
    threads: int = 1,
    batch_size: int = 16,
    device: str = "cpu",
) -> str | None:
    """Calibrate every method on the run's validation frames, in place.

    The validation frames are in domain and were never trained on; each method's
    :meth:`~mlipuq.method.UQMethod.calibrate` fits its flag threshold at in-domain
    false-positive rate ``fpr`` per configuration (and, for methods that calibrate
    their predictions, e.g. LTAU's scale factor, those too).

    Returns
    -------
    str or None
        None when calibrated, else why not (no validation frames, or frames without
        forces); the methods are then left as they were.
    """
    from mlipuq.io import read_structures, reference_forces

    path = run.val_path
    if not path.is_file() or path.stat().st_size == 0:
        return f"no validation frames ({path.name})"
    frames = read_structures(path)
    reference = [reference_forces(atoms) for atoms in frames]
    if any(forces is None for forces in reference):
        return f"{path.name} has frames without forces"
    outputs, _ = model_outputs(run, frames, model_ids=members_needed(run, list(methods), model_id),
                               threads=threads, batch_size=batch_size, device=device)
    X = committee(outputs, model_id)
    errors = np.linalg.norm(np.concatenate(reference) - X.forces, axis=1)
    for method in methods.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            method.calibrate(X, errors, fpr=fpr, source=path.name)
    return None


# ---------------------------------------------------------------------- persistence
def method_dir(run: RunFolder, name: str) -> Path:
    """``RUN/methods/<name>``."""
    return Path(run.path) / METHODS_DIR / name


def method_provenance(run: RunFolder, method: UQMethod, model_id: str) -> dict:
    """What ``method`` fitted now on ``run`` depends on (JSON types): the backend, the
    member, the model files it used (SHA-256) and the atom-table fingerprint."""
    from mlipuq.provenance import run_provenance

    members = run.model_ids if method.min_members > 1 else [model_id]
    return {"backend": run.backend,
            "member": model_id if method.min_members <= 1 else None,
            **run_provenance(run, members)}


def provenance_reason(run: RunFolder, method: UQMethod, model_id: str) -> str | None:
    """Why a loaded ``method`` does not describe member ``model_id`` of ``run`` as it is
    now (None: it does; see :func:`mlipuq.method.provenance_mismatch`)."""
    from mlipuq.method import provenance_mismatch

    return provenance_mismatch(getattr(method, "provenance_", None),
                               method_provenance(run, method, model_id))


def save_methods(run: RunFolder, methods: Mapping[str, UQMethod], *, model_id: str) -> None:
    """Write each method to ``RUN/methods/<name>/`` with its provenance, plus what the
    run's backend exports for it there (its optional ``export_method``, e.g. pacemaker
    ``.asi`` active sets; single-model methods get ``model_id``, committee methods None),
    each directory swapped in atomically with its exports."""
    export = getattr(run.backend_class, "export_method", None)
    for name, method in methods.items():
        member = model_id if method.min_members <= 1 else None
        method.save(method_dir(run, name), provenance=method_provenance(run, method, model_id),
                    extra=None if export is None else functools.partial(export, run, member,
                                                                        method))


def load_methods(
    run: RunFolder, methods: Sequence[str], *, model_id: str
) -> tuple[dict[str, UQMethod], dict[str, str]]:
    """The saved methods of ``run`` that are valid for ``model_id`` as the run is now.

    Returns
    -------
    loaded : dict of str -> UQMethod
        Methods saved with a provenance equal to :func:`method_provenance` now.
    reasons : dict of str -> str
        For each other requested method, why it was not loaded (missing, stale,
        another member, or written by mlipuq 0.1).
    """
    from mlipuq.method import load_method

    loaded, reasons = {}, {}
    for name in methods:
        directory = method_dir(run, name)
        if not (directory / "estimator.json").is_file():
            old = LEGACY_FILE_OF.get(name)
            reasons[name] = "not fitted yet"
            if old is not None and (Path(run.path) / old).exists():
                reasons[name] += f" (RUN/{old} of mlipuq 0.1 is never read)"
            continue
        try:
            method = load_method(directory)
        except InputError as error:
            reasons[name] = str(error)
            continue
        reason = provenance_reason(run, method, model_id)
        if reason is None:
            loaded[name] = method
        else:
            reasons[name] = reason
    return loaded, reasons


def load_run_method(run: RunFolder, name: str, *, model_id: str) -> UQMethod:
    """One saved method of ``run`` valid for ``model_id``, or a one-line error saying
    why not and how to refit."""
    loaded, reasons = load_methods(run, [name], model_id=model_id)
    if name not in loaded:
        raise InputError(f"{method_dir(run, name)}: {reasons[name]}; run "
                         f"'mlipuq fit --run {run.path} --model-id {model_id}' to (re)fit it")
    return loaded[name]


# ---------------------------------------------------------------------- prediction
def predict_methods(
    methods: Mapping[str, UQMethod],
    outputs_by_member: Mapping[str, ModelOutputs],
    *,
    model_id: str = "model_0",
) -> tuple[dict[str, UQResult], dict[str, float]]:
    """Every method's :class:`UQResult` on one set of model outputs, with timings.

    Parameters
    ----------
    methods : dict of str -> UQMethod
        Fitted methods; each result is named by its key (so one estimator can appear
        before and after calibration). Scores a method derives for free
        (:meth:`~mlipuq.method.UQMethod.derived_results`) are added under their own
        names, with the cost of the method that gave them.
    outputs_by_member : dict of str -> ModelOutputs
        Outputs of the members on the test frames (all members for committee methods).
    model_id : str
        Member whose outputs the single-model methods use.

    Returns
    -------
    results : dict of str -> UQResult
    seconds_per_atom : dict of str -> float
        Wall time of each method's UQ step per atom (committee methods: the deviation
        arithmetic only; add the other members' forward passes for their full cost).
    """
    from dataclasses import replace

    X = committee(outputs_by_member, model_id)
    results: dict[str, UQResult] = {}
    seconds: dict[str, float] = {}
    for name, method in methods.items():
        start = time.perf_counter()
        result = method.predict(X)
        seconds[name] = (time.perf_counter() - start) / max(X.n_atoms, 1)
        results[name] = replace(result, method=name)
        for derived, value in method.derived_results(result).items():
            if derived not in results:
                results[derived] = value
                seconds[derived] = seconds[name]
    return results, seconds


SINGLE_PASS_FIELDS = frozenset({"descriptors", "energies", "forces"})
"""What one forward pass of one model gives a UQ method in a calculator."""


def calculator_methods(run: RunFolder, model_id: str) -> dict[str, UQMethod]:
    """The methods ``mlipuq fit`` saved in ``RUN/methods`` that one model's forward pass
    can drive (``requires`` within descriptors, energies, forces; one member).

    Raises
    ------
    InputError
        A saved method was fitted on another member's descriptors (they are not
        comparable), on another model file or training set than the run has now, or
        the run holds only estimators written by mlipuq 0.1 (the message says how to
        refit).
    """
    from mlipuq.registry import method_class

    directory = Path(run.path) / METHODS_DIR
    names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if not names:
        legacy = [f for f in LEGACY_FILES if (Path(run.path) / f).exists()]
        if legacy:
            raise InputError(f"{run.path}: estimators written by mlipuq 0.1 "
                             f"({', '.join(legacy)}); run 'mlipuq fit --run {run.path}' to refit "
                             "them in the current format")
        return {}
    out = {}
    for name in names:
        if name.startswith("."):
            continue  # a temporary directory of an interrupted write
        try:
            cls = method_class(name)
        except InputError as error:  # e.g. the method of an uninstalled plug-in
            logger.warning("%s: not attached (%s)", directory / name, error)
            continue
        if set(cls.requires) <= SINGLE_PASS_FIELDS and cls.min_members <= 1:
            out[name] = load_run_method(run, name, model_id=model_id)
    return out
