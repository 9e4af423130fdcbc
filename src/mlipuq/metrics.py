"""Evaluation metrics for uncertainty estimates, as pure functions.

Every function takes arrays and returns a number (or a small frozen record):
no state, no plotting (uncertainty-toolbox style). The report layer consumes
these numbers. Conventions:

- ``uncertainty``: larger means less trusted (any unit: LTAU 1 - p is
  unitless, ensemble U_F in eV/Å, D-optimality gamma is unitless).
- ``error``: true error, e.g. a force-error norm |F_ref - F_pred| in eV/Å or an
  absolute energy error in eV.
- ``p``: a predicted probability that the error is at most a threshold (LTAU).

Inputs are validated once here and every user mistake raises
:class:`~mlipuq.exceptions.InputError` (empty arrays, mismatched lengths, NaN,
a single class for ROC-AUC).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.validation import check_array, check_config_index, check_consistent_length

__all__ = [
    "CalibrationCurve",
    "calibration_curve",
    "coefficient_of_variation",
    "config_aggregate",
    "config_spearman",
    "cost_per_atom",
    "detection_rate",
    "detection_rates_by_group",
    "ece",
    "expected_calibration_error",
    "relative_cost",
    "roc_auc",
    "sharpness",
    "spearman",
    "tpr_fpr",
]


#: Rounding allowed outside [0, 1] in predicted probabilities (sums of float32
#: histogram masses can reach 1 + 1e-7); such values are clipped.
P_TOLERANCE = 1e-6


def _pair(a: object, b: object, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate two 1-d finite float arrays of equal, non-zero length."""
    a = check_array(a, name_a, ndim=1)
    b = check_array(b, name_b, ndim=1)
    check_consistent_length(**{name_a: a, name_b: b})
    return a, b


# ---------------------------------------------------------------------------
# Ranking: Spearman correlation
# ---------------------------------------------------------------------------


