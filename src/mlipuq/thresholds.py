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
