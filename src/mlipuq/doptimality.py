"""D-optimality: MaxVol active sets per element and the extrapolation grade gamma.

For each element s the training feature rows X_s (n_s, D) (ACE B-projections, or
the invariant node features that feed a network's linear readout) are reduced to
an active set A_s of (locally) maximal volume by :func:`mlipuq.maxvol.maxvol`.
A new atom x of element s gets gamma = max_j |(x A_s^{-1})_j| (unitless):
gamma <= 1 interpolation, > 1 extrapolation; gamma_cfg = max over the atoms of a
configuration. Common active-learning thresholds: select above ~1.5-5, stop a
simulation above ~10-25 (docs/methods.md).

Rank deficiency (fewer rows than features, dependent features): the rows are
projected onto their top-r singular directions, a warning is issued, and the
element's active set has r < D rows; components of a new atom outside the span of
the training rows do not count towards gamma.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlipuq.atom_table import config_max
from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.maxvol import (
    DEFAULT_BATCH_SIZE,
    active_set_inverse,
    extrapolation_grade_by_group,
    maxvol,
)
from mlipuq.method import UQMethod
from mlipuq.result import UQResult
from mlipuq.thresholds import tukey_fence
from mlipuq.validation import (
    as_species,
    check_array,
    check_config_index,
    check_consistent_length,
    check_feature_dim,
    check_is_fitted,
)

OUTLIER_FILTERS = (None, "force_error", "force_norm")


@dataclass(frozen=True)
class ActiveSet:
    """One element's (or one cluster-element pair's) active set.

    Attributes
    ----------
    rows : ndarray, shape (r, D)
        Active-set feature rows (r = D unless rank-reduced).
    inverse : ndarray, shape (D, r)
        gamma = max_j |(x @ inverse)_j|.
    projection : ndarray, shape (D, r), or None
        Set when the training rows were rank-reduced.
    n_swaps : int
        MaxVol swaps performed.
    """

    rows: np.ndarray
    inverse: np.ndarray
    projection: np.ndarray | None
    n_swaps: int


def build_active_set(
    features: np.ndarray,
    *,
    tol: float = 1.01,
    max_iters: int | None = None,
    batch_size: int | None = None,
    rank_rtol: float = 1e-10,
    name: str = "features",
    warn: bool = True,
) -> ActiveSet:
    """Run MaxVol on one element's (n, D) training rows and invert the active set.

    Parameters
    ----------
    features : ndarray, shape (n, D)
    tol, max_iters, batch_size, rank_rtol
        Passed to :func:`mlipuq.maxvol.maxvol`.
    name : str
        Used in the rank-reduction warning (e.g. ``"features of element Cu"``).
    warn : bool
        Warn when rank-reduced.

    Returns
    -------
    ActiveSet
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = maxvol(
                features, tol=tol, max_iters=max_iters, batch_size=batch_size, rank_rtol=rank_rtol
            )
        except InputError as exc:
            raise InputError(f"{name}: {str(exc).removeprefix('features: ')}") from None
    for item in caught:
        if warn or "rank" not in str(item.message):
            message = str(item.message).removeprefix("features: ")
            warnings.warn(f"{name}: {message}", item.category, stacklevel=2)
    rows = np.array(features[result.indices], dtype=np.float64)
    inverse = active_set_inverse(rows, result.projection)
    return ActiveSet(rows, inverse, result.projection, result.n_swaps)


def prepare_training_inputs(
    features: np.ndarray,
    species: np.ndarray,
    *,
    outlier_filter: str | None,
    fence_k: float,
    force_errors: np.ndarray | None,
    force_norm: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float], dict[str, int]]:
    """Validate training inputs and apply the outlier filter.

    Returns
    -------
    features (N, D), species (N,), keep (N,) bool, fences per element (eV/Å),
    number of dropped atoms per element.
    """
    features = check_array(features, "features", ndim=2)
    species = as_species(species)
    check_consistent_length(features=features, species=species)
    keep = np.ones(len(species), dtype=bool)
    if outlier_filter is None:
        return features, species, keep, {}, {}
    name = "force_errors" if outlier_filter == "force_error" else "force_norm"
    values = force_errors if outlier_filter == "force_error" else force_norm
    if values is None:
        raise InputError(f"{name}: required by outlier_filter={outlier_filter!r}")
    values = check_array(values, name, ndim=1, nonnegative=True)
    check_consistent_length(features=features, **{name: values})
    keep, fences = outlier_mask(species, values, fence_k)
    dropped = {el: int(np.count_nonzero(~keep & (species == el))) for el in fences}
    return features, species, keep, fences, dropped


