"""The contract every uncertainty method implements, and its one persistence format.

A UQ method is a scikit-learn style estimator (:class:`UQMethod`, built on
:class:`sklearn.base.BaseEstimator`: ``get_params``/``set_params``/``clone``): its
parameters are set in ``__init__``, the work happens in :meth:`UQMethod.fit`, fitted
state ends with an underscore, and every method has the same signatures over a
backend's outputs::

    method.fit(X, store=None)          # X: ModelOutputs of the training set
    method.fit_distributed(X, store, client)   # the same, on a Dask cluster
    method.predict(X) -> UQResult      # X: ModelOutputs of new configurations
    method.calibrate(X, force_errors, fpr=0.05)   # in-domain held-out data
    method.save(directory, provenance=...)
    load_method(directory)             # any registered method

``store`` is the per-epoch error-trajectory store (:class:`~mlipuq.trajectory_store.
TrajectoryStore`) for the methods that learn from training errors (``needs_store``).
The class attributes say what a method needs, so the pipeline, the CLI, the report,
the calculator, ``simulate`` and ``select`` never branch on method names.

Persistence: one directory per fitted method, written to a temporary directory and
swapped in (:func:`mlipuq.io.atomic_directory`)::

    estimator.json   header: format "mlipuq-estimator", format_version, method, class,
                     mlipuq_version, params, state (JSON), arrays (names), files,
                     provenance (backend, model files + SHA-256, atom-table
                     fingerprint, member)
    arrays.npz       the fitted arrays (no pickle)
    ...              method-specific files named in ``files`` (FAISS indices)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.result import UQResult

FORMAT_NAME = "mlipuq-estimator"
FORMAT_VERSION = 1
HEADER_FILE = "estimator.json"
ARRAYS_FILE = "arrays.npz"

__all__ = ["UQMethod", "load_method", "read_method_header", "provenance_mismatch"]


class UQMethod(BaseEstimator):
    """Base class of every uncertainty method.

    Subclasses implement :meth:`fit`, :meth:`predict`, :meth:`_get_state` and
    :meth:`_set_state`, set the class attributes below and register themselves in
    :mod:`mlipuq.registry`.

    Class attributes
    ----------------
    name : str
        Registry key and the prefix of every output array (``{name}_uncertainty``).
    requires : tuple of str
        :class:`~mlipuq.backends.base.ModelOutputs` fields ``fit`` and ``predict`` read
        (``"descriptors"``, ``"committee_forces"``, ...).
    needs_store : bool
        ``fit`` needs the training error-trajectory store.
    min_members : int
        Committee members the method needs (the ensemble: 2).
    errors_from : {"model", "committee mean"}
        Which prediction's errors the method's uncertainty is judged against.
    calibrates : bool
        :meth:`calibrate` changes the predictions (not only the threshold); the
        evaluation then reports the method before (``name``) and after
        (``name_calibrated``) calibration.
    derived_names : tuple of str
        Names of the scores :meth:`derived_results` adds.
    bounds : (float or None, float or None)
        Range of the atom uncertainty (None: unbounded).
    display_name : str
        How reports name the method.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ("descriptors",)
    needs_store: ClassVar[bool] = False
    min_members: ClassVar[int] = 1
    errors_from: ClassVar[str] = "model"
    calibrates: ClassVar[bool] = False
    derived_names: ClassVar[tuple[str, ...]] = ()
    bounds: ClassVar[tuple[float | None, float | None]] = (0.0, None)
    display_name: ClassVar[str] = ""

    # ------------------------------------------------------------------ contract
    def fit(self, X: ModelOutputs, store: Any = None) -> UQMethod:
        """Fit on the training set's model outputs ``X`` (and ``store``); returns self."""
        raise NotImplementedError

    def predict(self, X: ModelOutputs) -> UQResult:
        """Uncertainty of the atoms and configurations of ``X``."""
        raise NotImplementedError

    def fit_distributed(self, X: ModelOutputs, store: Any = None, client: Any = None
                        ) -> UQMethod:
        """Fit with the work spread over a Dask cluster; returns self.

        The pipeline (:func:`mlipuq.run_methods.fit_methods`) calls this instead of
        :meth:`fit` when it is given a ``distributed.Client`` (``--scheduler``). The
        fitted state must be the one :meth:`fit` gives on the same inputs (same
        persistence format), so ``predict``, ``save`` and the calculator do not
        change. This default gathers ``X`` into memory and calls :meth:`fit` in this
        process; methods whose fit scales with N override it (LTAU:
        :mod:`mlipuq.distributed.ltau`).

        Parameters
        ----------
        X : ModelOutputs
            The training set's outputs. ``descriptors``, ``forces`` and
            ``committee_forces`` may be ``dask.array.Array`` chunked by atom blocks
            (:func:`mlipuq.distributed.descriptors.worker_outputs`); ``species``,
            ``config_index`` and the energies are in memory.
        store : TrajectoryStore or None
            The per-epoch error-trajectory store (``needs_store`` methods); its files
            are on a filesystem every worker reads.
        client : distributed.Client or None
            Client of the cluster to run on (:func:`mlipuq.distributed.client_for`);
            None: fit in this process.

        Returns
        -------
        self
        """
        from dataclasses import fields, replace

        lazy = {field.name: np.asarray(getattr(X, field.name).compute()) for field in fields(X)
                if hasattr(getattr(X, field.name), "compute")}
        return self.fit(replace(X, **lazy) if lazy else X, store)

    def calibrate(
        self, X: ModelOutputs, force_errors: np.ndarray | None = None, *, fpr: float = 0.05,
        source: str = "in-domain held-out data",
    ) -> UQMethod:
        """Fit the flag threshold on in-domain held-out configurations ``X``.

        The threshold becomes the (1 - ``fpr``) quantile of the configuration
        uncertainty (:func:`mlipuq.thresholds.fpr_threshold`). Methods with
        ``calibrates = True`` also refit how they predict (using ``force_errors``,
        |F_ref - F_pred| per atom in eV/Å, shape (N,)).

        Returns
        -------
        self
        """
        self.set_threshold(fpr_threshold_of(self.predict(X), fpr), f"FPR {fpr:g} on {source}")
        return self

    def check_params(self) -> None:
        """Raise :class:`InputError` for invalid parameters, before any work (the
        method's own ``_check_params`` when it has one; ``fit`` checks them too)."""
        check = getattr(self, "_check_params", None)
        if check is None:
            return
        try:
            check()
        except (TypeError, ValueError) as error:
            raise InputError(f"{self.name}: invalid parameters ({error})") from None

    def set_threshold(self, value: float, source: str) -> None:
        """Use ``value`` as the configuration flag threshold from now on."""
        self.threshold_ = float(value)
        self.threshold_source_ = str(source)

    def uncalibrated(self) -> UQMethod:
        """A copy predicting as before :meth:`calibrate` (self when nothing changes).

        Methods with ``calibrates = True`` must override it; a copy that ``calibrate``
        then changes must not change this method (``mlipuq.testing`` checks it).
        """
        if self.calibrates:
            raise NotImplementedError(f"{type(self).__name__} calibrates: it must override "
                                      "uncalibrated()")
        return self

    def summary(self) -> str:
        """One line on what was fitted (the flag threshold and where it came from)."""
        threshold = getattr(self, "threshold_", None)
        if threshold is None:
            return "no flag threshold"
        return f"threshold {threshold:.4g} ({getattr(self, 'threshold_source_', None)})"

    def derived_results(self, result: UQResult) -> dict[str, UQResult]:
        """Further scores that come free with ``result`` (name -> result); none here."""
        return {}

    @classmethod
    def check_inputs(cls, X: ModelOutputs, known_species: Any = None) -> None:
        """Raise :class:`InputError` unless ``X`` is a ModelOutputs with the fields the
        method needs, all finite, and (given ``known_species``, the training elements)
        no element outside them."""
        if not isinstance(X, ModelOutputs):
            raise InputError(f"{cls.name}: expected ModelOutputs as X, got {type(X).__name__}")
        X.require(*cls.requires, method=cls.name)
        for field in cls.requires:
            value = np.asarray(getattr(X, field))
            if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
                raise InputError(f"{cls.name}: the model outputs' {field} hold NaN or "
                                 "infinite values")
        if known_species is not None:
            from mlipuq.validation import as_species

            unknown = sorted(set(as_species(X.species).tolist())
                             - {str(s) for s in known_species})
            if unknown:
                raise InputError(f"{cls.name}: element(s) {', '.join(unknown)} not in the "
                                 f"training set (trained on "
                                 f"{', '.join(sorted(map(str, known_species)))})")

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Fitted state: (JSON-serialisable dict, named arrays)."""
        raise NotImplementedError

    def _set_state(self, state: dict, arrays: Mapping[str, np.ndarray], directory: Path) -> None:
        """Restore the fitted state written by :meth:`_get_state`."""
        raise NotImplementedError

    def _write_files(self, directory: Path) -> list[str]:
        """Write method-specific files (e.g. FAISS indices) into ``directory``."""
        return []

    @classmethod
    def _params_from_json(cls, params: dict) -> dict:
        """Constructor parameters as read back from JSON (lists to tuples, ...)."""
        return params

    def save(self, directory: str | os.PathLike, *, provenance: Mapping | None = None,
             extra: Callable[[Path], Any] | None = None) -> None:
        """Write the fitted method to ``directory`` (replaced atomically as a whole).

        Parameters
        ----------
        directory : path-like
        provenance : dict, optional
            What the fit depended on (backend, model files with SHA-256, atom-table
            fingerprint, member); checked by :func:`provenance_mismatch` on load.
        extra : callable, optional
            Called with the temporary directory before it is swapped in, to write more
            files that belong to this save (e.g. a backend's export of the method,
            pacemaker ``.asi``); if it raises, nothing is replaced.
        """
        from mlipuq import __version__
        from mlipuq.io import atomic_directory, save_npz, write_json

        state, arrays = self._get_state()
        with atomic_directory(directory, marker=HEADER_FILE) as tmp:
            files = self._write_files(tmp)
            if extra is not None:
                extra(tmp)
            save_npz(tmp / ARRAYS_FILE, **arrays)
            write_json(tmp / HEADER_FILE, {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "method": self.name,
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "mlipuq_version": __version__,
                "params": _json_params(self.get_params(deep=False)),
                "state": state,
                "arrays": sorted(arrays),
                "files": files,
                "provenance": dict(provenance) if provenance else None,
            })

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UQMethod:
        """Read a method written by :meth:`save` (it must be of this class's method)."""
        method = load_method(directory)
        if not isinstance(method, cls):
            raise InputError(f"{directory}: holds the method {method.name!r}, "
                             f"expected {cls.name!r}")
        return method


def fpr_threshold_of(result: UQResult, fpr: float) -> float:
    """(1 - ``fpr``) quantile of a result's configuration (else atom) uncertainty."""
    from mlipuq.thresholds import fpr_threshold

    scores = result.config_uncertainty
    scores = np.asarray(result.atom_uncertainty if scores is None else scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        raise InputError(f"{result.method}: no finite uncertainty to fit a threshold on")
    return fpr_threshold(scores, fpr)


def read_method_header(directory: str | os.PathLike) -> dict:
    """The checked ``estimator.json`` header of a saved method directory."""
    from mlipuq.io import read_header

    directory = Path(directory)
    if not directory.exists():
        raise InputError(f"{directory}: not found")
    if not (directory / HEADER_FILE).is_file() and directory.is_file():
        raise InputError(f"{directory}: a file written by mlipuq 0.1 (single-file estimator); "
                         "refit the method ('mlipuq fit --run RUN') to write the current format")
    return read_header(directory / HEADER_FILE, what="estimator",
                       format_name=FORMAT_NAME, format_version=(FORMAT_VERSION,))


def load_method(directory: str | os.PathLike) -> UQMethod:
    """Any registered method saved by :meth:`UQMethod.save`.

    Raises
    ------
    InputError
        Not a method directory, a format written by an older mlipuq (with how to
        upgrade), an unregistered method, or arrays that do not match the header.
    """
    from mlipuq.io import load_npz
    from mlipuq.registry import method_class

    directory = Path(directory)
    header = read_method_header(directory)
    cls = method_class(header["method"])
    params = cls._params_from_json(dict(header["params"]))
    try:
        method = cls(**params)
    except TypeError as error:
        raise InputError(f"{directory / HEADER_FILE}: parameters do not match "
                         f"{cls.__name__}: {error}") from None
    arrays = load_npz(directory / ARRAYS_FILE)
    missing = sorted(set(header.get("arrays", [])) - set(arrays))
    if missing:
        raise InputError(f"{directory / ARRAYS_FILE}: missing arrays {missing}")
    try:
        method._set_state(header["state"], arrays, directory)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise InputError(f"{directory}: damaged, or written by another mlipuq version "
                         f"({type(error).__name__}: {error}); refit the method") from None
    method.provenance_ = header.get("provenance")
    return method


def provenance_mismatch(recorded: Mapping | None, expected: Mapping) -> str | None:
    """Why a saved method's provenance differs from ``expected`` (None: it matches).

    Compares the keys of ``expected`` (e.g. ``backend``, ``member``, ``models``,
    ``atom_table_fingerprint``) with the record.
    """
    if not recorded:
        return "no provenance recorded"
    for key, value in expected.items():
        if recorded.get(key) != value:
            if key == "models":
                return "fitted on other model files (retrained, resumed or another member)"
            return f"fitted with {key} {recorded.get(key)!r}, not {value!r}"
    return None


def _json_params(params: Mapping[str, Any]) -> dict:
    """Constructor parameters as JSON types (tuples become lists)."""
    out = {}
    for name, value in params.items():
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return out
