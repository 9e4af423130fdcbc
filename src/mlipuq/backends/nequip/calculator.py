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

from mlipuq.backends.nequip.features import check_model_path, torch_threads
from mlipuq.exceptions import InputError
from mlipuq.uq_calculator import UncertaintyResults, run_estimators

try:  # nequip is an optional dependency (extra "nequip")
    from nequip.integrations.ase import NequIPCalculator
except ImportError as _error:  # pragma: no cover - exercised only without nequip
    raise ImportError(
        "mlipuq.backends.nequip.calculator needs NequIP: pip install 'mlipuq[nequip]'"
    ) from _error

class UQCalculator(UncertaintyResults, NequIPCalculator):
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
        self.init_uncertainty(estimators, keep_descriptors=keep_descriptors,
                              store_arrays=store_arrays)
        self.threads = threads

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
        estimators = run_estimators(run, model_id, estimators)
        return cls.from_model(run.model_path(model_id), device=device, estimators=estimators,
                              **kwargs)

    # ------------------------------------------------------------------ the hook
    def calculate(self, atoms=None, properties=("energy",), system_changes=None) -> None:
        """NequIP's calculation (one forward pass) plus the uncertainty keys."""
        from ase.calculators.calculator import all_changes

        changes = all_changes if system_changes is None else system_changes
        with torch_threads(self.threads):
            super().calculate(atoms, list(properties), changes)
        self.copy_uncertainty_arrays(atoms)

    def save_extra_outputs(self, out: dict) -> None:
        """Add descriptors and every estimator's per-atom arrays to ``self.results``."""
        from nequip.data import AtomicDataDict

        if not self.wants_descriptors:
            return
        if AtomicDataDict.NODE_FEATURES_KEY not in out:
            raise InputError(
                "model: its outputs have no node_features (a model compiled with NequIP's "
                "'ase' target? compile with mlipuq.backends.nequip.compile.compile_model)"
            )
        self.add_uncertainty(self.atoms.numbers,
                             out[AtomicDataDict.NODE_FEATURES_KEY].detach().cpu().numpy())
