"""Automatic calibration of LTAU's scale factor s (docs/methods.md).

LTAU predicts p_j, the probability that atom j's force error is at most a
threshold. The paper (ltau-ff, Fig. 1c and App. D) assumes test errors look
like s times training errors, compares p_j (computed at atol) with the observed
fraction of test atoms whose error is <= atol * s, and sets s by hand (2 and 4
for the 600 K / 1200 K 3BPA sets). Here s is fitted: the s that minimises the
expected calibration error (ECE) on a calibration split, globally or per
group, and the ECE before (s = 1) and after is reported on held-out atoms.

Two equivalent conventions, chosen with ``threshold_scales``:

- ``threshold_scales=True`` (default, the paper): p does NOT depend on s
  (p_j = mean neighbour CDF at atol) and the observed threshold is atol * s.
  Pass the p array itself (or a callable that ignores s)::

      p = ltau.predict_arrays(desc, species, scale=1.0).extras["p"]
      s = fit_scale(p, errors, atol)

- ``threshold_scales=False``: ``predict_p(s)`` returns the probability under
  the training distribution *scaled by s*, P(s * training error <= atol) =
  CDF(atol / s), and the threshold stays atol. This is the form to use at
  prediction time with a fitted s (a float or a per-atom array).

A callable whose p is the *unscaled* CDF at atol * s compared with errors at
atol * s is not a calibration (both sides tend to 1 as s grows, so the ECE is
minimised at the upper bound); :func:`fit_scale` warns when s ends on a bound.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.metrics import ece
from mlipuq.validation import check_array

__all__ = [
    "CalibrationResult",
    "calibrate",
    "fit_group_scales",
    "fit_scale",
    "scales_for_atoms",
    "split_calibration",
]

PredictP = Callable[[float | np.ndarray], np.ndarray]


def _as_callable(predict_p: PredictP | np.ndarray) -> PredictP:
    """A p array (s-independent, the paper's convention) becomes a constant callable."""
    if callable(predict_p):
        return predict_p
    p = check_array(predict_p, "p", ndim=1)
    return lambda _s: p


#: Points of the coarse log-spaced grid searched before the bounded refinement.
N_GRID = 41


def _scale_ece(
    predict_p: PredictP,
    errors: np.ndarray,
    atol: float,
    scale: float | np.ndarray,
    *,
    n_bins: int,
    threshold_scales: bool,
) -> float:
    p = np.asarray(predict_p(scale), dtype=float)
    if p.shape != errors.shape:
        raise InputError(f"predict_p: returned shape {p.shape}, expected {errors.shape}")
    threshold = atol * np.asarray(scale, dtype=float) if threshold_scales else atol
    return ece(p, errors, threshold, n_bins=n_bins)


def _check_inputs(errors: object, atol: float, bounds: tuple[float, float]) -> np.ndarray:
    errors = check_array(errors, "errors", ndim=1, nonnegative=True)
    if not np.isfinite(atol) or atol <= 0:
        raise InputError(f"atol: expected a positive tolerance in eV/Å, got {atol!r}")
    low, high = bounds
    if not (0 < low < high and np.isfinite(high)):
        raise InputError(f"bounds: expected 0 < low < high, got {bounds!r}")
    return errors


def fit_scale(
    predict_p: PredictP | np.ndarray,
    errors: np.ndarray,
    atol: float,
    *,
    bounds: tuple[float, float] = (0.1, 20.0),
    n_bins: int = 10,
    threshold_scales: bool = True,
) -> float:
    """Scale factor s minimising the ECE of ``predict_p(s)`` at threshold ``atol * s``.

    Search: ECE(s) is a step function of s for a finite set of atoms (the
    observed fractions change only when atol * s crosses an error) and can have
    several local minima, so a local optimiser alone may stop in the wrong
    valley. We first evaluate a coarse grid of ``N_GRID`` (41) log-spaced values
    in ``bounds``, then refine with ``scipy.optimize.minimize_scalar``
    (bounded Brent) over log s between the grid neighbours of the best grid
    point, and keep whichever of the two is lower (ties: the grid point).

    Parameters
    ----------
    predict_p : callable or ndarray of shape (n,)
        ``predict_p(s)`` with a float s returns the predicted probabilities p,
        shape (n,), in [0, 1], in the order of ``errors``; an array is p itself
        (independent of s, the paper's convention).
    errors : ndarray, shape (n,)
        True errors of the calibration atoms (force-error norms, eV/Å).
    atol : float
        Absolute tolerance in eV/Å at which p was defined.
    bounds : (float, float)
        Search interval for s (inclusive).
    n_bins : int
        Uniform bins of the calibration curve.
    threshold_scales : bool
        True: observed threshold is ``atol * s`` (paper); False: ``atol``.

    Returns
    -------
    float
        Fitted s (unitless).

    Warns
    -----
    UserWarning
        When the best grid point is a bound of ``bounds`` (s may lie outside, or
        ``predict_p`` follows the wrong convention).
    """
    from scipy.optimize import minimize_scalar

    errors = _check_inputs(errors, atol, bounds)
    predict_p = _as_callable(predict_p)

    def objective(log_s: float) -> float:
        return _scale_ece(
            predict_p,
            errors,
            atol,
            float(np.exp(log_s)),
            n_bins=n_bins,
            threshold_scales=threshold_scales,
        )

    grid = _log_grid(bounds)
    values = np.array([objective(x) for x in grid])
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, N_GRID - 1)]
    refined = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    if refined.success and refined.fun < values[best]:
        scale = float(np.exp(refined.x))
    else:
        scale = float(np.exp(grid[best]))
    if best in (0, N_GRID - 1):
        warnings.warn(
            f"fit_scale: s = {scale:.4g} is at the search bound {bounds}; widen bounds, or "
            "check the predict_p convention (threshold_scales, see mlipuq.calibration)",
            UserWarning,
            stacklevel=2,
        )
    return scale


