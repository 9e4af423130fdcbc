"""ASE calculator: MACE energy, forces and stress plus per-atom uncertainty, one pass.

:class:`MaceUQCalculator` is MACE's own ``MACECalculator`` (one model): its
``calculate`` runs unchanged, and a forward hook on the model keeps the
``node_feats`` of that same pass; their invariant columns (the descriptors of
:class:`~mlipuq.backends.mace.backend.MaceBackend`) go to every attached estimator
through :class:`~mlipuq.uq_calculator.UncertaintyResults`::

    calc = MaceUQCalculator.from_run("run", model_id="model_0")  # RUN/methods if fitted
    atoms.calc = calc
    atoms.get_forces()
    calc.results["ltau_uncertainty"]       # (n_atoms,)

Result keys are those of :mod:`mlipuq.uq_calculator`.
"""

from __future__ import annotations

import os
from typing import Any

from mlipuq.backends.nequip.features import torch_threads
from mlipuq.exceptions import InputError
from mlipuq.uq_calculator import UncertaintyResults, run_estimators

from .model import MACE_MISSING, import_mace, invariant_columns, load_model

try:
    MACECalculator = import_mace().MACECalculator
except InputError as _error:  # pragma: no cover - exercised only without mace
    raise ImportError(MACE_MISSING) from _error


class MaceUQCalculator(UncertaintyResults, MACECalculator):
    """MACE ASE calculator that adds per-atom uncertainty from the same forward pass.

    Parameters
    ----------
    model : mace.modules.ScaleShiftMACE
        One MACE model (e.g. from :func:`mlipuq.backends.mace.model.load_model`).
    device : str
        torch device.
    estimators : dict of str -> UQMethod, optional
        Fitted methods that need only one model's outputs; the key is the prefix of
        their result keys.
    keep_descriptors : bool
        Also store ``results["descriptors"]`` (n_atoms, D) float32.
    store_arrays : bool
        Also copy the per-atom uncertainty arrays into ``atoms.arrays``.
    threads : int, optional
        torch threads during each calculation (restored afterwards).
    **kwargs
        Passed to ``MACECalculator`` (``default_dtype``, unit factors, ASE options).
    """

    def __init__(self, model: Any, device: str = "cpu", *,
                 estimators: dict[str, Any] | None = None, keep_descriptors: bool = False,
                 store_arrays: bool = False, threads: int | None = None,
                 **kwargs: Any) -> None:
        import logging

        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        kwargs.setdefault("default_dtype", dtype)
        level = logging.getLogger().level
        try:  # MACECalculator logs its head choice at INFO on the root logger
            logging.getLogger().setLevel(max(level, logging.WARNING))
            super().__init__(models=[model], device=device, **kwargs)
        finally:
            logging.getLogger().setLevel(level)
        self.init_uncertainty(estimators, keep_descriptors=keep_descriptors,
                              store_arrays=store_arrays)
        self.threads = threads
        self.columns = invariant_columns(model)
        self._features: Any = None

    @classmethod
    def from_model(cls, model_path: str | os.PathLike, *, device: str = "cpu",
                   estimators: dict[str, Any] | None = None, **kwargs: Any
                   ) -> MaceUQCalculator:
        """Calculator from ``X.pt`` + ``X.json`` written by mlipuq (never a pickle)."""
        model, _ = load_model(model_path, device=device)
        return cls(model, device=device, estimators=estimators, **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, model_id: str = "model_0",
                 estimators: dict[str, Any] | str | None = "auto", device: str = "cpu",
                 **kwargs: Any) -> MaceUQCalculator:
        """Calculator for member ``model_id`` of a MACE run folder; ``"auto"``
        attaches the run's fitted single-pass methods (``RUN/methods``)."""
        from mlipuq.run_folder import RunFolder

        run = RunFolder.open(run_dir)
        if model_id not in run.model_ids:
            raise InputError(
                f"model_id: {model_id!r} is not a member of {run_dir} (members: {run.model_ids})"
            )
        estimators = run_estimators(run, model_id, estimators)
        return cls.from_model(run.model_path(model_id), device=device,
                              estimators=estimators, **kwargs)

    def _keep_features(self, module: Any, args: Any, output: Any) -> None:
        self._features = output["node_feats"]

    def calculate(self, atoms=None, properties=None, system_changes=None) -> None:
        """MACE's calculation (one forward pass) plus the uncertainty keys."""
        from ase.calculators.calculator import all_changes

        changes = all_changes if system_changes is None else system_changes
        hook = (self.models[0].register_forward_hook(self._keep_features)
                if self.wants_descriptors else None)
        try:
            with torch_threads(self.threads):
                super().calculate(atoms, properties, changes)
        finally:
            if hook is not None:
                hook.remove()
        if hook is not None:
            features = self._features.detach()[: len(self.atoms), self.columns]
            self._features = None
            self.add_uncertainty(self.atoms.numbers, features.cpu().numpy())
        self.copy_uncertainty_arrays(atoms)
