"""One small result type shared by every uncertainty method.

Every estimator's ``predict`` returns a :class:`UQResult`, so evaluation, the ASE
calculator, the report and the CLI never special-case a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class UQResult:
    """Per-atom and per-configuration uncertainty from one method.

    Convention: larger ``atom_uncertainty`` / ``config_uncertainty`` means *less*
    trusted. The meaning and unit are given by ``method`` and ``unit``.

    Attributes
    ----------
    method : str
        ``"ltau"``, ``"ensemble"``, ``"doptimality"``, ``"clustered_doptimality"``.
    atom_uncertainty : ndarray of float, shape (N,)
        LTAU: 1 - p_j (unitless); ensemble: U_F,atom (eV/Å); D-optimality: gamma.
    config_uncertainty : ndarray of float, shape (C,) or None
        Per-configuration aggregate (max over atoms for D-optimality and ensemble
        forces, U_E,cfg for ensemble energies, ...). None if no configuration
        index was given.
    config_index : ndarray of int, shape (N,) or None
        Configuration of each atom (0-based), when known.
    atom_flags, config_flags : ndarray of bool, shapes (N,) and (C,), or None
        True where the uncertainty exceeds ``threshold``.
    threshold : float or None
        Threshold used for the flags, in the unit of ``atom_uncertainty``; the
        configuration flags compare ``config_uncertainty`` with it.
    config_aggregate : {"max", "mean"}
        How ``config_uncertainty`` is formed from the atoms' uncertainties (LTAU: the
        mean of 1 - p, the expected share of atoms above atol; the others: the max).
    unit : str
        Unit of ``atom_uncertainty`` (``""`` for unitless).
    bounds : (float or None, float or None)
        Range of ``atom_uncertainty`` (None: unbounded), e.g. (0, 1) for LTAU's 1 - p.
        Larger values are always less trusted.
    atol : float or None
        Tolerance in eV/Å at which ``extras["p"]`` is the probability that the force
        error is at most atol (None: no probability, or the evaluation's atol).
    extras : dict of str -> ndarray
        Method-specific per-atom (N,) or per-configuration (C,) arrays, e.g.
        ``"p"``, ``"expected_error"``, ``"knn_distance"``, ``"gamma"``,
        ``"energy_uncertainty"``. Keys starting with ``config_`` are per
        configuration.
    """

    method: str
    atom_uncertainty: np.ndarray
    config_uncertainty: np.ndarray | None = None
    config_index: np.ndarray | None = None
    atom_flags: np.ndarray | None = None
    config_flags: np.ndarray | None = None
    threshold: float | None = None
    unit: str = ""
    config_aggregate: str = "max"
    bounds: tuple[float | None, float | None] = (0.0, None)
    atol: float | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        """Number of atoms N."""
        return len(self.atom_uncertainty)

    def as_arrays(self, prefix: str | None = None) -> dict[str, np.ndarray]:
        """Per-atom arrays keyed ``{prefix}_{name}`` (prefix defaults to ``method``).

        Suitable for ``atoms.arrays`` / extxyz / npz.
        """
        prefix = self.method if prefix is None else prefix
        arrays = {f"{prefix}_uncertainty": np.asarray(self.atom_uncertainty)}
        if self.atom_flags is not None:
            arrays[f"{prefix}_flag"] = np.asarray(self.atom_flags)
        for name, values in self.extras.items():
            if not name.startswith("config_") and len(values) == self.n_atoms:
                arrays[f"{prefix}_{name}"] = np.asarray(values)
        return arrays
