"""LLPR: last-layer prediction rigidity (Bigi, Chong, Ceriotti, Grasselli 2024).

The model's energy is a sum of atomic energies, each a linear readout
``e_i = w_g . f_i`` of the atom's last-layer features ``f_i`` (shape (D,), the
``descriptors`` of :class:`~mlipuq.backends.base.ModelOutputs`), with one weight
vector ``w_g`` per readout group ``g`` (the atom's element, or one group for all
atoms). With the training rows ``F_g`` (n_g, D) of group ``g``, the last-layer
weights' covariance is approximated by ``alpha^2 (F_g^T F_g + varsigma_g^2 I)^-1``, and

- atom ``i``: ``sigma_i^2 = f_i^T (F_g^T F_g + varsigma_g^2 I)^-1 f_i`` (unitless; the
  inverse of Chong et al.'s local prediction rigidity, ``LPR_i = 1 / sigma_i^2``);
- force on atom ``i``: each Cartesian component of ``F_ref - F_pred`` is modelled as
  Gaussian with standard deviation ``s_i = alpha sigma_i`` (eV/Å), so the error norm
  ``|dF_i|`` follows a Maxwell distribution of scale ``s_i``;
- configuration energy: ``sigma_E^2 = sum_g f_{c,g}^T (F_g^T F_g + varsigma_g^2 I)^-1
  f_{c,g}`` with ``f_{c,g}`` the sum of the features of the configuration's atoms of
  group ``g`` (unitless: ``alpha`` is fitted on forces only).

``varsigma_g^2 = regularizer * tr(F_g^T F_g) / D`` (relative to the mean eigenvalue,
so sigma does not change when the features are rescaled). ``alpha`` (eV/Å), and with
``regularizer_grid`` the regularizer, are fitted by :meth:`LLPREstimator.calibrate` on
held-out force errors (maximum likelihood under the Maxwell distribution). alpha alone
rescales every sigma and keeps their ranking; a larger regularizer caps sigma along
feature directions the training set barely spans, which in-domain calibration data
cannot probe, so the default keeps ``regularizer`` and fits alpha only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, solve_triangular
from scipy.special import gammainc

from mlipuq.atom_table import config_max
from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod, fpr_threshold_of
from mlipuq.result import UQResult
from mlipuq.validation import (
    as_species,
    check_array,
    check_config_index,
    check_consistent_length,
    check_feature_dim,
    check_is_fitted,
)

__all__ = [
    "DEFAULT_REGULARIZER",
    "REGULARIZER_GRID",
    "LLPREstimator",
    "fit_alpha",
    "maxwell_cdf",
    "maxwell_nll",
]

#: Default relative regularizer: varsigma_g^2 = DEFAULT_REGULARIZER * tr(F_g^T F_g) / D.
DEFAULT_REGULARIZER = 1e-6
#: A grid of relative regularizers for ``LLPREstimator(regularizer_grid=...)``.
REGULARIZER_GRID = (1e-8, 1e-6, 1e-4, 1e-2)
#: Rows per chunk when accumulating F^T F and solving for sigma.
DEFAULT_BATCH_SIZE = 65536
#: Group name of the single readout group when ``per_element=False``.
SHARED_GROUP = "all"


# ---------------------------------------------------------------------------
# The Maxwell distribution of a force-error norm
# ---------------------------------------------------------------------------


def maxwell_cdf(x: float | np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """P(|dF| <= x) for a 3-d Gaussian error with per-component std ``scale``.

    ``erf(x / (s sqrt 2)) - sqrt(2/pi) (x/s) exp(-x^2 / (2 s^2))``, evaluated as the
    regularised lower incomplete gamma function ``P(3/2, x^2 / (2 s^2))`` (no
    cancellation for x << s).

    Parameters
    ----------
    x : float or ndarray
        Error norm(s), eV/Å, non-negative.
    scale : float or ndarray
        Per-component standard deviation(s) s, eV/Å, non-negative (s = 0: CDF 1).

    Returns
    -------
    ndarray
        Probabilities in [0, 1], broadcast shape of ``x`` and ``scale``.

    Examples
    --------
    >>> round(float(maxwell_cdf(1.5382, 1.0)), 4)
    0.5
    """
    x = np.asarray(x, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(scale > 0, x * x / (2.0 * scale * scale), np.inf)
    return np.where(x > 0, gammainc(1.5, u), 0.0)


def maxwell_nll(x: np.ndarray, scale: np.ndarray) -> float:
    """Mean negative log-likelihood (nats per atom) of error norms under Maxwell(scale).

    ``-log p(x) = -log sqrt(2/pi) - 2 log x + 3 log s + x^2 / (2 s^2)``; x = 0 is
    evaluated at the smallest positive float.

    Parameters
    ----------
    x : ndarray, shape (n,)
        Error norms, eV/Å.
    scale : ndarray, shape (n,)
        Per-component standard deviations s, eV/Å, positive.

    Returns
    -------
    float
    """
    x = np.maximum(np.asarray(x, dtype=np.float64), np.finfo(np.float64).tiny)
    scale = np.asarray(scale, dtype=np.float64)
    terms = (-0.5 * np.log(2.0 / np.pi) - 2.0 * np.log(x) + 3.0 * np.log(scale)
             + x * x / (2.0 * scale * scale))
    return float(np.mean(terms))


def fit_alpha(x: np.ndarray, variance: np.ndarray) -> float:
    """Maximum-likelihood alpha for ``x_i ~ Maxwell(alpha sigma_i)``.

    ``alpha^2 = sum_i (x_i^2 / sigma_i^2) / (3 n)``.

    Parameters
    ----------
    x : ndarray, shape (n,)
        Error norms, eV/Å.
    variance : ndarray, shape (n,)
        sigma_i^2 (unitless), positive.

    Returns
    -------
    float
        alpha in eV/Å.

    Examples
    --------
    >>> fit_alpha(np.array([3.0]), np.array([1.0]))
    1.7320508075688772
    """
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.mean(x * x / np.asarray(variance, dtype=np.float64)) / 3.0))


# ---------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------


class LLPREstimator(UQMethod):
    """Last-layer prediction rigidity: force uncertainty from one model's readout features.

    Parameters
    ----------
    per_element : bool
        One covariance per element (``F_g``: the training rows of that element), as
        for per-element readouts (ACE) and so that an element absent from training
        raises :class:`~mlipuq.exceptions.InputError` instead of getting a sigma from
        other elements' rows. False: one covariance over every training atom (the
        exact last-layer covariance of a readout whose weights all elements share).
    regularizer : float
        Relative regularizer before calibration: varsigma_g^2 = ``regularizer`` *
        tr(F_g^T F_g) / D (positive).
    regularizer_grid : tuple of float, optional
        Relative regularizers :meth:`calibrate` chooses from (each with its own
        maximum-likelihood alpha; the lowest NLL is kept), e.g. :data:`REGULARIZER_GRID`.
        None (default): keep ``regularizer`` and fit alpha only.
    atol : float, optional
        Tolerance in eV/Å of ``extras["p"] = P(|dF_i| <= atol)``. None: the mean
        calibration force-error norm, resolved by :meth:`calibrate` (``atol_``). Give
        LTAU's ``atol_`` to compare the two methods' ECE at one tolerance.
    batch_size : int
        Rows per chunk (memory O(D^2 + batch_size D) whatever the number of atoms).

    Attributes
    ----------
    n_features_in_ : int
        D.
    elements_ : list of str
        Elements of the training atoms.
    groups_ : list of str
        Readout groups: ``elements_``, or ``["all"]`` when not ``per_element``.
    gram_ : dict of str -> ndarray, shape (D, D)
        F_g^T F_g per group (float64).
    n_train_atoms_ : dict of str -> int
        Training rows per group.
    alpha_ : float
        Scale of sigma: 1 before calibration, eV/Å after.
    regularizer_ : float
        Relative regularizer in use.
    atol_ : float or None
        Tolerance of ``extras["p"]`` in eV/Å (None until resolved).
    threshold_ : float or None
        Configuration flag threshold on ``max_i alpha sigma_i`` (eV/Å).
    threshold_source_ : str or None
        Where ``threshold_`` came from.
    calibration_ : dict or None
        What :meth:`calibrate` fitted (alpha, regularizer, NLL per grid value, NLL and
        ECE before and after, atol, counts, fpr, threshold).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = ModelOutputs(species=np.array(["Cu"] * 40), config_index=np.repeat(np.arange(4), 10),
    ...                  descriptors=rng.normal(size=(40, 3)))
    >>> result = LLPREstimator().fit(X).predict(X)
    >>> result.atom_uncertainty.shape, result.config_uncertainty.shape
    ((40,), (4,))
    """

    name: ClassVar[str] = "llpr"
    display_name: ClassVar[str] = "LLPR"
    requires: ClassVar[tuple[str, ...]] = ("descriptors",)
    calibrates: ClassVar[bool] = True

    def __init__(
        self,
        *,
        per_element: bool = True,
        regularizer: float = DEFAULT_REGULARIZER,
        regularizer_grid: tuple[float, ...] | None = None,
        atol: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.per_element = per_element
        self.regularizer = regularizer
        self.regularizer_grid = regularizer_grid
        self.atol = atol
        self.batch_size = batch_size

    # ------------------------------------------------------------------ params
    def _check_params(self) -> None:
        if not isinstance(self.per_element, bool | np.bool_):
            raise InputError(f"per_element: expected True or False, got {self.per_element!r}")
        _check_positive(self.regularizer, "regularizer")
        if self.regularizer_grid is not None:
            if isinstance(self.regularizer_grid, str | bytes) or not len(self.regularizer_grid):
                raise InputError("regularizer_grid: expected a non-empty sequence of positive "
                                 f"numbers or None, got {self.regularizer_grid!r}")
            for value in self.regularizer_grid:
                _check_positive(value, "regularizer_grid")
        if self.atol is not None:
            _check_positive(self.atol, "atol")
        if not isinstance(self.batch_size, int | np.integer) or self.batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {self.batch_size!r}")

    @classmethod
    def _params_from_json(cls, params: dict) -> dict:
        params = dict(params)
        if params.get("regularizer_grid") is not None:
            params["regularizer_grid"] = tuple(float(v) for v in params["regularizer_grid"])
        return params

    # ------------------------------------------------------------------ fit
    def fit(self, X: ModelOutputs, store: Any = None) -> LLPREstimator:
        """Accumulate F_g^T F_g over the training atoms, in chunks of ``batch_size`` rows.

        Parameters
        ----------
        X : ModelOutputs
            Training set: ``species`` (N,), ``descriptors`` (N, D).
        store : ignored

        Returns
        -------
        self
            Uncalibrated: alpha 1, ``regularizer``, no threshold.
        """
        self._check_params()
        self.check_inputs(X)
        descriptors = check_array(X.descriptors, "descriptors", ndim=2, dtype=None,
                                  finite=False)
        species = as_species(X.species)
        check_consistent_length(descriptors=descriptors, species=species)
        elements = sorted(set(species.tolist()))
        groups = elements if self.per_element else [SHARED_GROUP]
        codes = _group_codes(species, groups, self.per_element)
        dim = descriptors.shape[1]
        grams = [np.zeros((dim, dim)) for _ in groups]
        for start in range(0, len(species), int(self.batch_size)):
            chunk = np.asarray(descriptors[start:start + int(self.batch_size)], dtype=np.float64)
            chunk_codes = codes[start:start + int(self.batch_size)]
            for code in np.unique(chunk_codes):
                rows = chunk[chunk_codes == code]
                grams[code] += rows.T @ rows
        counts = np.bincount(codes, minlength=len(groups))
        self.n_features_in_ = int(dim)
        self.elements_ = elements
        self.groups_ = list(groups)
        self.gram_ = {group: gram for group, gram in zip(groups, grams, strict=True)}
        self.n_train_atoms_ = {group: int(n) for group, n in zip(groups, counts, strict=True)}
        self.alpha_ = 1.0
        self.regularizer_ = float(self.regularizer)
        self.atol_ = None if self.atol is None else float(self.atol)
        self.threshold_ = None
        self.threshold_source_ = None
        self.calibration_ = None
        self._factor_cache = None
        return self

    # ------------------------------------------------------------------ predict
    def predict(self, X: ModelOutputs) -> UQResult:
        """Force and energy uncertainty of the atoms and configurations of ``X``.

        Parameters
        ----------
        X : ModelOutputs
            ``species`` (N,), ``config_index`` (N,), ``descriptors`` (N, D).

        Returns
        -------
        UQResult
            ``atom_uncertainty``: s_i = alpha sigma_i, the per-component standard
            deviation of the force error (eV/Å after :meth:`calibrate`, unitless
            before: ``unit`` says which); ``config_uncertainty``: max over the
            configuration's atoms; flags ``> threshold_`` when a threshold is set.
            Extras (per atom, (N,)): ``"lpr"`` = 1 / sigma_i^2 (unitless),
            ``"expected_error"`` = E|dF_i| = 2 sqrt(2/pi) s_i, ``"p"`` = P(|dF_i| <=
            atol_) under Maxwell(s_i) (once ``atol_`` is known); per configuration
            (C,): ``"config_energy_uncertainty"`` = sigma_E (unitless).
        """
        check_is_fitted(self, "gram_")
        descriptors, codes, index, n_configs = self._inputs(X)
        variance, energy_variance = self._variances(
            descriptors, codes, index, n_configs, self._factors(self.regularizer_), energy=True)
        sigma = self.alpha_ * np.sqrt(variance)
        config_u = config_max(sigma, index, n_configs)
        with np.errstate(divide="ignore"):
            lpr = 1.0 / variance
        extras = {
            "lpr": lpr,
            "expected_error": 2.0 * np.sqrt(2.0 / np.pi) * sigma,
            "config_energy_uncertainty": np.sqrt(energy_variance),
        }
        if self.atol_ is not None:
            extras["p"] = maxwell_cdf(self.atol_, sigma)
        threshold = self.threshold_
        return UQResult(
            method=self.name,
            atom_uncertainty=sigma,
            config_uncertainty=config_u,
            config_index=index,
            atom_flags=None if threshold is None else sigma > threshold,
            config_flags=None if threshold is None else config_u > threshold,
            threshold=threshold,
            unit="" if self.calibration_ is None else "eV/Å",
            config_aggregate="max",
            atol=self.atol_,
            extras=extras,
        )

    # ------------------------------------------------------------------ calibrate
    def calibrate(
        self, X: ModelOutputs, force_errors: np.ndarray | None = None, *, fpr: float = 0.05,
        source: str = "in-domain held-out data",
    ) -> LLPREstimator:
        """Fit alpha, the regularizer, atol and the flag threshold on held-out atoms.

        - For each relative regularizer r of ``regularizer_grid`` (or ``regularizer``):
          sigma_i(r), then the maximum-likelihood alpha(r) of the force-error norms
          under Maxwell(alpha sigma_i) (:func:`fit_alpha`) and its NLL
          (:func:`maxwell_nll`); the r with the lowest NLL is kept.
        - ``atol_``: ``atol``, or the mean of the calibration force-error norms.
        - ``threshold_``: the (1 - ``fpr``) quantile of the calibrated configuration
          uncertainty (max over atoms of alpha sigma_i, eV/Å).

        Atoms with a non-finite force error (no reference forces) or sigma_i = 0 take
        no part in the fit of alpha and r; every configuration counts for the
        threshold. Without ``force_errors`` only the threshold is fitted.

        Parameters
        ----------
        X : ModelOutputs
            In-domain held-out configurations unseen in training (N atoms).
        force_errors : ndarray, shape (N,), optional
            |F_ref - F_pred| per atom in eV/Å (NaN where unknown).
        fpr : float
            In-domain false-positive rate of the configuration threshold, in (0, 1).
        source : str
            Recorded in ``threshold_source_``.

        Returns
        -------
        self
            A failed calibration raises and leaves the estimator as it was.
        """
        check_is_fitted(self, "gram_")
        self._check_params()
        if not 0.0 < fpr < 1.0:
            raise InputError(f"fpr: expected a rate in (0, 1), got {fpr!r}")
        if force_errors is None:
            return super().calibrate(X, None, fpr=fpr, source=source)
        descriptors, codes, index, n_configs = self._inputs(X)
        errors = check_array(force_errors, "force_errors", ndim=1, finite=False)
        check_consistent_length(force_errors=errors, descriptors=descriptors)
        known = np.isfinite(errors)
        if np.any(errors[known] < 0):
            raise InputError(f"force_errors: contains negative values "
                             f"(min {errors[known].min():.6g})")

        def variance_of(regularizer: float) -> np.ndarray:
            return self._variances(descriptors, codes, index, n_configs,
                                   self._factors(regularizer, cache=False))[0]

        grid = ([float(self.regularizer)] if self.regularizer_grid is None
                else sorted({float(r) for r in self.regularizer_grid}))
        variances = {r: variance_of(r) for r in grid}
        used = known & np.all([v > 0 for v in variances.values()], axis=0)
        if not np.any(used) or not np.any(errors[used] > 0):
            raise InputError("force_errors: no atom with a finite, positive force error "
                             "and a non-zero sigma to calibrate on")
        x = errors[used]
        alphas = {r: fit_alpha(x, v[used]) for r, v in variances.items()}
        nll = {r: maxwell_nll(x, alphas[r] * np.sqrt(v[used])) for r, v in variances.items()}
        best = min(grid, key=lambda r: nll[r])
        alpha, variance = alphas[best], variances[best]
        before = variances.get(float(self.regularizer))
        if before is None:
            before = variance_of(float(self.regularizer))
        before = before[used]
        atol = float(self.atol) if self.atol is not None else float(np.mean(x))
        sigma = alpha * np.sqrt(variance)
        threshold = fpr_threshold_of(
            UQResult(self.name, sigma, config_max(sigma, index, n_configs)), fpr)
        calibration = {
            "alpha": alpha,
            "regularizer": best,
            "nll_by_regularizer": {repr(r): nll[r] for r in grid},
            "alpha_by_regularizer": {repr(r): alphas[r] for r in grid},
            "nll_before": maxwell_nll(x, np.sqrt(before)),
            "nll_after": nll[best],
            "ece_before": _ece(maxwell_cdf(atol, np.sqrt(before)), x, atol),
            "ece_after": _ece(maxwell_cdf(atol, sigma[used]), x, atol),
            "atol": atol,
            "n_atoms": int(np.count_nonzero(used)),
            "n_configs": int(np.count_nonzero(np.bincount(index, minlength=n_configs))),
            "fpr": float(fpr),
            "threshold": float(threshold),
            "convention": "|dF_i| ~ Maxwell(alpha sigma_i), sigma_i^2 = f_i^T "
                          "(F_g^T F_g + r tr(F_g^T F_g)/D I)^-1 f_i",
        }
        self.alpha_ = float(alpha)
        self.regularizer_ = float(best)
        self.atol_ = atol
        self._factor_cache = None
        self.calibration_ = calibration
        self.set_threshold(threshold, f"FPR {fpr:g} on {source}")
        return self

    def uncalibrated(self) -> LLPREstimator:
        """A shallow copy predicting as before :meth:`calibrate`: alpha 1, ``regularizer``,
        no threshold; ``atol_`` is kept so that its ``"p"`` is comparable."""
        check_is_fitted(self, "gram_")
        other = copy.copy(self)
        other.alpha_ = 1.0
        other.regularizer_ = float(self.regularizer)
        other.threshold_ = None
        other.threshold_source_ = None
        other.calibration_ = None
        other._factor_cache = None
        return other

    # ------------------------------------------------------------------ linear algebra
    def _factors(self, regularizer: float, *, cache: bool = True) -> list[np.ndarray]:
        """Lower Cholesky factors L_g of F_g^T F_g + varsigma_g^2 I, one per group."""
        cached = getattr(self, "_factor_cache", None)
        if cache and cached is not None and cached[0] == regularizer:
            return cached[1]
        factors = []
        for group in self.groups_:
            gram = self.gram_[group]
            dim = gram.shape[0]
            mean_eigenvalue = float(np.trace(gram)) / dim
            ridge = float(regularizer) * (mean_eigenvalue if mean_eigenvalue > 0 else 1.0)
            try:
                lower, _ = cho_factor(gram + ridge * np.eye(dim), lower=True, check_finite=False)
            except LinAlgError:
                raise InputError(f"llpr: F^T F + varsigma^2 I of group {group} is not positive "
                                 f"definite at regularizer {regularizer:g}; use a larger "
                                 "regularizer") from None
            factors.append(lower)
        if cache:
            self._factor_cache = (regularizer, factors)
        return factors

    def _variances(
        self, descriptors: np.ndarray, codes: np.ndarray, index: np.ndarray, n_configs: int,
        factors: Sequence[np.ndarray], *, energy: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """sigma_i^2 per atom (N,) and, with ``energy``, sigma_E^2 per configuration (C,).

        Configurations are processed in blocks of about ``batch_size`` atoms.
        """
        n_atoms = len(codes)
        variance = np.empty(n_atoms)
        energy_variance = np.zeros(n_configs) if energy else None
        order = np.argsort(index, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=n_configs))])
        first = 0
        while first < n_configs:
            last = int(np.searchsorted(starts, starts[first] + int(self.batch_size), "right")) - 1
            last = min(max(last, first + 1), n_configs)
            rows = order[starts[first]:starts[last]]
            block = np.asarray(descriptors[rows], dtype=np.float64)
            block_codes = codes[rows]
            for code in np.unique(block_codes):
                mask = block_codes == code
                solved = solve_triangular(factors[code], block[mask].T, lower=True,
                                          check_finite=False)
                variance[rows[mask]] = np.einsum("ij,ij->j", solved, solved)
                if energy:
                    present, local = np.unique(index[rows[mask]], return_inverse=True)
                    sums = np.zeros((len(present), block.shape[1]))
                    np.add.at(sums, local, block[mask])
                    solved = solve_triangular(factors[code], sums.T, lower=True,
                                              check_finite=False)
                    energy_variance[present] += np.einsum("ij,ij->j", solved, solved)
            first = last
        return variance, energy_variance

    def _inputs(self, X: ModelOutputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Checked descriptors (N, D), group codes (N,), config index (N,) and C."""
        self.check_inputs(X)
        descriptors = check_array(X.descriptors, "descriptors", ndim=2, dtype=None,
                                  finite=False)
        species = as_species(X.species)
        check_consistent_length(descriptors=descriptors, species=species)
        check_feature_dim(descriptors, self.n_features_in_, "descriptors")
        index = check_config_index(X.config_index, len(species))
        codes = _group_codes(species, self.groups_, self.per_element)
        return descriptors, codes, index, int(index.max()) + 1

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        check_is_fitted(self, "gram_")
        state = {
            "n_features_in": self.n_features_in_,
            "elements": list(self.elements_),
            "groups": list(self.groups_),
            "n_train_atoms": dict(self.n_train_atoms_),
            "alpha": self.alpha_,
            "regularizer": self.regularizer_,
            "atol": self.atol_,
            "threshold": self.threshold_,
            "threshold_source": self.threshold_source_,
            "calibration": self.calibration_,
        }
        return state, {f"gram_{group}": self.gram_[group] for group in self.groups_}

    def _set_state(self, state: dict, arrays: Mapping[str, np.ndarray], directory: Path) -> None:
        groups = [str(g) for g in state["groups"]]
        dim = int(state["n_features_in"])
        grams = {}
        for group in groups:
            gram = np.asarray(arrays[f"gram_{group}"], dtype=np.float64)
            if gram.shape != (dim, dim):
                raise InputError(f"{directory}: gram_{group} has shape {gram.shape}, "
                                 f"expected {(dim, dim)}")
            grams[group] = gram
        self.n_features_in_ = dim
        self.elements_ = [str(e) for e in state["elements"]]
        self.groups_ = groups
        self.gram_ = grams
        self.n_train_atoms_ = {str(k): int(v) for k, v in state["n_train_atoms"].items()}
        self.alpha_ = float(state["alpha"])
        self.regularizer_ = float(state["regularizer"])
        self.atol_ = None if state["atol"] is None else float(state["atol"])
        self.threshold_ = None if state["threshold"] is None else float(state["threshold"])
        self.threshold_source_ = state.get("threshold_source")
        self.calibration_ = state.get("calibration")
        self._factor_cache = None


def _check_positive(value: object, name: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float | np.number)
            or not np.isfinite(value) or value <= 0):
        raise InputError(f"{name}: expected a positive finite number, got {value!r}")


def _group_codes(species: np.ndarray, groups: Sequence[str], per_element: bool) -> np.ndarray:
    """Readout group of each atom as an index into ``groups``, shape (N,)."""
    if not per_element:
        return np.zeros(len(species), dtype=np.int64)
    unknown = sorted(set(species.tolist()) - set(groups))
    if unknown:
        raise InputError(f"species: element(s) {unknown} absent from the LLPR training set "
                         f"(fitted: {list(groups)})")
    return np.searchsorted(np.asarray(groups), species).astype(np.int64)


def _ece(p: np.ndarray, errors: np.ndarray, atol: float) -> float:
    from mlipuq import metrics

    return float(metrics.ece(p, errors, atol))
