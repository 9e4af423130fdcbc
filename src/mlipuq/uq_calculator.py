"""What every backend's ASE calculator shares: attached methods and their result keys.

A backend's calculator (NequIP's :class:`~mlipuq.backends.nequip.calculator.UQCalculator`,
MACE's, pacemaker's, ...) runs its model once per calculation, takes the per-atom
descriptors of that same pass, and hands them to :meth:`UncertaintyResults.add_uncertainty`,
which predicts every attached method and writes its arrays into ``calc.results``.
Nothing here imports torch or a model package.

For a method attached as ``name`` the results hold every per-atom array of
``UQResult.as_arrays(prefix=name)`` (``{name}_uncertainty``, ``{name}_p``, ...), the
per-configuration summaries ``{name}_uncertainty_max`` and ``{name}_uncertainty_mean``,
and, when the method has a threshold, ``{name}_threshold``,
``{name}_threshold_aggregate`` and ``{name}_config_flag`` (the atoms of one calculation
form one configuration). ``results["descriptors"]`` (n_atoms, D) float32 is kept on
request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlipuq.exceptions import InputError

DESCRIPTORS_KEY = "descriptors"


def check_estimators(estimators: Any) -> dict[str, Any]:
    """``estimators`` as a dict name -> fitted :class:`~mlipuq.method.UQMethod` that one
    forward pass of one model can drive (InputError otherwise; None gives ``{}``)."""
    if estimators is None:
        return {}
    if not isinstance(estimators, dict):
        raise InputError(
            f"estimators: expected a dict name -> estimator, got {type(estimators).__name__}"
        )
    from mlipuq.method import UQMethod
    from mlipuq.run_methods import SINGLE_PASS_FIELDS

    for name, estimator in estimators.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise InputError(f"estimators: name {name!r} is not a valid identifier")
        if not isinstance(estimator, UQMethod):
            raise InputError(
                f"estimators: {name!r} is a {type(estimator).__name__}, not a UQMethod"
            )
        if not set(estimator.requires) <= SINGLE_PASS_FIELDS or estimator.min_members > 1:
            raise InputError(
                f"estimators: {name!r} needs {', '.join(estimator.requires)} (a calculator "
                f"of one model gives {', '.join(sorted(SINGLE_PASS_FIELDS))})"
            )
    return dict(estimators)


def run_estimators(run: Any, model_id: str, estimators: dict[str, Any] | str | None
                   ) -> dict[str, Any] | None:
    """``estimators`` with ``"auto"`` resolved to the run's saved methods that one forward
    pass can drive (:func:`mlipuq.run_methods.calculator_methods`)."""
    if isinstance(estimators, str):
        if estimators != "auto":
            raise InputError(f"estimators: expected 'auto', a dict or None, got {estimators!r}")
        from mlipuq.run_methods import calculator_methods

        return calculator_methods(run, model_id)
    return estimators


def uncertainty_results(name: str, result: Any) -> dict[str, Any]:
    """Calculator result keys of one ``UQResult``: per-atom arrays and per-config summaries."""
    arrays = result.as_arrays(prefix=name)
    atom = np.asarray(result.atom_uncertainty, dtype=np.float64)
    arrays[f"{name}_uncertainty_max"] = float(atom.max())
    arrays[f"{name}_uncertainty_mean"] = float(atom.mean())
    if result.threshold is not None:
        arrays[f"{name}_threshold"] = float(result.threshold)
        arrays[f"{name}_threshold_aggregate"] = result.config_aggregate
        frame = arrays[f"{name}_uncertainty_{result.config_aggregate}"]
        arrays[f"{name}_config_flag"] = bool(frame > result.threshold)
    return arrays


class UncertaintyResults:
    """Mixin for an ASE calculator: attached methods predicted on one pass's descriptors.

    The calculator calls :meth:`init_uncertainty` in its ``__init__`` and
    :meth:`add_uncertainty` after its model has filled ``self.results`` with energy and
    forces.

    Attributes
    ----------
    estimators : dict of str -> UQMethod
        Fitted methods; the key is the prefix of their result keys.
    keep_descriptors : bool
        Also store ``results["descriptors"]`` (n_atoms, D) in :attr:`descriptor_dtype`.
    store_arrays : bool
        Also copy the per-atom uncertainty arrays into ``atoms.arrays`` of the atoms
        passed to the calculation (so extxyz / OVITO carry them).
    """

    descriptor_dtype: Any = np.float32
    """dtype the descriptors are handed to the methods in (float64 where a backend's
    features are compared with another code's to full precision, e.g. ACE gamma)."""

    estimators: dict[str, Any]
    keep_descriptors: bool
    store_arrays: bool
    results: dict[str, Any]

    def init_uncertainty(self, estimators: dict[str, Any] | None, *,
                         keep_descriptors: bool = False, store_arrays: bool = False) -> None:
        """Check and attach ``estimators``; extend ``implemented_properties``."""
        self.estimators = check_estimators(estimators)
        self.keep_descriptors = keep_descriptors
        self.store_arrays = store_arrays
        keys = [DESCRIPTORS_KEY] if keep_descriptors else []
        for name in self.estimators:
            keys += [f"{name}_uncertainty", f"{name}_uncertainty_max",
                     f"{name}_uncertainty_mean"]
        self.implemented_properties = list(type(self).implemented_properties) + keys

    @property
    def wants_descriptors(self) -> bool:
        """True when a calculation must produce descriptors."""
        return bool(self.estimators) or self.keep_descriptors

    def add_uncertainty(self, numbers: np.ndarray, descriptors: Any) -> None:
        """Predict every attached method on one configuration's descriptors.

        Parameters
        ----------
        numbers : ndarray of int, shape (n_atoms,)
            Atomic numbers (methods cache their grouping by element).
        descriptors : array-like, shape (n_atoms, D)
            Per-atom descriptors of the same forward pass that gave
            ``self.results["energy"]`` (eV) and ``["forces"]`` (eV/Å).
        """
        if not self.wants_descriptors:
            return
        from mlipuq.backends.base import ModelOutputs

        descriptors = np.ascontiguousarray(descriptors, dtype=self.descriptor_dtype)
        if self.keep_descriptors:
            self.results[DESCRIPTORS_KEY] = descriptors
        outputs = ModelOutputs(
            species=np.asarray(numbers),
            config_index=np.zeros(len(descriptors), dtype=np.int64),
            descriptors=descriptors,
            energies=np.atleast_1d(self.results.get("energy", np.nan)),
            forces=self.results.get("forces"),
        )
        for name, estimator in self.estimators.items():
            self.results.update(uncertainty_results(name, estimator.predict(outputs)))

    def copy_uncertainty_arrays(self, atoms: Any) -> None:
        """With ``store_arrays``, copy the per-atom uncertainty arrays into ``atoms.arrays``."""
        if not self.store_arrays or atoms is None:
            return
        prefixes = tuple(f"{name}_" for name in self.estimators)
        for key, values in self.results.items():
            if key.startswith(prefixes) and np.ndim(values) == 1:
                atoms.arrays[key] = np.asarray(values)
