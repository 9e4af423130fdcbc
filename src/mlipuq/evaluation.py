"""Evaluate several UQ methods on one test set: a JSON-serialisable metrics dict.

Backend-free: it takes :class:`~mlipuq.result.UQResult` objects and true errors
(arrays), not models. One public function, :func:`evaluate`, built from the
pure functions of :mod:`mlipuq.metrics` (docs/methods.md).

Test sets without reference forces (e.g. acac ``test_H_transfer``, energies
only) are supported: give ``force_errors`` as NaN for their atoms (or None for
the whole set). Atom-level metrics and the calibration curve then use only the
atoms with finite force errors, and those configurations are evaluated at the
configuration level on the energy error. The configuration uncertainty used for
that is ``result.extras["config_energy_uncertainty"]`` when the method provides
one (ensembles: U_E,cfg), else ``result.config_uncertainty``, else the
aggregate (``config_aggregate``: "max" by default, or "mean") of the per-atom
uncertainty (for LTAU, max or mean of 1 - p over the atoms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mlipuq import metrics
from mlipuq.exceptions import InputError
from mlipuq.result import UQResult
from mlipuq.validation import check_array

__all__ = ["evaluate"]

#: Group name used for the whole test set.
ALL = "all"


def evaluate(
    results: Mapping[str, UQResult],
    *,
    config_index: np.ndarray,
    force_errors: np.ndarray | None = None,
    energy_errors: np.ndarray | None = None,
    groups: Sequence | np.ndarray | None = None,
    thresholds: Mapping[str, float] | None = None,
    atol: float | None = None,
    scale: float | np.ndarray = 1.0,
    is_ood: np.ndarray | None = None,
    timings: Mapping[str, float] | None = None,
    forward_seconds_per_atom: float | None = None,
    config_aggregate: str = "max",
    n_bins: int = 10,
) -> dict:
    """Metrics per method, for the whole test set and per group.

    Parameters
    ----------
    results : dict of str -> UQResult
        One result per method name, each over the same N test atoms.
    config_index : ndarray of int, shape (N,)
        Configuration of each atom (0-based); C = ``config_index.max() + 1``.
    force_errors : ndarray, shape (N,), optional
        True force-error norms |F_ref - F_pred| in eV/Å; NaN where a
        configuration has no reference forces.
    energy_errors : ndarray, shape (C,), optional
        True energy errors in eV (absolute value is taken; NaN = unknown).
    groups : array-like of labels, shape (C,), optional
        Group per configuration (e.g. test-set name or ``config_type``).
    thresholds : dict of str -> float, optional
        Per-method threshold overriding the result's own flags; flags are then
        ``uncertainty > threshold`` at configuration level, and at atom level for
        methods whose configuration uncertainty is the max over atoms
        (``UQResult.config_aggregate == "max"``; LTAU's is the mean, so its atom
        detection rate is None under a configuration threshold).
    atol : float, optional
        LTAU tolerance in eV/Å; with it, methods whose ``extras`` hold ``"p"``
        get a calibration curve and ECE at threshold ``atol * scale``.
    scale : float or ndarray of shape (N,)
        LTAU scale factor s (per atom when an array) in the paper's convention:
        p computed at atol, observed threshold atol * s. Leave at 1 when the
        result's p already folds s in (see :mod:`mlipuq.calibration`).
    is_ood : ndarray of bool, shape (C,), optional
        Out-of-domain label per configuration, for ROC-AUC and TPR/FPR. A group that
        is entirely out of domain is scored against all in-domain configurations
        (ROC-AUC, TPR, FPR of that pairing); an in-domain group gets its FPR.
    timings : dict of str -> float, optional
        Seconds per atom of each method's UQ step.
    forward_seconds_per_atom : float, optional
        Seconds per atom of one model forward pass (for the relative cost).
    config_aggregate : {"max", "mean"}
        How per-atom uncertainty is aggregated when a result has no
        ``config_uncertainty``.
    n_bins : int
        Bins of the calibration curves.

    Returns
    -------
    dict
        ``{"n_atoms", "n_configs", "groups": {label: {"n_atoms", "n_configs"}},
        "atol", "methods": {name: {"unit", "threshold", "cost": {...},
        "metrics": {"all": {...}, label: {...}}}}}``. Each metrics entry holds
        ``spearman_atom``, ``spearman_config_force``, ``spearman_config_energy``,
        ``detection_rate_atom``, ``detection_rate_config``, ``roc_auc``,
        ``tpr``, ``fpr``, ``in_domain``, ``ece``, ``calibration_curve``, ``sharpness``,
        ``cv_uncertainty``, ``mean_uncertainty``, ``n_atoms``, ``n_configs``.
        Values that cannot be computed (no forces, single class, constant
        input) are ``None``; the dict contains only JSON types.
    """
    if not results:
        raise InputError("results: no UQ results given")
    data = _TestSet.build(config_index, force_errors, energy_errors, groups, is_ood, atol, scale)
    out: dict = {
        "n_atoms": data.n_atoms,
        "n_configs": data.n_configs,
        "atol": None if atol is None else float(atol),
        "groups": {
            label: {"n_atoms": int(np.sum(am)), "n_configs": int(np.sum(cm))}
            for label, (am, cm) in data.subsets().items()
        },
        "methods": {},
    }
    thresholds = dict(thresholds or {})
    timings = dict(timings or {})
    for name, result in results.items():
        method = _MethodArrays.build(name, result, data, thresholds.get(name), config_aggregate)
        out["methods"][name] = {
            "method": result.method,
            "unit": result.unit,
            "threshold": method.threshold,
            "cost": _cost(timings.get(name), forward_seconds_per_atom),
            "metrics": {
                label: _subset_metrics(method, data, am, cm, n_bins)
                for label, (am, cm) in data.subsets().items()
            },
        }
    return _jsonable(out)


class _TestSet:
    """Validated per-atom / per-configuration arrays of the test set."""

    def __init__(self, **arrays: object) -> None:
        self.__dict__.update(arrays)

    @classmethod
    def build(cls, config_index, force_errors, energy_errors, groups, is_ood, atol, scale):
        config_index = check_array(config_index, "config_index", ndim=1, dtype=None)
        if not np.issubdtype(config_index.dtype, np.integer) or config_index.min() < 0:
            raise InputError("config_index: expected non-negative integers")
        n_atoms = len(config_index)
        n_configs = int(config_index.max()) + 1
        if force_errors is None:
            force_errors = np.full(n_atoms, np.nan)
        force_errors = check_array(force_errors, "force_errors", ndim=1, finite=False)
        _same(len(force_errors), n_atoms, "force_errors", "atoms")
        energy_errors = (
            np.full(n_configs, np.nan)
            if energy_errors is None
            else np.abs(check_array(energy_errors, "energy_errors", ndim=1, finite=False))
        )
        _same(len(energy_errors), n_configs, "energy_errors", "configurations")
        groups = np.full(n_configs, ALL) if groups is None else np.asarray(groups).astype(str)
        _same(len(groups), n_configs, "groups", "configurations")
        if is_ood is not None:
            is_ood = np.asarray(is_ood)
            if is_ood.dtype != bool:
                raise InputError(f"is_ood: expected booleans, got dtype {is_ood.dtype}")
            _same(len(is_ood), n_configs, "is_ood", "configurations")
        if atol is not None and not (np.isfinite(atol) and atol > 0):
            raise InputError(f"atol: expected a positive tolerance in eV/Å, got {atol!r}")
        scale = check_array(scale, "scale", ndim=(0, 1))
        if scale.ndim == 1:
            _same(len(scale), n_atoms, "scale", "atoms")
        with np.errstate(invalid="ignore"):
            config_force = metrics.config_aggregate(force_errors, config_index, how="max")
        return cls(
            config_index=config_index.astype(np.int64),
            n_atoms=n_atoms,
            n_configs=n_configs,
            force_errors=force_errors,
            config_force_errors=config_force,
            energy_errors=energy_errors,
            groups=groups,
            is_ood=is_ood,
            atol=atol,
            scale=scale,
        )

    def subsets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(atom mask (N,), configuration mask (C,)) for "all" and every group."""
        out = {ALL: (np.ones(self.n_atoms, bool), np.ones(self.n_configs, bool))}
        labels = np.unique(self.groups)
        if not (len(labels) == 1 and labels[0] == ALL):
            for label in labels:
                cmask = self.groups == label
                out[str(label)] = (cmask[self.config_index], cmask)
        return out


