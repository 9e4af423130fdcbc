"""The calibration protocol of an evaluation: fit on a held-out in-domain part, judge
on the rest.

A seeded fraction of the configurations of one in-domain set is used only to
calibrate the methods (:meth:`~mlipuq.method.UQMethod.calibrate`: flag thresholds at
an in-domain false-positive rate; methods with ``calibrates = True`` also refit their
predictions, e.g. LTAU's scale factor) and to fit every result's threshold; every
metric is computed on the other configurations.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import numpy as np

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod, fpr_threshold_of
from mlipuq.result import UQResult
from mlipuq.run_methods import CALIBRATED_SUFFIX, DEFAULT_FPR


def for_evaluation(
    methods: Mapping[str, UQMethod],
    calibration: ModelOutputs | None,
    force_errors: np.ndarray | None,
    *,
    fpr: float = DEFAULT_FPR,
    source: str = "the calibration configurations",
) -> dict[str, UQMethod]:
    """The methods to evaluate, by result name.

    A method whose calibration changes its predictions (``calibrates``) appears twice:
    as it is before calibration (``name``) and calibrated on ``calibration``
    (``name + "_calibrated"``); the saved method is never changed.

    Parameters
    ----------
    methods : dict of str -> UQMethod
    calibration : ModelOutputs or None
        Held-out in-domain configurations (None: no calibration).
    force_errors : ndarray, shape (N_cal,), or None
        |F_ref - F_pred| of their atoms in eV/Å (NaN where no reference).
    fpr : float
        In-domain false-positive rate of the calibrated thresholds.
    """
    out: dict[str, UQMethod] = {}
    for name, method in methods.items():
        if not method.calibrates:
            out[name] = method
            continue
        out[name] = method.uncalibrated()
        if calibration is None:
            continue
        rows = np.isfinite(force_errors) if force_errors is not None else None
        if rows is None or not rows.any():
            raise InputError("--calibrate-on: the calibration configurations have no "
                             f"reference forces ({name} is calibrated on force errors)")
        configs = np.zeros(calibration.n_configs, bool)
        configs[np.unique(calibration.config_index[rows])] = True
        part = calibration.subset(configs) if not configs.all() else calibration
        part_errors = force_errors[configs[calibration.config_index]]
        calibrated = copy.copy(out[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            calibrated.calibrate(part, part_errors, fpr=fpr, source=source)
        out[name + CALIBRATED_SUFFIX] = calibrated
    return out


def fit_thresholds(results: Mapping[str, UQResult], fpr: float = DEFAULT_FPR) -> dict[str, float]:
    """Per result: the threshold flagging a share ``fpr`` of in-domain configurations.

    ``results`` are predictions on held-out in-domain configurations (the calibration
    part); the threshold is the (1 - ``fpr``) quantile of each result's configuration
    uncertainty (:func:`mlipuq.method.fpr_threshold_of`).
    """
    out = {}
    for name, result in results.items():
        try:
            out[name] = fpr_threshold_of(result, fpr)
        except InputError:
            continue
    return out


def ece_by_set(
    p_before: np.ndarray, p_after: np.ndarray, errors: np.ndarray, atom_groups: np.ndarray,
    atol: float, atol_after: float | None = None,
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """ECE of p before (at ``atol``) and after calibration (at ``atol_after``, default
    ``atol``) on each set's atoms with forces."""
    from mlipuq import metrics

    atol_after = atol if atol_after is None else atol_after
    before, after = {}, {}
    for name in dict.fromkeys(atom_groups.tolist()):
        idx = np.flatnonzero((atom_groups == name) & np.isfinite(errors))
        if not len(idx):
            before[name] = after[name] = None
            continue
        before[name] = float(metrics.ece(p_before[idx], errors[idx], atol))
        after[name] = float(metrics.ece(p_after[idx], errors[idx], atol_after))
    return before, after


def calibration_summaries(
    methods: Mapping[str, UQMethod],
    results: Mapping[str, UQResult],
    force_errors: np.ndarray,
    atom_groups: np.ndarray,
    *,
    calibration_set: str,
    fraction: float,
    seed: int,
) -> dict[str, dict]:
    """Per calibrated method: what calibration fitted (its ``calibration_``) and the ECE
    of its p before and after on each held-out set (methods whose results carry a
    probability ``extras["p"]`` and whose ``calibration_`` names ``atol``)."""
    out = {}
    for name, method in methods.items():
        if not name.endswith(CALIBRATED_SUFFIX):
            continue
        base = name[: -len(CALIBRATED_SUFFIX)]
        fitted = dict(getattr(method, "calibration_", None) or {})
        fitted.update({"method": base, "calibration_set": calibration_set,
                       "fraction": float(fraction), "seed": int(seed)})
        p_before = results.get(base, None)
        p_after = results.get(name, None)
        if (p_before is not None and p_after is not None and "p" in p_before.extras
                and "p" in p_after.extras and p_before.atol is not None
                and p_after.atol is not None):
            before, after = ece_by_set(p_before.extras["p"], p_after.extras["p"],
                                       force_errors, atom_groups, float(p_before.atol),
                                       float(p_after.atol))
            fitted.update({"ece_before_calibration_atoms": fitted.get("ece_before"),
                           "ece_after_calibration_atoms": fitted.get("ece_after"),
                           "ece_before": before, "ece_after": after})
        out[base] = fitted
    return out
