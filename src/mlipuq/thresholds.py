"""Adaptive thresholds (pure functions)."""

from __future__ import annotations

import numpy as np

from mlipuq.validation import check_array


def tukey_fence(values: np.ndarray, k: float = 1.5) -> float:
    """Upper Tukey fence Q3 + k * IQR of ``values`` (k = 1.5 in the uq-ace paper).

    Parameters
    ----------
    values : ndarray, shape (n,)
        A training-set distribution (uncertainties or errors), any unit.
    k : float
        Fence multiplier.

    Returns
    -------
    float
        Threshold in the unit of ``values``.

    Examples
    --------
    >>> tukey_fence(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    7.0
    """
    values = check_array(values, "values", ndim=1)
    q1, q3 = np.percentile(values, [25.0, 75.0])
    return float(q3 + k * (q3 - q1))


def fpr_threshold(in_domain: np.ndarray, fpr: float = 0.05) -> float:
    """Threshold that flags at most a share ``fpr`` of in-domain scores.

    The ``1 - fpr`` quantile of held-out in-domain uncertainties (numpy's
    ``"higher"`` method: an observed value), so that ``mean(in_domain > t) <= fpr``.

    Parameters
    ----------
    in_domain : ndarray, shape (n,)
        Uncertainties of held-out in-domain configurations (or atoms), any unit.
    fpr : float
        Target false-positive rate, in (0, 1).

    Returns
    -------
    float
        Threshold in the unit of ``in_domain``; flag ``uncertainty > threshold``.

    Examples
    --------
    >>> fpr_threshold(np.arange(1.0, 101.0), 0.05)
    96.0
    """
    from mlipuq.exceptions import InputError

    values = check_array(in_domain, "in_domain", ndim=1)
    if not 0.0 < fpr < 1.0:
        raise InputError(f"fpr: expected a rate in (0, 1), got {fpr!r}")
    return float(np.quantile(values, 1.0 - fpr, method="higher"))