def _same(got: int, expected: int, name: str, what: str) -> None:
    if got != expected:
        raise InputError(f"{name}: expected one value per {what[:-1]} ({expected}), got {got}")


class _MethodArrays:
    """One method's per-atom and per-configuration uncertainty and flags."""

    def __init__(self, **arrays: object) -> None:
        self.__dict__.update(arrays)

    @classmethod
    def build(cls, name, result, data, threshold_override, how):
        atom_u = check_array(result.atom_uncertainty, f"{name}.atom_uncertainty", ndim=1)
        _same(len(atom_u), data.n_atoms, f"{name}.atom_uncertainty", "atoms")
        config_u = result.config_uncertainty
        if config_u is None:
            config_u = metrics.config_aggregate(atom_u, data.config_index, how=how)
        config_u = check_array(config_u, f"{name}.config_uncertainty", ndim=1, finite=False)
        _same(len(config_u), data.n_configs, f"{name}.config_uncertainty", "configurations")
        energy_u = np.asarray(result.extras.get("config_energy_uncertainty", config_u), float)
        _same(len(energy_u), data.n_configs, f"{name}.config_energy_uncertainty", "configurations")
        threshold = result.threshold if threshold_override is None else threshold_override
        atom_flags, config_flags = result.atom_flags, result.config_flags
        # a threshold on the mean over a configuration's atoms says nothing about one atom
        per_atom = result.config_aggregate == "max"
        if threshold_override is not None:
            atom_flags = atom_u > threshold if per_atom else None
        elif atom_flags is None and threshold is not None and per_atom:
            atom_flags = atom_u > threshold
        if threshold_override is not None or (config_flags is None and threshold is not None):
            config_flags = config_u > threshold
        p = result.extras.get("p")
        if p is not None:
            p = check_array(p, f"{name}.extras['p']", ndim=1)
            _same(len(p), data.n_atoms, f"{name}.extras['p']", "atoms")
        return cls(
            atom_u=atom_u,
            config_u=config_u,
            energy_u=energy_u,
            atom_flags=None if atom_flags is None else np.asarray(atom_flags, bool),
            config_flags=None if config_flags is None else np.asarray(config_flags, bool),
            threshold=None if threshold is None else float(threshold),
            p=p,
            atol=result.atol,
        )


