"""ASE calculator: pacemaker energy and forces plus per-atom uncertainty, one evaluation.

:class:`PaceUQCalculator` is python-ace's own ``PyACECalculator``: its evaluation
already computes the per-atom linear B-projections (``compute_projections``), and
those of the same evaluation that gave energy and forces are handed to every
attached method (:class:`mlipuq.uq_calculator.UncertaintyResults`: D-optimality,
clustered D-optimality, LLPR, LTAU, ...)::

    calc = PaceBackend.uq_calculator("run", "model_0")   # RUN/methods if fitted
    atoms.calc = calc
    atoms.get_forces()
    calc.results["doptimality_uncertainty"]     # (n_atoms,) extrapolation grade gamma

Result keys are those of :mod:`mlipuq.uq_calculator`; ``set_active_set`` (pacemaker's
own gamma in ``results["gamma"]``) keeps working.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlipuq.uq_calculator import UncertaintyResults

try:  # python-ace is an optional dependency (extra "pace")
    from pyace.asecalc import PyACECalculator
except ImportError as _error:  # pragma: no cover - exercised only without python-ace
    raise ImportError(
        "mlipuq.backends.pace_calculator needs python-ace: pip install 'mlipuq[pace]'"
    ) from _error


class PaceUQCalculator(UncertaintyResults, PyACECalculator):
    """pacemaker's ASE calculator that adds per-atom uncertainty from the same evaluation.

    Parameters
    ----------
    basis_set : path-like or BBasisConfiguration
        A pacemaker B-basis potential (``.yaml``).
    n_features : int
        Width of the descriptor rows the estimators were fitted on
        (``PaceBackend.n_features``: per-element projections zero-padded to it).
    estimators : dict of str -> UQMethod, optional
        Fitted methods that need only one model's outputs.
    keep_descriptors : bool
        Also store ``results["descriptors"]`` (n_atoms, n_features) float64.
    store_arrays : bool
        Also copy the per-atom uncertainty arrays into ``atoms.arrays``.
    **kwargs
        Passed to ``PyACECalculator`` (e.g. ``fast_nl``, ``gamma_upper_bound``).
    """

    def __init__(
        self,
        basis_set: Any,
        *,
        n_features: int,
        estimators: dict[str, Any] | None = None,
        keep_descriptors: bool = False,
        store_arrays: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(basis_set, str) and hasattr(basis_set, "__fspath__"):
            basis_set = str(basis_set)
        super().__init__(basis_set, **kwargs)
        self.n_features = int(n_features)
        self.init_uncertainty(estimators, keep_descriptors=keep_descriptors,
                              store_arrays=store_arrays)

    def calculate(self, atoms=None, properties=("energy", "forces", "stress", "energies"),
                  system_changes=None) -> None:
        """pacemaker's evaluation (projections included) plus the uncertainty keys."""
        from ase.calculators.calculator import all_changes

        self.compute_projections = True
        changes = all_changes if system_changes is None else system_changes
        super().calculate(atoms, properties, changes)
        if self.wants_descriptors:
            self.add_uncertainty(self.atoms.numbers, self.padded_projections())
        self.copy_uncertainty_arrays(atoms)

    #: The extrapolation grade of a B-projection row against an ill-conditioned active
    #: set loses ~1 % in float32 (gamma 334 off by 1.5 on a vacancy frame), so the
    #: methods see the float64 projections and pacemaker's own gamma is reproduced.
    descriptor_dtype = np.float64

    def padded_projections(self) -> np.ndarray:
        """This evaluation's linear B-projections, (n_atoms, n_features) float64."""
        rows = self.projections
        n_atoms = len(self.atoms)
        if isinstance(rows, np.ndarray) and rows.shape == (n_atoms, self.n_features):
            return np.asarray(rows, dtype=np.float64)
        out = np.zeros((n_atoms, self.n_features))
        for atom, row in enumerate(list(rows)[:n_atoms]):
            row = np.asarray(row, dtype=np.float64).reshape(-1)
            out[atom, : row.size] = row
        return out