def fit_group_scales(
    predict_p: PredictP | np.ndarray,
    errors: np.ndarray,
    atol: float,
    groups: Sequence | np.ndarray,
    *,
    min_group_size: int = 100,
    bounds: tuple[float, float] = (0.1, 20.0),
    n_bins: int = 10,
    threshold_scales: bool = True,
    default: float | None = None,
) -> dict[str, float]:
    """One scale factor per group (e.g. ``config_type`` of each atom's configuration).

    ``predict_p`` is called with scalar s on all n atoms and the group's atoms
    are taken from its output. Groups with fewer than ``min_group_size`` atoms
    get the global s (fitted on all atoms, or ``default`` if given): with a
    handful of atoms per bin the ECE is too noisy to fit.

    Parameters
    ----------
    predict_p, errors, atol, bounds, n_bins, threshold_scales
        As in :func:`fit_scale`.
    groups : array-like of labels, shape (n,)
        Group of each atom (labels become str).
    min_group_size : int
        Smallest group fitted on its own.
    default : float, optional
        Fallback s for small groups (default: the global fitted s).

    Returns
    -------
    dict of str -> float
        s per group label (every label present in ``groups``).
    """
    errors = _check_inputs(errors, atol, bounds)
    groups = _check_groups(groups, len(errors))
    predict_p = _cached(_as_callable(predict_p), bounds)  # the grid values repeat across groups
    kwargs = {"bounds": bounds, "n_bins": n_bins, "threshold_scales": threshold_scales}
    labels, counts = np.unique(groups, return_counts=True)
    if default is None and np.any(counts < min_group_size):
        default = fit_scale(predict_p, errors, atol, **kwargs)
    out: dict[str, float] = {}
    for label, count in zip(labels, counts, strict=True):
        if count < min_group_size:
            out[str(label)] = float(default)
            continue
        mask = groups == label
        out[str(label)] = fit_scale(
            lambda s, mask=mask: np.asarray(predict_p(s))[mask], errors[mask], atol, **kwargs
        )
    return out


def _log_grid(bounds: tuple[float, float]) -> np.ndarray:
    return np.linspace(np.log(bounds[0]), np.log(bounds[1]), N_GRID)


def _cached(predict_p: PredictP, bounds: tuple[float, float]) -> PredictP:
    """Memoise ``predict_p`` at the coarse-grid values of s, which every group repeats.

    Holds at most ``N_GRID`` arrays of shape (n,) (41 x 8 bytes per atom).
    """
    grid = {float(np.exp(x)) for x in _log_grid(bounds)}
    cache: dict[float, np.ndarray] = {}

    def wrapped(scale: float | np.ndarray) -> np.ndarray:
        if np.ndim(scale) != 0 or float(scale) not in grid:
            return np.asarray(predict_p(scale))
        key = float(scale)
        if key not in cache:
            cache[key] = np.asarray(predict_p(key))
        return cache[key]

    return wrapped