def check_predict_inputs(
    features: np.ndarray, species: np.ndarray, n_features: int, elements: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate prediction inputs against the fitted feature dim and elements."""
    features = check_array(features, "features", ndim=2)
    species = as_species(species)
    check_consistent_length(features=features, species=species)
    check_feature_dim(features, n_features, "features")
    unknown = sorted(set(np.unique(species).tolist()) - set(elements))
    if unknown:
        raise InputError(f"species: element(s) {unknown} have no active set (fitted: {elements})")
    return features, species


def check_outputs_fit(outlier_filter: str | None) -> None:
    """``fit(X)`` has no reference forces: an outlier filter needs ``fit_arrays``."""
    if outlier_filter is not None:
        raise InputError(f"outlier_filter={outlier_filter!r} needs the training atoms' "
                         "reference force errors or norms: use fit_arrays(..., "
                         "force_errors=..., force_norm=...)")


def outlier_mask(
    species: np.ndarray, values: np.ndarray, fence_k: float
) -> tuple[np.ndarray, dict[str, float]]:
    """Per element, keep rows with ``values <= Q3 + fence_k * IQR`` (pacemaker's filter).

    Returns
    -------
    keep : ndarray of bool, shape (N,)
    fences : dict of str -> float
        The fence per element, in the unit of ``values`` (eV/Å for forces).
    """
    keep = np.ones(len(species), dtype=bool)
    fences: dict[str, float] = {}
    for element in np.unique(species):
        mask = species == element
        fence = tukey_fence(values[mask], fence_k)
        fences[str(element)] = fence
        keep[mask] = values[mask] <= fence
    return keep, fences


class DOptimalityEstimator(UQMethod):
    """Per-element MaxVol active sets; ``predict`` returns the extrapolation grade gamma.

    Parameters
    ----------
    tol : float
        MaxVol tolerance (pacemaker: 1.01): training rows end with gamma <= tol.
    max_iters : int, optional
        Cap on MaxVol swaps per element (default: none).
    batch_size : int, optional
        Memory-bounded MaxVol over chunks of this many rows (for 10^5-10^7 atoms);
        in :meth:`fit_distributed`, the rows per chunk of in-memory descriptors.
    outlier_filter : {None, "force_error", "force_norm"}
        Drop training atoms above the per-element Tukey fence of their force error
        (pacemaker's ``pace_activeset``) or force norm before MaxVol.
    fence_k : float
        Fence multiplier (Q3 + fence_k * IQR).
    threshold : float
        Atoms / configurations with gamma > threshold are flagged (1 = edge of the set).
    select_threshold, stop_threshold : float, optional
        Active-learning levels (e.g. 2 and 10): reported as boolean extras.
    rank_rtol : float
        Relative singular-value cut for the numerical rank (see :mod:`mlipuq.maxvol`).
    grade_batch_size : int
        Rows per chunk when computing gamma.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(50, 3))
    >>> est = DOptimalityEstimator().fit_arrays(x, ["Cu"] * 50)
    >>> bool(est.predict_arrays(x, ["Cu"] * 50).atom_uncertainty.max() <= 1.01)
    True
    """

    name = "doptimality"
    display_name = "D-optimality"
    requires = ("descriptors",)

    def __init__(
        self,
        *,
        tol: float = 1.01,
        max_iters: int | None = None,
        batch_size: int | None = None,
        outlier_filter: str | None = None,
        fence_k: float = 1.5,
        threshold: float = 1.0,
        select_threshold: float | None = None,
        stop_threshold: float | None = None,
        rank_rtol: float = 1e-10,
        grade_batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.tol = tol
        self.max_iters = max_iters
        self.batch_size = batch_size
        self.outlier_filter = outlier_filter
        self.fence_k = fence_k
        self.threshold = threshold
        self.select_threshold = select_threshold
        self.stop_threshold = stop_threshold
        self.rank_rtol = rank_rtol
        self.grade_batch_size = grade_batch_size

    def _check_params(self) -> None:
        if self.outlier_filter not in OUTLIER_FILTERS:
            raise InputError(
                f"outlier_filter: expected one of {OUTLIER_FILTERS}, got {self.outlier_filter!r}"
            )
        if self.tol < 1.0:
            raise InputError(f"tol: expected a value >= 1, got {self.tol}")

    # ------------------------------------------------------------------ fit

    def fit(self, X: ModelOutputs, store: Any = None) -> DOptimalityEstimator:
        """Build the active sets from the training descriptors of ``X``
        (``descriptors`` (N, D), ``species``); ``store`` is not used."""
        self.check_inputs(X)
        check_outputs_fit(self.outlier_filter)
        return self.fit_arrays(X.descriptors, X.species)

    def predict(self, X: ModelOutputs) -> UQResult:
        """Extrapolation grade of the atoms and configurations of ``X``."""
        self.check_inputs(X)
        return self.predict_arrays(X.descriptors, X.species, config_index=X.config_index)

    def fit_arrays(
        self,
        features: np.ndarray,
        species: np.ndarray,
        *,
        force_errors: np.ndarray | None = None,
        force_norm: np.ndarray | None = None,
    ) -> DOptimalityEstimator:
        """Build one active set per element.

        Parameters
        ----------
        features : ndarray of float, shape (N, D)
            Training-atom feature rows.
        species : array-like, shape (N,)
            Chemical symbols or atomic numbers.
        force_errors : ndarray, shape (N,), optional
            |F_ref - F_pred| per atom in eV/Å (needed for ``outlier_filter="force_error"``).
        force_norm : ndarray, shape (N,), optional
            |F_ref| per atom in eV/Å (needed for ``outlier_filter="force_norm"``).

        Returns
        -------
        self
        """
        self._check_params()
        features, species, keep, self.outlier_fences_, self.n_outliers_ = prepare_training_inputs(
            features,
            species,
            outlier_filter=self.outlier_filter,
            fence_k=self.fence_k,
            force_errors=force_errors,
            force_norm=force_norm,
        )
        self.__dict__.pop("two_level_", None)  # from an earlier fit_distributed
        sets: dict[str, ActiveSet] = {}
        for element in sorted(set(species.tolist())):
            rows = features[(species == element) & keep]
            sets[element] = build_active_set(
                rows,
                tol=self.tol,
                max_iters=self.max_iters,
                batch_size=self.batch_size,
                rank_rtol=self.rank_rtol,
                name=f"features of element {element}",
            )
        self._set_active_sets(sets, features.shape[1])
        self.n_train_atoms_ = {el: int(np.count_nonzero(species == el)) for el in sets}
        return self

    def fit_distributed(
        self, X: ModelOutputs, store: Any = None, client: Any = None
    ) -> DOptimalityEstimator:
        """:meth:`fit` with two-level MaxVol on a Dask cluster; returns self.

        Level 1 runs MaxVol per element on each row chunk of ``X.descriptors`` (a
        task per chunk on the workers), level 2 on the union of the chunks' active
        rows, then the training rows above ``tol`` are merged in until none is
        (:func:`mlipuq.distributed.doptimality.two_level_active_sets`). The fitted
        state and save format are :meth:`fit`'s; with a single chunk the active sets
        are the single pass's. ``store`` is not used. Also sets ``two_level_``
        (per element: chunks, candidates, refinement rounds, largest training
        gamma, converged; saved, and named by :meth:`summary`).

        Parameters
        ----------
        X : ModelOutputs
            ``descriptors`` (N, D): a ``dask.array.Array`` chunked by rows, or an
            array split into chunks of ``batch_size`` rows (default 65536);
            ``species`` (N,) in memory.
        store : ignored
        client : distributed.Client or None
            None: :meth:`fit` in this process.

        Returns
        -------
        self
        """
        if client is None:
            return super().fit_distributed(X, store, client)
        from mlipuq.distributed.doptimality import two_level_active_sets

        self._check_params()
        if not isinstance(X, ModelOutputs):
            raise InputError(f"{self.name}: expected ModelOutputs as X, got {type(X).__name__}")
        X.require(*self.requires, method=self.name)
        check_outputs_fit(self.outlier_filter)
        species = as_species(X.species)
        found = two_level_active_sets(
            X.descriptors, species, client, tol=self.tol, max_iters=self.max_iters,
            rank_rtol=self.rank_rtol, chunk_rows=self.batch_size,
        )
        self._set_active_sets({el: f.active for el, f in found.items()}, X.descriptors.shape[1])
        self.outlier_fences_, self.n_outliers_ = {}, {}
        self.n_train_atoms_ = {el: f.n_rows for el, f in found.items()}
        self.two_level_ = {el: {"n_chunks": f.n_chunks, "n_candidates": f.n_candidates,
                                "n_rounds": f.n_rounds, "max_gamma": f.max_gamma,
                                "converged": f.converged} for el, f in found.items()}
        return self

    def predict_distributed(
        self, X: ModelOutputs, client: Any, *, out: Any = None
    ) -> UQResult:
        """:meth:`predict` with gamma computed per row chunk on a Dask cluster.

        Parameters
        ----------
        X : ModelOutputs
            ``descriptors`` (N, D) as a row-chunked ``dask.array.Array`` (or an
            array, split into chunks of 65536 rows).
        client : distributed.Client
        out : path-like, optional
            Also keep gamma as a chunked result there
            (:func:`mlipuq.distributed.descriptors.save_chunked`).

        Returns
        -------
        UQResult
            As :meth:`predict` (gamma gathered into memory, N floats).
        """
        from mlipuq.distributed.doptimality import extrapolation_grades

        check_is_fitted(self, "active_inverse_")
        if not isinstance(X, ModelOutputs):
            raise InputError(f"{self.name}: expected ModelOutputs as X, got {type(X).__name__}")
        X.require(*self.requires, method=self.name)
        species = as_species(X.species)
        unknown = sorted(set(np.unique(species).tolist()) - set(self.elements_))
        if unknown:
            raise InputError(f"species: element(s) {unknown} have no active set "
                             f"(fitted: {self.elements_})")
        gamma = extrapolation_grades(X.descriptors, species, self.active_inverse_, client,
                                     out=out, batch_size=self.grade_batch_size)
        return grade_result(self.name, np.asarray(gamma), X.config_index,
                            threshold=self.threshold_, select_threshold=self.select_threshold,
                            stop_threshold=self.stop_threshold)

    def _set_active_sets(self, sets: dict[str, ActiveSet], n_features: int) -> None:
        self.n_features_in_ = int(n_features)
        self.elements_ = sorted(sets)
        self.active_sets_ = {el: s.rows for el, s in sets.items()}
        self.active_inverse_ = {el: s.inverse for el, s in sets.items()}
        self.projections_ = {el: s.projection for el, s in sets.items() if s.projection is not None}
        self.n_swaps_ = {el: s.n_swaps for el, s in sets.items()}
        self.threshold_ = float(self.threshold)
        self.threshold_source_ = "parameter threshold"

    # ------------------------------------------------------------------ predict

    def gamma(self, features: np.ndarray, species: np.ndarray) -> np.ndarray:
        """Per-atom extrapolation grade gamma, shape (N,) (unitless)."""
        check_is_fitted(self, "active_inverse_")
        features, species = check_predict_inputs(
            features, species, self.n_features_in_, self.elements_
        )
        return extrapolation_grade_by_group(
            features, species, self.active_inverse_, batch_size=self.grade_batch_size
        )

    def predict_arrays(
        self, features: np.ndarray, species: np.ndarray, *, config_index: np.ndarray | None = None
    ) -> UQResult:
        """Extrapolation grade per atom and per configuration.

        Parameters
        ----------
        features : ndarray of float, shape (N, D)
        species : array-like, shape (N,)
        config_index : ndarray of int, shape (N,), optional
            Configuration of each atom; gamma_cfg = max over its atoms.

        Returns
        -------
        UQResult
            ``method="doptimality"``, ``atom_uncertainty`` = gamma (unitless),
            ``config_uncertainty`` = gamma_cfg, flags ``gamma > threshold_`` (the
            ``threshold`` parameter until :meth:`set_threshold` / :meth:`calibrate`);
            extras ``"gamma"``, and with select/stop thresholds ``"select"``,
            ``"stop"``, ``"config_select"``, ``"config_stop"``.
        """
        gamma = self.gamma(features, species)
        return grade_result(
            self.name,
            gamma,
            config_index,
            threshold=self.threshold_,
            select_threshold=self.select_threshold,
            stop_threshold=self.stop_threshold,
        )

    # ------------------------------------------------------------------ persistence

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        check_is_fitted(self, "active_inverse_")
        arrays = _element_arrays("", self.active_sets_, self.active_inverse_, self.projections_)
        state = {
            "n_features_in": self.n_features_in_,
            "elements": self.elements_,
            "n_swaps": self.n_swaps_,
            "outlier_fences": getattr(self, "outlier_fences_", {}),
            "n_outliers": getattr(self, "n_outliers_", {}),
            "n_train_atoms": getattr(self, "n_train_atoms_", {}),
            "threshold": self.threshold_,
            "threshold_source": self.threshold_source_,
            "two_level": getattr(self, "two_level_", None),
        }
        return state, arrays

    def summary(self) -> str:
        """:meth:`UQMethod.summary`, saying when the active sets come from a two-level
        MaxVol over several chunks (a different local maximum than the single pass)."""
        text = super().summary()
        chunked = {el: info for el, info in (getattr(self, "two_level_", None) or {}).items()
                   if info.get("n_chunks", 1) > 1}
        if chunked:
            text += "; active sets from two-level MaxVol (" + ", ".join(
                f"{el}: {info['n_chunks']} chunks" for el, info in sorted(chunked.items())) + ")"
        return text

    def _set_state(self, state: dict, arrays: Any, directory: Any) -> None:
        sets = {
            el: ActiveSet(
                arrays[f"{el}/active_set"],
                arrays[f"{el}/inverse"],
                arrays.get(f"{el}/projection"),
                int(state["n_swaps"].get(el, 0)),
            )
            for el in state["elements"]
        }
        self._set_active_sets(sets, state["n_features_in"])
        self.outlier_fences_ = state.get("outlier_fences", {})
        self.n_outliers_ = state.get("n_outliers", {})
        self.n_train_atoms_ = state.get("n_train_atoms", {})
        self.threshold_ = float(state["threshold"])
        self.threshold_source_ = state["threshold_source"]
        if state.get("two_level"):
            self.two_level_ = state["two_level"]

    @classmethod
    def from_active_sets(
        cls,
        active_sets: dict[str, np.ndarray],
        *,
        inverses: dict[str, np.ndarray] | None = None,
        **params: object,
    ) -> DOptimalityEstimator:
        """Build a fitted estimator from given active sets (e.g. a pacemaker ``.asi`` file).

        Parameters
        ----------
        active_sets : dict of str -> ndarray, shape (r_s, D)
            Active-set rows per element symbol.
        inverses : dict of str -> ndarray, shape (D, r_s), optional
            Their (pseudo-)inverses if already known (pacemaker stores ``pinv``);
            computed with :func:`mlipuq.maxvol.active_set_inverse` otherwise.
        **params
            Constructor parameters (``threshold``, ``select_threshold``, ...).
        """
        if not active_sets:
            raise InputError("active_sets: empty, expected one (r, D) array per element")
        est = cls(**params)
        sets: dict[str, ActiveSet] = {}
        dims = set()
        for element, rows in active_sets.items():
            symbol = str(as_species([element], "active_sets")[0])
            rows = check_array(rows, f"active set of {symbol}", ndim=2)
            dims.add(rows.shape[1])
            if inverses is not None and element in inverses:
                inverse = check_array(inverses[element], f"inverse of {symbol}", ndim=2)
                if inverse.shape != rows.shape[::-1]:
                    raise InputError(
                        f"inverse of {symbol}: expected shape {rows.shape[::-1]}, "
                        f"got {inverse.shape}"
                    )
            else:
                inverse = active_set_inverse(rows)
            sets[symbol] = ActiveSet(rows, inverse, None, 0)
        if len(dims) > 1:
            raise InputError(f"active_sets: elements have different feature dims {sorted(dims)}")
        est._set_active_sets(sets, dims.pop())
        est.outlier_fences_, est.n_outliers_, est.n_train_atoms_ = {}, {}, {}
        return est


# ---------------------------------------------------------------------- shared helpers


def grade_result(
    method: str,
    gamma: np.ndarray,
    config_index: np.ndarray | None,
    *,
    threshold: float,
    select_threshold: float | None,
    stop_threshold: float | None,
    extras: dict[str, np.ndarray] | None = None,
) -> UQResult:
    """Assemble a :class:`UQResult` from per-atom gamma (shared by the D-optimality estimators)."""
    extras = {"gamma": gamma, **(extras or {})}
    gamma_cfg = None
    if config_index is not None:
        config_index = check_config_index(config_index, len(gamma))
        gamma_cfg = config_max(gamma, config_index)
    for name, level in (("select", select_threshold), ("stop", stop_threshold)):
        if level is None:
            continue
        extras[name] = gamma > level
        if gamma_cfg is not None:
            extras[f"config_{name}"] = gamma_cfg > level
    return UQResult(
        method=method,
        atom_uncertainty=gamma,
        config_uncertainty=gamma_cfg,
        config_index=config_index,
        atom_flags=gamma > threshold,
        config_flags=None if gamma_cfg is None else gamma_cfg > threshold,
        threshold=float(threshold),
        unit="",
        extras=extras,
    )


def _element_arrays(
    prefix: str,
    active_sets: dict[str, np.ndarray],
    inverses: dict[str, np.ndarray],
    projections: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for element, rows in active_sets.items():
        arrays[f"{prefix}{element}/active_set"] = rows
        arrays[f"{prefix}{element}/inverse"] = inverses[element]
        if element in projections:
            arrays[f"{prefix}{element}/projection"] = projections[element]
    return arrays