def spearman(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation between uncertainty and true error.

    Parameters
    ----------
    uncertainty : ndarray, shape (n,)
        Uncertainty per atom (or per configuration), any unit.
    error : ndarray, shape (n,)
        True error per atom (eV/Å) or per configuration (eV), same order.

    Returns
    -------
    float
        rho in [-1, 1]. ``nan`` when fewer than 2 values are given or when either
        input is constant: ranks are then undefined (every value ties), so no
        correlation can be measured. This is not an error, because a constant
        uncertainty is a legitimate (uninformative) output of a method.

    Examples
    --------
    >>> spearman(np.array([0.1, 0.2, 0.3]), np.array([1.0, 3.0, 2.0]))
    0.5
    """
    from scipy.stats import spearmanr

    uncertainty, error = _pair(uncertainty, error, "uncertainty", "error")
    if len(uncertainty) < 2 or np.ptp(uncertainty) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(uncertainty, error).statistic)


def config_aggregate(
    per_atom: np.ndarray, config_index: np.ndarray, *, how: str = "max"
) -> np.ndarray:
    """Aggregate a per-atom quantity per configuration.

    Parameters
    ----------
    per_atom : ndarray, shape (N,)
    config_index : ndarray of int, shape (N,)
        0-based configuration of each atom; configurations are
        ``0 .. config_index.max()``.
    how : {"max", "mean"}
        Aggregate (max over atoms is the uq-ace paper's e_F,cfg and U_F,cfg).

    Returns
    -------
    ndarray, shape (C,)
        ``nan`` for configurations without atoms.
    """
    per_atom = check_array(per_atom, "per_atom", ndim=1, finite=False)
    config_index = check_config_index(config_index, len(per_atom))
    n_configs = int(config_index.max()) + 1
    counts = np.bincount(config_index, minlength=n_configs)
    if how == "max":
        out = np.full(n_configs, -np.inf)
        np.maximum.at(out, config_index, per_atom)
    elif how == "mean":
        sums = np.bincount(config_index, weights=per_atom, minlength=n_configs)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = sums / counts
    else:
        raise InputError(f"how: expected 'max' or 'mean', got {how!r}")
    out[counts == 0] = np.nan
    return out


def config_spearman(
    uncertainty: np.ndarray,
    error: np.ndarray,
    config_index: np.ndarray,
    *,
    aggregate: str = "max",
) -> float:
    """Spearman correlation at configuration level from per-atom arrays.

    Both inputs are aggregated per configuration with ``aggregate`` ("max": the
    uq-ace paper's U_F,cfg and e_F,cfg) and then ranked with :func:`spearman`.
    For per-configuration arrays you already have, call :func:`spearman`.

    Parameters
    ----------
    uncertainty : ndarray, shape (N,)
        Per-atom uncertainty.
    error : ndarray, shape (N,)
        Per-atom true error (eV/Å).
    config_index : ndarray of int, shape (N,)
        Configuration of each atom (0-based); configurations without atoms are
        ignored.
    aggregate : {"max", "mean"}

    Returns
    -------
    float
        rho over configurations (``nan`` if constant, see :func:`spearman`).
    """
    uncertainty, error = _pair(uncertainty, error, "uncertainty", "error")
    u_cfg = config_aggregate(uncertainty, config_index, how=aggregate)
    e_cfg = config_aggregate(error, config_index, how=aggregate)
    present = np.isfinite(u_cfg)
    return spearman(u_cfg[present], e_cfg[present])


# ---------------------------------------------------------------------------
# Calibration of probability outputs (LTAU p)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationCurve:
    """Reliability diagram of a predicted probability p = P(error <= threshold).

    Attributes
    ----------
    bin_edges : ndarray, shape (n_bins + 1,)
        Edges in p (0..1 for the uniform strategy).
    predicted : ndarray, shape (n_bins,)
        Mean predicted p of the atoms in each bin (``nan`` for empty bins).
    observed : ndarray, shape (n_bins,)
        Fraction of those atoms whose true error is <= their threshold
        (``nan`` for empty bins).
    counts : ndarray of int, shape (n_bins,)
        Number of atoms per bin.
    """

    bin_edges: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray

    def as_dict(self) -> dict[str, list]:
        """JSON-friendly lists (``nan`` becomes ``None``)."""
        return {
            "bin_edges": _to_list(self.bin_edges),
            "predicted": _to_list(self.predicted),
            "observed": _to_list(self.observed),
            "counts": [int(c) for c in self.counts],
        }


def _to_list(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=float)]


def _bin_edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
        if len(edges) == 1:  # all p equal: one bin holding everything
            edges = np.array([edges[0], edges[0]])
        return edges
    raise InputError(f"strategy: expected 'uniform' or 'quantile', got {strategy!r}")


def calibration_curve(
    p_pred: np.ndarray,
    errors: np.ndarray,
    threshold: float | np.ndarray,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
) -> CalibrationCurve:
    """Bin atoms by predicted p and measure the observed fraction within threshold.

    A calibrated p lies on y = x: among atoms with p ~ 0.7, 70 % have an error
    at most ``threshold`` (LTAU: threshold = atol * s, docs/methods.md).

    Parameters
    ----------
    p_pred : ndarray, shape (n,)
        Predicted probability in [0, 1] that the error is <= threshold.
    errors : ndarray, shape (n,)
        True errors (e.g. force-error norms, eV/Å), non-negative.
    threshold : float or ndarray of shape (n,)
        Error threshold in the unit of ``errors`` (per atom when an array).
    n_bins : int
        Number of bins.
    strategy : {"uniform", "quantile"}
        ``"uniform"``: equal-width bins on [0, 1] (p = 1 falls in the last bin);
        ``"quantile"``: edges at quantiles of ``p_pred`` (duplicate edges merged,
        so there may be fewer bins).

    Returns
    -------
    CalibrationCurve

    Examples
    --------
    >>> c = calibration_curve([0.1, 0.2, 0.9, 0.8], [0.5, 2.0, 0.5, 0.5], 1.0, n_bins=2)
    >>> c.predicted.tolist(), c.observed.tolist(), c.counts.tolist()
    ([0.15000000000000002, 0.8500000000000001], [0.5, 1.0], [2, 2])
    """
    p_pred, errors = _pair(p_pred, errors, "p_pred", "errors")
    if p_pred.min() < -P_TOLERANCE or p_pred.max() > 1.0 + P_TOLERANCE:
        raise InputError(
            f"p_pred: expected probabilities in [0, 1], got range "
            f"[{p_pred.min():.6g}, {p_pred.max():.6g}]"
        )
    p_pred = np.clip(p_pred, 0.0, 1.0)
    threshold = _check_threshold(threshold, len(errors))
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise InputError(f"n_bins: expected a positive integer, got {n_bins!r}")
    edges = _bin_edges(p_pred, int(n_bins), strategy)
    n = len(edges) - 1
    # Right-open bins except the last, which includes its right edge. Uniform bins
    # use floor(p * n_bins) rounded to 9 decimals, so p = 0.7 lands in [0.7, 0.8)
    # despite floating-point noise in the edges.
    if strategy == "uniform":
        which = np.floor(np.round(p_pred * n, 9)).astype(np.int64)
    else:
        which = np.searchsorted(edges, p_pred, side="right") - 1
    which = np.clip(which, 0, n - 1)
    hit = (errors <= threshold).astype(float)
    counts = np.bincount(which, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(which, weights=p_pred, minlength=n) / counts
        observed = np.bincount(which, weights=hit, minlength=n) / counts
    return CalibrationCurve(edges, predicted, observed, counts.astype(np.int64))


def _check_threshold(threshold: float | np.ndarray, n: int) -> float | np.ndarray:
    array = check_array(threshold, "threshold", ndim=(0, 1))
    if array.ndim == 1 and len(array) != n:
        raise InputError(f"inconsistent numbers of atoms: errors={n}, threshold={len(array)}")
    if np.any(array <= 0):
        raise InputError(f"threshold: expected positive values, got min {array.min():.6g}")
    return float(array) if array.ndim == 0 else array


def expected_calibration_error(curve: CalibrationCurve) -> float:
    """Count-weighted mean |observed - predicted| over the non-empty bins.

    ECE = sum_b n_b |obs_b - pred_b| / sum_b n_b, in units of probability
    (0 = perfectly calibrated, 1 = worst).

    Examples
    --------
    >>> c = calibration_curve([0.1, 0.2, 0.9, 0.8], [0.5, 2.0, 0.5, 0.5], 1.0, n_bins=2)
    >>> round(expected_calibration_error(c), 6)
    0.25
    """
    keep = curve.counts > 0
    if not np.any(keep):
        raise InputError("calibration curve: every bin is empty")
    gaps = np.abs(curve.observed[keep] - curve.predicted[keep])
    return float(np.sum(curve.counts[keep] * gaps) / np.sum(curve.counts[keep]))


def ece(
    p_pred: np.ndarray,
    errors: np.ndarray,
    threshold: float | np.ndarray,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
) -> float:
    """Expected calibration error of ``p_pred`` (see :func:`calibration_curve`)."""
    curve = calibration_curve(p_pred, errors, threshold, n_bins=n_bins, strategy=strategy)
    return expected_calibration_error(curve)


# ---------------------------------------------------------------------------
# Sharpness / dispersion
# ---------------------------------------------------------------------------


def sharpness(p_pred: np.ndarray) -> float:
    """Dispersion of a predicted probability: population std of p (ddof=0).

    0 means every atom gets the same p (uninformative); the maximum 0.5 is
    reached when p is split between 0 and 1.

    Examples
    --------
    >>> sharpness(np.array([0.0, 1.0]))
    0.5
    """
    p_pred = check_array(p_pred, "p_pred", ndim=1)
    return float(np.std(p_pred))


def coefficient_of_variation(uncertainty: np.ndarray) -> float:
    """Dispersion of a non-negative uncertainty: std / mean (ddof=0, unitless).

    Returns ``nan`` when the mean is 0 (all uncertainties zero: no spread to
    measure relative to).

    Examples
    --------
    >>> coefficient_of_variation(np.array([1.0, 3.0]))
    0.5
    """
    uncertainty = check_array(uncertainty, "uncertainty", ndim=1)
    mean = float(np.mean(uncertainty))
    if mean == 0.0:
        return float("nan")
    return float(np.std(uncertainty) / mean)


# ---------------------------------------------------------------------------
# Detection (flagging) and OOD classification
# ---------------------------------------------------------------------------


def detection_rate(uncertainty: np.ndarray, threshold: float) -> float:
    """Fraction of entries flagged, i.e. with uncertainty strictly above threshold.

    Parameters
    ----------
    uncertainty : ndarray, shape (n,)
        Per-atom or per-configuration uncertainty.
    threshold : float
        In the unit of ``uncertainty`` (same rule as ``UQResult`` flags: > threshold).

    Examples
    --------
    >>> detection_rate(np.array([0.5, 1.0, 1.5, 2.0]), 1.0)
    0.5
    """
    uncertainty = check_array(uncertainty, "uncertainty", ndim=1)
    threshold = float(check_array(threshold, "threshold", ndim=0))
    return float(np.mean(uncertainty > threshold))


def detection_rates_by_group(
    uncertainty: np.ndarray, threshold: float, groups: Sequence | np.ndarray
) -> dict[str, float]:
    """:func:`detection_rate` within each group label.

    Parameters
    ----------
    uncertainty : ndarray, shape (n,)
    threshold : float
    groups : array-like of labels, shape (n,)
        Group of each entry (e.g. ``config_type``); labels are turned into str.

    Returns
    -------
    dict of str -> float
        Keys in sorted order of the labels.
    """
    uncertainty = check_array(uncertainty, "uncertainty", ndim=1)
    groups = _check_groups(groups, len(uncertainty))
    return {str(g): detection_rate(uncertainty[groups == g], threshold) for g in np.unique(groups)}


def _check_groups(groups: Sequence | np.ndarray, n: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise InputError(f"groups: expected a 1-d array of labels, got shape {groups.shape}")
    if len(groups) != n:
        raise InputError(f"inconsistent numbers of entries: values={n}, groups={len(groups)}")
    return groups.astype(str)


def _check_labels(scores: object, is_ood: object) -> tuple[np.ndarray, np.ndarray]:
    scores = check_array(scores, "scores", ndim=1)
    labels = check_array(is_ood, "is_ood", ndim=1, dtype=None)
    check_consistent_length(scores=scores, is_ood=labels)
    if labels.dtype != bool:
        if not np.all(np.isin(labels, [0, 1])):
            raise InputError("is_ood: expected booleans (or 0/1)")
        labels = labels.astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        cls = "out-of-domain" if n_pos else "in-domain"
        raise InputError(
            f"is_ood: needs both in-domain and out-of-domain entries, got only {cls} "
            f"({len(labels)} entries)"
        )
    return scores, labels


def roc_auc(scores: np.ndarray, is_ood: np.ndarray) -> float:
    """Area under the ROC curve for separating OOD (positive) from in-domain entries.

    Parameters
    ----------
    scores : ndarray, shape (n,)
        Uncertainty (higher = more likely OOD).
    is_ood : ndarray of bool, shape (n,)
        True for out-of-domain entries. Both classes must be present.

    Returns
    -------
    float
        0.5 = chance, 1 = perfect separation; ties count one half.

    Examples
    --------
    >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    0.75
    """
    from sklearn.metrics import roc_auc_score

    scores, labels = _check_labels(scores, is_ood)
    return float(roc_auc_score(labels, scores))


def tpr_fpr(scores: np.ndarray, is_ood: np.ndarray, threshold: float) -> tuple[float, float]:
    """True- and false-positive rates of the rule ``scores > threshold``.

    Returns
    -------
    (tpr, fpr) : tuple of float
        tpr = flagged OOD / all OOD; fpr = flagged in-domain / all in-domain.

    Examples
    --------
    >>> tpr_fpr(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]), 0.3)
    (1.0, 0.5)
    """
    scores, labels = _check_labels(scores, is_ood)
    threshold = float(check_array(threshold, "threshold", ndim=0))
    flagged = scores > threshold
    return float(np.mean(flagged[labels])), float(np.mean(flagged[~labels]))


# ---------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------


def cost_per_atom(seconds: float, n_atoms: int) -> float:
    """Wall time per atom in seconds (``seconds / n_atoms``).

    Examples
    --------
    >>> cost_per_atom(2.0, 400)
    0.005
    """
    seconds = float(check_array(seconds, "seconds", ndim=0, nonnegative=True))
    if int(n_atoms) != n_atoms or n_atoms < 1:
        raise InputError(f"n_atoms: expected a positive integer, got {n_atoms!r}")
    return seconds / int(n_atoms)


def relative_cost(method_seconds: float, forward_seconds: float) -> float:
    """Cost of a UQ method relative to one forward pass on the same atoms.

    Both times in the same unit (total seconds, or seconds per atom). An
    ensemble of M models scores about M; LTAU's k-NN step a few per cent
    (docs/methods.md).

    Examples
    --------
    >>> relative_cost(0.05, 1.0)
    0.05
    """
    method_seconds = float(check_array(method_seconds, "method_seconds", ndim=0, nonnegative=True))
    forward_seconds = float(check_array(forward_seconds, "forward_seconds", ndim=0))
    if forward_seconds <= 0:
        raise InputError(f"forward_seconds: expected a positive time, got {forward_seconds:.6g}")
    return method_seconds / forward_seconds