def _check_groups(groups: Sequence | np.ndarray, n: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise InputError(f"groups: expected {n} labels (one per atom), got shape {groups.shape}")
    return groups.astype(str)


def scales_for_atoms(
    group_scales: dict[str, float], atom_groups: Sequence | np.ndarray, default: float = 1.0
) -> np.ndarray:
    """Per-atom scale array from per-group scales, for ``predict(..., scale=...)``.

    Parameters
    ----------
    group_scales : dict of str -> float
        Output of :func:`fit_group_scales`.
    atom_groups : array-like of labels, shape (n,)
        Group of each atom to predict.
    default : float
        s for labels not in ``group_scales`` (e.g. the global s).

    Returns
    -------
    ndarray of float, shape (n,)

    Examples
    --------
    >>> scales_for_atoms({"a": 2.0}, ["a", "b", "a"], default=1.5).tolist()
    [2.0, 1.5, 2.0]
    """
    labels = np.asarray(atom_groups).astype(str)
    if labels.ndim != 1:
        raise InputError(f"atom_groups: expected a 1-d array of labels, got shape {labels.shape}")
    out = np.full(len(labels), float(default))
    for label, s in group_scales.items():
        out[labels == str(label)] = float(s)
    return out


def split_calibration(
    n: int,
    fraction: float = 0.5,
    seed: int = 0,
    *,
    config_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random split into calibration and held-out test indices.

    Parameters
    ----------
    n : int
        Number of atoms.
    fraction : float
        Share for calibration, in (0, 1).
    seed : int
        Seed of ``numpy.random.default_rng`` (reproducible).
    config_index : ndarray of int, shape (n,), optional
        If given, whole configurations are split (atoms of one configuration
        are correlated, so the held-out ECE is then honest); ``fraction`` is
        the share of configurations.

    Returns
    -------
    (cal_index, test_index) : tuple of ndarray of int
        Sorted, disjoint atom indices covering ``range(n)``.
    """
    if int(n) != n or n < 2:
        raise InputError(f"n: expected at least 2 atoms, got {n!r}")
    if not 0.0 < fraction < 1.0:
        raise InputError(f"fraction: expected a value in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    if config_index is None:
        units = np.arange(int(n))
        unit_of_atom = units
    else:
        unit_of_atom = np.asarray(config_index)
        if unit_of_atom.shape != (n,):
            raise InputError(f"config_index: expected shape ({n},), got {unit_of_atom.shape}")
        units = np.unique(unit_of_atom)
    if len(units) < 2:
        raise InputError("config_index: needs at least 2 configurations to split")
    n_cal = min(max(int(round(fraction * len(units))), 1), len(units) - 1)
    cal_units = rng.choice(units, size=n_cal, replace=False)
    is_cal = np.isin(unit_of_atom, cal_units)
    return np.flatnonzero(is_cal), np.flatnonzero(~is_cal)


@dataclass(frozen=True)
class CalibrationResult:
    """Fitted scale factor(s) and the calibration error before and after.

    Attributes
    ----------
    scale : float
        Global s fitted on the calibration atoms.
    group_scales : dict of str -> float
        s per group (empty when no groups were given).
    ece_before : float
        ECE on the held-out atoms at s = 1.
    ece_after : float
        ECE on the held-out atoms with the fitted s (per-atom group scales when
        ``group_scales`` is set, else the global s).
    ece_before_by_group, ece_after_by_group : dict of str -> float
        The same per group of the held-out atoms (empty without groups).
    n_calibration, n_test : int
        Number of atoms used for fitting and for the held-out ECE.
    atol : float
        Tolerance in eV/Å.
    """

    scale: float
    group_scales: dict[str, float]
    ece_before: float
    ece_after: float
    n_calibration: int
    n_test: int
    atol: float
    ece_before_by_group: dict[str, float] = field(default_factory=dict)
    ece_after_by_group: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-serialisable copy."""
        return {
            "scale": self.scale,
            "group_scales": dict(self.group_scales),
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "ece_before_by_group": dict(self.ece_before_by_group),
            "ece_after_by_group": dict(self.ece_after_by_group),
            "n_calibration": self.n_calibration,
            "n_test": self.n_test,
            "atol": self.atol,
        }


def calibrate(
    predict_p: PredictP | np.ndarray,
    errors: np.ndarray,
    atol: float,
    *,
    cal_index: np.ndarray,
    test_index: np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    min_group_size: int = 100,
    bounds: tuple[float, float] = (0.1, 20.0),
    n_bins: int = 10,
    threshold_scales: bool = True,
) -> CalibrationResult:
    """Fit s on the calibration atoms, report ECE before/after on the test atoms.

    ``predict_p`` covers all n atoms (calibration and test together, e.g. one
    LTAU ``predict`` over a test file); :func:`split_calibration` gives the two
    index arrays. With ``groups``, each group gets its own s
    (:func:`fit_group_scales`, small groups fall back to the global s) and the
    after-ECE uses the per-atom scale array ``scales_for_atoms(...)``.

    Parameters
    ----------
    predict_p : callable or ndarray of shape (n,)
        ``predict_p(scale)`` -> p of shape (n,); ``scale`` is a float or an
        (n,) array. An array is p itself (independent of s).
    errors : ndarray, shape (n,)
        True force-error norms (eV/Å) of all n atoms.
    atol : float
        Tolerance (eV/Å).
    cal_index, test_index : ndarray of int
        Disjoint atom indices for fitting and for the held-out report.
    groups : array-like of labels, shape (n,), optional
        Group of each atom for per-group scales.
    min_group_size, bounds, n_bins, threshold_scales
        See :func:`fit_group_scales` and :func:`fit_scale`.

    Returns
    -------
    CalibrationResult
    """
    errors = _check_inputs(errors, atol, bounds)
    n = len(errors)
    cal_index = _check_subset(cal_index, n, "cal_index")
    test_index = _check_subset(test_index, n, "test_index")
    if np.intersect1d(cal_index, test_index).size:
        raise InputError("cal_index, test_index: overlap (the held-out atoms must be unseen)")
    kwargs = {"bounds": bounds, "n_bins": n_bins, "threshold_scales": threshold_scales}
    predict_p = _cached(_as_callable(predict_p), bounds)

    def on(index: np.ndarray) -> PredictP:
        return lambda s: np.asarray(predict_p(s))[index]

    scale = fit_scale(on(cal_index), errors[cal_index], atol, **kwargs)
    group_scales: dict[str, float] = {}
    scale_all: float | np.ndarray = scale
    labels = None
    if groups is not None:
        labels = _check_groups(groups, n)
        group_scales = fit_group_scales(
            on(cal_index),
            errors[cal_index],
            atol,
            labels[cal_index],
            min_group_size=min_group_size,
            default=scale,
            **kwargs,
        )
        scale_all = scales_for_atoms(group_scales, labels, default=scale)

    ece_kw = {"n_bins": n_bins, "threshold_scales": threshold_scales}
    p_before = np.asarray(predict_p(1.0), dtype=float)
    p_after = np.asarray(predict_p(scale_all), dtype=float)
    s_after = np.broadcast_to(np.asarray(scale_all, dtype=float), (n,))

    def held_out(p: np.ndarray, s: np.ndarray, idx: np.ndarray) -> float:
        return _scale_ece(lambda _s: p[idx], errors[idx], atol, s[idx], **ece_kw)

    ones = np.ones(n)
    before_g: dict[str, float] = {}
    after_g: dict[str, float] = {}
    if labels is not None:
        for label in np.unique(labels[test_index]):
            idx = test_index[labels[test_index] == label]
            before_g[str(label)] = held_out(p_before, ones, idx)
            after_g[str(label)] = held_out(p_after, s_after, idx)
    return CalibrationResult(
        scale=scale,
        group_scales=group_scales,
        ece_before=held_out(p_before, ones, test_index),
        ece_after=held_out(p_after, s_after, test_index),
        n_calibration=len(cal_index),
        n_test=len(test_index),
        atol=float(atol),
        ece_before_by_group=before_g,
        ece_after_by_group=after_g,
    )


def _check_subset(index: object, n: int, name: str) -> np.ndarray:
    index = check_array(index, name, ndim=1, dtype=None)
    if not np.issubdtype(index.dtype, np.integer):
        raise InputError(f"{name}: expected integer indices, got dtype {index.dtype}")
    if index.min() < 0 or index.max() >= n:
        raise InputError(f"{name}: indices out of range [0, {n})")
    return index.astype(np.int64)