def _finite_spearman(u: np.ndarray, e: np.ndarray) -> float | None:
    keep = np.isfinite(u) & np.isfinite(e)
    return metrics.spearman(u[keep], e[keep]) if np.sum(keep) >= 2 else None


def _rate(flags: np.ndarray | None, mask: np.ndarray) -> float | None:
    if flags is None or not np.any(mask):
        return None
    return float(np.mean(flags[mask]))


def _subset_metrics(
    m: _MethodArrays, data: _TestSet, am: np.ndarray, cm: np.ndarray, n_bins: int
) -> dict:
    out: dict = {
        "n_atoms": int(np.sum(am)),
        "n_configs": int(np.sum(cm)),
        "mean_uncertainty": float(np.mean(m.atom_u[am])) if np.any(am) else None,
        "spearman_atom": _finite_spearman(m.atom_u[am], data.force_errors[am]),
        "spearman_config_force": _finite_spearman(m.config_u[cm], data.config_force_errors[cm]),
        "spearman_config_energy": _finite_spearman(m.energy_u[cm], data.energy_errors[cm]),
        "detection_rate_atom": _rate(m.atom_flags, am),
        "detection_rate_config": _rate(m.config_flags, cm),
        "cv_uncertainty": (metrics.coefficient_of_variation(m.atom_u[am]) if np.any(am) else None),
    }
    out.update(_ood_metrics(m, data, cm))
    out.update(_calibration_metrics(m, data, am, n_bins))
    return out


def _ood_metrics(m: _MethodArrays, data: _TestSet, cm: np.ndarray) -> dict:
    """ROC-AUC, TPR and FPR of a subset of configurations.

    A subset that mixes in-domain and out-of-domain configurations (``"all"``) is
    scored as it is. A subset that is all out of domain (one out-of-domain set) is
    scored against every in-domain configuration; a subset that is all in domain
    gets its false-positive rate only.
    """
    none = {"roc_auc": None, "tpr": None, "fpr": None, "in_domain": None}
    if data.is_ood is None or not np.any(cm):
        return none
    ood = data.is_ood
    if not ood[cm].any():  # an in-domain subset: how often it is flagged
        fpr = None if m.config_flags is None else float(np.mean(m.config_flags[cm]))
        return {"roc_auc": None, "tpr": None, "fpr": fpr, "in_domain": True}
    mask = cm | ~ood if ood[cm].all() else cm
    labels = ood[mask]
    scores = m.config_u[mask]
    out = {"roc_auc": None, "tpr": None, "fpr": None, "in_domain": False}
    if labels.all() or not np.all(np.isfinite(scores)):
        return out  # no in-domain configuration to compare with
    out["roc_auc"] = metrics.roc_auc(scores, labels)
    if m.config_flags is not None:
        flags = m.config_flags[mask]
        out["tpr"] = float(np.mean(flags[labels]))
        out["fpr"] = float(np.mean(flags[~labels]))
    return out


def _calibration_metrics(m: _MethodArrays, data: _TestSet, am: np.ndarray, n_bins: int) -> dict:
    out = {"ece": None, "calibration_curve": None, "sharpness": None}
    if m.p is None or not np.any(am):
        return out
    out["sharpness"] = metrics.sharpness(m.p[am])
    keep = am & np.isfinite(data.force_errors)
    atol = m.atol if m.atol is not None else data.atol
    if atol is None or not np.any(keep):
        return out
    threshold = atol * (data.scale[keep] if data.scale.ndim else float(data.scale))
    curve = metrics.calibration_curve(m.p[keep], data.force_errors[keep], threshold, n_bins=n_bins)
    out["ece"] = metrics.expected_calibration_error(curve)
    out["calibration_curve"] = curve.as_dict()
    return out


def _cost(seconds_per_atom: float | None, forward: float | None) -> dict:
    if seconds_per_atom is None:
        return {"seconds_per_atom": None, "relative_to_forward": None}
    relative = None if forward is None else metrics.relative_cost(seconds_per_atom, forward)
    return {"seconds_per_atom": float(seconds_per_atom), "relative_to_forward": relative}


def _jsonable(value: object) -> object:
    """Plain Python types only; NaN and inf become None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
