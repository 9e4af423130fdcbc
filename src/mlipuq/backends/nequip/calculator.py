"""ASE calculator: NequIP energy and forces plus per-atom uncertainty, one forward pass.

:class:`UQCalculator` is NequIP's own ``NequIPCalculator`` with its documented
extension hook ``save_extra_outputs`` filled in: the ``node_features`` of the same
forward pass that gave energy and forces are handed to every attached estimator
(every fitted :class:`~mlipuq.method.UQMethod` that needs only descriptors: LTAU,
D-optimality, LLPR, ...), and the per-atom arrays of each result go into
``calc.results``::

    calc = UQCalculator.from_run("run", model_id="model_0")     # RUN/methods if fitted
    atoms.calc = calc
    atoms.get_forces()
    calc.results["ltau_uncertainty"]       # (n_atoms,), 1 - p_j
    calc.results["ltau_uncertainty_max"]   # float, max over the atoms

For an estimator named ``name`` the results hold every per-atom array of
``UQResult.as_arrays(prefix=name)`` (``{name}_uncertainty``, ``{name}_p``,
``{name}_expected_error``, ``{name}_knn_distance`` for LTAU, ...) and the
per-configuration summaries ``{name}_uncertainty_max`` and ``{name}_uncertainty_mean``,
and, when the estimator has a threshold, ``{name}_threshold``,
``{name}_threshold_aggregate`` (the per-configuration aggregate it applies to: "mean"
for LTAU after ``calibrate``) and ``{name}_config_flag`` (the atoms of one calculation
form one configuration); per-atom ``{name}_flag`` only for a per-atom threshold.
``results["descriptors"]`` (n_atoms, D) float32 is kept on request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.backends.nequip.features import check_model_path, torch_threads
from mlipuq.exceptions import InputError

try:  # nequip is an optional dependency (extra "nequip")
    from nequip.integrations.ase import NequIPCalculator
except ImportError as _error:  # pragma: no cover - exercised only without nequip
    raise ImportError(
        "mlipuq.backends.nequip.calculator needs NequIP: pip install 'mlipuq[nequip]'"
    ) from _error

DESCRIPTORS_KEY = "descriptors"


def _check_estimators(estimators: Any) -> dict[str, Any]:
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


class UQCalculator(NequIPCalculator):
    """NequIP ASE calculator that adds per-atom uncertainty from the same forward pass.

    Build it with :meth:`from_model`, :meth:`from_run` or
    :meth:`from_compiled_model` (a model compiled by
    :func:`mlipuq.backends.nequip.compile.compile_model`).

    Parameters
    ----------
    model : torch.nn.Module
        NequIP model in eval mode (returns ``node_features``).
    device : str or torch.device
        Device of the model.
    estimators : dict of str -> UQMethod, optional
        Fitted methods that need only one model's outputs; the key is the prefix of
        their result keys (e.g. ``{"ltau": est}``).
    keep_descriptors : bool
        Also store ``results["descriptors"]`` (n_atoms, D) float32.
    store_arrays : bool
        Also copy the per-atom uncertainty arrays into ``atoms.arrays`` of the
        atoms passed to the calculation (so extxyz / OVITO carry them).
    threads : int, optional
        torch threads during each calculation (restored afterwards).
    **kwargs
        Passed to ``NequIPCalculator`` (``transforms``, unit factors, ASE options).
    """

    def __init__(
        self,
        model: Any,
        device: Any = "cpu",
        *,
        estimators: dict[str, Any] | None = None,
        keep_descriptors: bool = False,
        store_arrays: bool = False,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, device=device, **kwargs)
        self.estimators = _check_estimators(estimators)
        self.keep_descriptors = keep_descriptors
        self.store_arrays = store_arrays
        self.threads = threads
        self.implemented_properties = list(type(self).implemented_properties) + self._extra_keys()

    def _extra_keys(self) -> list[str]:
        keys = [DESCRIPTORS_KEY] if self.keep_descriptors else []
        for name in self.estimators:
            keys += [f"{name}_uncertainty", f"{name}_uncertainty_max", f"{name}_uncertainty_mean"]
        return keys

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _get_aoti_compile_target(cls) -> dict:
        from mlipuq.backends.nequip.compile import compile_target

        return compile_target()

    @classmethod
    def from_model(
        cls,
        model_path: str | os.PathLike,
        *,
        device: str = "cpu",
        estimators: dict[str, Any] | None = None,
        chemical_species_to_atom_type_map: dict[str, str] | bool = True,
        **kwargs: Any,
    ) -> UQCalculator:
        """Calculator from a packaged model (``.nequip.zip``) or checkpoint (``.ckpt``).

        ``chemical_species_to_atom_type_map=True`` maps chemical symbols to the model's
        type names one to one; give a dict for other type names. Other keyword
        arguments go to :class:`UQCalculator`.
        """
        path = check_model_path(model_path)
        with torch_threads(kwargs.get("threads")):
            return cls._from_saved_model(
                str(path),
                device=device,
                chemical_species_to_atom_type_map=chemical_species_to_atom_type_map,
                estimators=estimators,
                **kwargs,
            )

    @classmethod
    def from_compiled(
        cls,
        compile_path: str | os.PathLike,
        *,
        device: str = "cpu",
        estimators: dict[str, Any] | None = None,
        chemical_species_to_atom_type_map: dict[str, str] | bool = True,
        **kwargs: Any,
    ) -> UQCalculator:
        """Calculator from an AOTInductor model compiled with the ``mlipuq_ase`` target."""
        path = Path(compile_path)
        if not path.is_file():
            raise InputError(f"compiled model: {path} not found")
        return cls.from_compiled_model(
            str(path),
            device=device,
            chemical_species_to_atom_type_map=chemical_species_to_atom_type_map,
            estimators=estimators,
            **kwargs,
        )

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        *,
        model_id: str = "model_0",
        estimators: dict[str, Any] | str | None = "auto",
        device: str = "cpu",
        **kwargs: Any,
    ) -> UQCalculator:
        """Calculator for member ``model_id`` of a run folder made by ``mlipuq train``.

        ``estimators="auto"`` attaches every method ``mlipuq fit`` saved in
        ``RUN/methods`` for this member that needs only one model's outputs (none when
        nothing is fitted); a dict attaches those estimators instead.
        """
        from mlipuq.run_folder import RunFolder

        run = RunFolder.open(run_dir)
        if model_id not in run.model_ids:
            raise InputError(
                f"model_id: {model_id!r} is not a member of {run_dir} (members: {run.model_ids})"
            )
        if isinstance(estimators, str):
            if estimators != "auto":
                raise InputError(f"estimators: expected 'auto', a dict or None, got {estimators!r}")
            estimators = auto_estimators(run, model_id)
        return cls.from_model(run.model_path(model_id), device=device, estimators=estimators,
                              **kwargs)

    # ------------------------------------------------------------------ the hook
    def calculate(self, atoms=None, properties=("energy",), system_changes=None) -> None:
        """NequIP's calculation (one forward pass) plus the uncertainty keys."""
        from ase.calculators.calculator import all_changes

        changes = all_changes if system_changes is None else system_changes
        with torch_threads(self.threads):
            super().calculate(atoms, list(properties), changes)
        if self.store_arrays and atoms is not None:
            prefixes = tuple(f"{name}_" for name in self.estimators)
            for key, values in self.results.items():
                if key.startswith(prefixes) and np.ndim(values) == 1:
                    atoms.arrays[key] = np.asarray(values)

    def save_extra_outputs(self, out: dict) -> None:
        """Add descriptors and every estimator's per-atom arrays to ``self.results``."""
        from nequip.data import AtomicDataDict

        if not self.estimators and not self.keep_descriptors:
            return
        if AtomicDataDict.NODE_FEATURES_KEY not in out:
            raise InputError(
                "model: its outputs have no node_features (a model compiled with NequIP's "
                "'ase' target? compile with mlipuq.backends.nequip.compile.compile_model)"
            )
        descriptors = np.ascontiguousarray(
            out[AtomicDataDict.NODE_FEATURES_KEY].detach().cpu().numpy(), dtype=np.float32
        )
        if self.keep_descriptors:
            self.results[DESCRIPTORS_KEY] = descriptors
        from mlipuq.backends.base import ModelOutputs

        outputs = ModelOutputs(
            species=self.atoms.numbers,  # atomic numbers: methods cache their grouping
            config_index=np.zeros(len(descriptors), dtype=np.int64),  # one configuration
            descriptors=descriptors,
            energies=np.atleast_1d(self.results.get("energy", np.nan)),
            forces=self.results.get("forces"),
        )
        for name, estimator in self.estimators.items():
            self.results.update(uncertainty_results(name, estimator.predict(outputs)))


def uncertainty_results(name: str, result: Any) -> dict[str, Any]:
    """Calculator result keys of one ``UQResult``: per-atom arrays and per-config summaries."""
    arrays = result.as_arrays(prefix=name)
    atom = np.asarray(result.atom_uncertainty, dtype=np.float64)
    arrays[f"{name}_uncertainty_max"] = float(atom.max())
    arrays[f"{name}_uncertainty_mean"] = float(atom.mean())
    if result.threshold is not None:  # e.g. fitted by LTAUEstimator.calibrate
        arrays[f"{name}_threshold"] = float(result.threshold)
        arrays[f"{name}_threshold_aggregate"] = result.config_aggregate
        frame = arrays[f"{name}_uncertainty_{result.config_aggregate}"]
        arrays[f"{name}_config_flag"] = bool(frame > result.threshold)
    return arrays


def auto_estimators(run: Any, model_id: str) -> dict[str, Any]:
    """:func:`mlipuq.run_methods.calculator_methods` (the run's saved methods one
    forward pass can drive)."""
    from mlipuq.run_methods import calculator_methods

    return calculator_methods(run, model_id)
