"""Clustering-enhanced local D-optimality (uq-ace paper; docs/methods.md).

The training environments are partitioned into clusters; one MaxVol active set is
built per (cluster, element), and an atom's grade is the minimum over the clusters
that hold its element: gamma_i = min_c gamma_i^(c). A point inside the global hull
but outside every cluster's hull is then flagged (Fig. 7c of the paper), while a
point inside any one cluster's hull is not.

Choices made here
-----------------
- Clustering runs on all kept training rows together (every element), on
  column-standardised features (zero mean, unit variance; constant columns kept
  as is) when ``standardize=True`` (default), so that no single feature dominates
  the Euclidean distance. gamma itself does not depend on the scaling.
- ``n_clusters="auto"``: k-means for k in ``auto_range`` (default 2..8) on a random
  subsample of at most ``auto_sample_size`` rows; the k with the largest silhouette
  score is kept.
- Small groups: a (cluster, element) group with fewer than ``min_cluster_size``
  rows (default: the feature dimension D, the minimum for a full-rank active set)
  is handled by ``small_clusters``:
  ``"merge"`` (default) moves each of its rows to the nearest (centroid distance
  in the clustering space) large-enough cluster of the same element;
  ``"project"`` keeps it with a rank-reduced active set (permissive: directions the
  few rows do not span are ignored, so its gamma is low for many atoms);
  ``"skip"`` drops it. With ``"merge"`` or ``"skip"``, an element that has no
  large-enough cluster at all gets all its rows merged into its largest cluster.
  One warning lists what was done.
- A clustered gamma is NOT always <= the global gamma (docs/doptimality.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from mlipuq.backends.base import ModelOutputs
from mlipuq.doptimality import (
    OUTLIER_FILTERS,
    ActiveSet,
    build_active_set,
    check_outputs_fit,
    check_predict_inputs,
    grade_result,
    prepare_training_inputs,
)
from mlipuq.exceptions import InputError
from mlipuq.maxvol import DEFAULT_BATCH_SIZE, extrapolation_grade
from mlipuq.method import UQMethod
from mlipuq.result import UQResult
from mlipuq.validation import check_is_fitted

CLUSTER_METHODS = ("kmeans", "minibatch_kmeans", "birch", "labels")
SMALL_CLUSTER_POLICIES = ("merge", "project", "skip")


class ClusteredDOptimalityEstimator(UQMethod):
    """One MaxVol active set per (cluster, element); gamma = min over clusters.

    Parameters
    ----------
    method : {"kmeans", "minibatch_kmeans", "birch", "labels"}
        How training rows are partitioned (scikit-learn), or ``"labels"`` to use
        the ``labels`` given to :meth:`fit` (e.g. ``AtomTable.atom_group``).
    n_clusters : int or "auto"
        Number of clusters (ignored for ``"labels"``); see the module notes for "auto".
    standardize : bool
        Z-score the feature columns before clustering.
    min_cluster_size : int, optional
        Smallest (cluster, element) group given its own active set (default D).
    small_clusters : {"merge", "project", "skip"}
        Policy for smaller groups (module notes).
    random_state : int
        Seed of the clustering and of the "auto" subsample.
    auto_range : tuple of int
        Inclusive range of k tried by ``n_clusters="auto"``.
    auto_sample_size : int
        Rows used for the silhouette scores of ``"auto"``.
    tol, max_iters, batch_size, outlier_filter, fence_k, threshold, select_threshold,
    stop_threshold, rank_rtol, grade_batch_size
        As in :class:`~mlipuq.doptimality.DOptimalityEstimator`.
    """

    name = "clustered_doptimality"
    display_name = "Clustered D-optimality"
    requires = ("descriptors",)

    def __init__(
        self,
        *,
        method: str = "kmeans",
        n_clusters: int | str = 8,
        standardize: bool = True,
        min_cluster_size: int | None = None,
        small_clusters: str = "merge",
        random_state: int = 0,
        auto_range: tuple[int, int] = (2, 8),
        auto_sample_size: int = 5000,
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
        self.method = method
        self.n_clusters = n_clusters
        self.standardize = standardize
        self.min_cluster_size = min_cluster_size
        self.small_clusters = small_clusters
        self.random_state = random_state
        self.auto_range = auto_range
        self.auto_sample_size = auto_sample_size
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
        if self.method not in CLUSTER_METHODS:
            raise InputError(f"method: expected one of {CLUSTER_METHODS}, got {self.method!r}")
        if self.small_clusters not in SMALL_CLUSTER_POLICIES:
            raise InputError(
                f"small_clusters: expected one of {SMALL_CLUSTER_POLICIES}, "
                f"got {self.small_clusters!r}"
            )
        if self.outlier_filter not in OUTLIER_FILTERS:
            raise InputError(
                f"outlier_filter: expected one of {OUTLIER_FILTERS}, got {self.outlier_filter!r}"
            )
        if self.method != "labels" and self.n_clusters != "auto":
            if not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 1:
                raise InputError(
                    f"n_clusters: expected a positive integer or 'auto', got {self.n_clusters!r}"
                )

    # ------------------------------------------------------------------ fit

    def fit(self, X: ModelOutputs, store: Any = None) -> ClusteredDOptimalityEstimator:
        """Cluster the training descriptors of ``X`` and build the active sets
        (``method="labels"`` needs :meth:`fit_arrays`); ``store`` is not used."""
        self.check_inputs(X)
        check_outputs_fit(self.outlier_filter)
        return self.fit_arrays(X.descriptors, X.species)

    def predict(self, X: ModelOutputs) -> UQResult:
        """Min-over-clusters extrapolation grade of the atoms and configurations of ``X``."""
        self.check_inputs(X)
        return self.predict_arrays(X.descriptors, X.species, config_index=X.config_index)

    @classmethod
    def _params_from_json(cls, params: dict) -> dict:
        params["auto_range"] = tuple(params["auto_range"])
        return params

    def fit_arrays(
        self,
        features: np.ndarray,
        species: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        force_errors: np.ndarray | None = None,
        force_norm: np.ndarray | None = None,
    ) -> ClusteredDOptimalityEstimator:
        """Cluster the training rows and build one active set per (cluster, element).

        Parameters
        ----------
        features : ndarray of float, shape (N, D)
        species : array-like, shape (N,)
        labels : array-like, shape (N,), optional
            Group of each training atom; required for ``method="labels"``.
        force_errors, force_norm : ndarray, shape (N,), optional
            For the outlier filter (eV/Å), as in ``DOptimalityEstimator.fit``.

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
        assignment, names, space = self._cluster(features, labels, keep)
        features, species = features[keep], species[keep]
        min_size = self.min_cluster_size or features.shape[1]
        groups, notes = _assign_groups(assignment, species, space, min_size, self.small_clusters)
        sets, reduced = self._build_sets(features, species, groups)
        messages = notes + ([f"rank-reduced active sets for {reduced}"] if reduced else [])
        if messages:
            warnings.warn("clustered D-optimality: " + "; ".join(messages), stacklevel=2)
        self._set_active_sets(sets, names, features.shape[1])
        self.group_sizes_ = {f"{c}/{el}": int(len(rows)) for (c, el), rows in groups.items()}
        return self

    def _cluster(
        self, features: np.ndarray, labels: np.ndarray | None, keep: np.ndarray
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Cluster id per kept row, cluster names, and the clustering space (kept rows)."""
        space = features[keep]
        if self.standardize:
            std = space.std(axis=0)
            std[std == 0] = 1.0
            space = (space - space.mean(axis=0)) / std
        if self.method == "labels":
            if labels is None:
                raise InputError("labels: required by method='labels' (one label per atom)")
            labels = np.asarray(labels).astype(str)
            if labels.ndim != 1 or len(labels) != len(keep):
                raise InputError(f"labels: expected {len(keep)} labels, got shape {labels.shape}")
            names, assignment = np.unique(labels[keep], return_inverse=True)
            return assignment.astype(np.int64), [str(n) for n in names], space
        n_clusters = self._resolve_n_clusters(space)
        if n_clusters > len(space):
            raise InputError(f"n_clusters: {n_clusters} clusters for only {len(space)} rows")
        assignment = _run_clustering(self.method, space, n_clusters, self.random_state)
        used, assignment = np.unique(assignment, return_inverse=True)
        return assignment.astype(np.int64), [str(i) for i in range(len(used))], space

    def _resolve_n_clusters(self, space: np.ndarray) -> int:
        if self.n_clusters != "auto":
            return int(self.n_clusters)
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        rng = np.random.default_rng(self.random_state)
        sample = space
        if len(space) > self.auto_sample_size:
            sample = space[rng.choice(len(space), self.auto_sample_size, replace=False)]
        low, high = int(self.auto_range[0]), int(self.auto_range[1])
        high = min(high, len(sample) - 1)
        if high < max(low, 2):
            return 1
        scores = {}
        for k in range(max(low, 2), high + 1):
            fitted = KMeans(n_clusters=k, n_init=3, random_state=self.random_state).fit(sample)
            if len(np.unique(fitted.labels_)) > 1:
                scores[k] = silhouette_score(sample, fitted.labels_)
        self.auto_scores_ = {int(k): float(v) for k, v in scores.items()}
        return max(scores, key=scores.get) if scores else 1

    def _build_sets(
        self, features: np.ndarray, species: np.ndarray, groups: dict[tuple[int, str], np.ndarray]
    ) -> tuple[dict[tuple[int, str], ActiveSet], list[str]]:
        sets: dict[tuple[int, str], ActiveSet] = {}
        reduced = []
        for (cluster, element), rows in sorted(groups.items()):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*numerical rank.*")
                built = build_active_set(
                    features[rows],
                    tol=self.tol,
                    max_iters=self.max_iters,
                    batch_size=self.batch_size,
                    rank_rtol=self.rank_rtol,
                    warn=False,
                )
            if built.projection is not None:
                reduced.append(f"{cluster}/{element} (rank {built.projection.shape[1]})")
            sets[(cluster, element)] = built
        return sets, reduced

    def _set_active_sets(
        self, sets: dict[tuple[int, str], ActiveSet], names: list[str], n_features: int
    ) -> None:
        self.n_features_in_ = int(n_features)
        self.cluster_names_ = list(names)
        self.n_clusters_ = len(names)
        self.elements_ = sorted({el for _, el in sets})
        self.active_sets_ = {key: s.rows for key, s in sets.items()}
        self.active_inverse_ = {key: s.inverse for key, s in sets.items()}
        self.projections_ = {k: s.projection for k, s in sets.items() if s.projection is not None}
        self.n_swaps_ = {f"{c}/{el}": s.n_swaps for (c, el), s in sets.items()}
        self.threshold_ = float(self.threshold)
        self.threshold_source_ = "parameter threshold"

    # ------------------------------------------------------------------ predict

    def gamma(self, features: np.ndarray, species: np.ndarray) -> np.ndarray:
        """Per-atom min-over-clusters extrapolation grade gamma, shape (N,) (unitless)."""
        return self.gamma_and_cluster(features, species)[0]

    def gamma_and_cluster(
        self, features: np.ndarray, species: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom min-over-clusters gamma (N,) and the arg-min cluster id (N,)."""
        check_is_fitted(self, "active_inverse_")
        features, species = check_predict_inputs(
            features, species, self.n_features_in_, self.elements_
        )
        gamma = np.empty(len(species))
        nearest = np.empty(len(species), dtype=np.int64)
        for element in np.unique(species):
            index = np.flatnonzero(species == element)
            rows = None if len(index) == len(species) else index  # gathered chunk by chunk
            clusters = sorted(c for c, el in self.active_inverse_ if el == element)
            grades = np.stack(
                [
                    extrapolation_grade(
                        features,
                        self.active_inverse_[(c, str(element))],
                        batch_size=self.grade_batch_size,
                        rows=rows,
                    )
                    for c in clusters
                ],
                axis=1,
            )
            best = grades.argmin(axis=1)
            gamma[index] = grades[np.arange(len(best)), best]
            nearest[index] = np.asarray(clusters)[best]
        return gamma, nearest

    def predict_arrays(
        self, features: np.ndarray, species: np.ndarray, *, config_index: np.ndarray | None = None
    ) -> UQResult:
        """Min-over-clusters extrapolation grade per atom and per configuration.

        Returns
        -------
        UQResult
            ``method="clustered_doptimality"``, ``atom_uncertainty`` = gamma
            (unitless), extras ``"gamma"`` and ``"nearest_cluster"`` (index into
            ``cluster_names_`` of the cluster giving the minimum).
        """
        gamma, nearest = self.gamma_and_cluster(features, species)
        return grade_result(
            self.name,
            gamma,
            config_index,
            threshold=self.threshold_,
            select_threshold=self.select_threshold,
            stop_threshold=self.stop_threshold,
            extras={"nearest_cluster": nearest},
        )

    # ------------------------------------------------------------------ persistence

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        check_is_fitted(self, "active_inverse_")
        arrays: dict[str, np.ndarray] = {}
        for (cluster, element), rows in self.active_sets_.items():
            prefix = f"c{cluster}/{element}"
            arrays[f"{prefix}/active_set"] = rows
            arrays[f"{prefix}/inverse"] = self.active_inverse_[(cluster, element)]
            if (cluster, element) in self.projections_:
                arrays[f"{prefix}/projection"] = self.projections_[(cluster, element)]
        state = {
            "n_features_in": self.n_features_in_,
            "cluster_names": self.cluster_names_,
            "groups": [[int(c), el] for c, el in self.active_sets_],
            "n_swaps": self.n_swaps_,
            "group_sizes": getattr(self, "group_sizes_", {}),
            "outlier_fences": getattr(self, "outlier_fences_", {}),
            "threshold": self.threshold_,
            "threshold_source": self.threshold_source_,
        }
        return state, arrays

    def _set_state(self, state: dict, arrays: Any, directory: Any) -> None:
        sets = {}
        for cluster, element in state["groups"]:
            prefix = f"c{cluster}/{element}"
            sets[(int(cluster), element)] = ActiveSet(
                arrays[f"{prefix}/active_set"],
                arrays[f"{prefix}/inverse"],
                arrays.get(f"{prefix}/projection"),
                int(state["n_swaps"].get(f"{cluster}/{element}", 0)),
            )
        self._set_active_sets(sets, state["cluster_names"], state["n_features_in"])
        self.group_sizes_ = state.get("group_sizes", {})
        self.outlier_fences_ = state.get("outlier_fences", {})
        self.threshold_ = float(state["threshold"])
        self.threshold_source_ = state["threshold_source"]


# ---------------------------------------------------------------------- helpers


def _run_clustering(method: str, space: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster label per row with scikit-learn."""
    if n_clusters == 1:
        return np.zeros(len(space), dtype=np.int64)
    from sklearn.cluster import Birch, KMeans, MiniBatchKMeans

    if method == "kmeans":
        model = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
    elif method == "minibatch_kmeans":
        model = MiniBatchKMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
    else:
        model = Birch(n_clusters=n_clusters)
    return np.asarray(model.fit_predict(space), dtype=np.int64)


def _assign_groups(
    assignment: np.ndarray,
    species: np.ndarray,
    space: np.ndarray,
    min_size: int,
    policy: str,
) -> tuple[dict[tuple[int, str], np.ndarray], list[str]]:
    """Row indices per (cluster, element) after applying the small-group policy."""
    groups: dict[tuple[int, str], np.ndarray] = {}
    notes: list[str] = []
    for element in sorted(set(species.tolist())):
        rows = np.flatnonzero(species == element)
        clusters = assignment[rows]
        ids, counts = np.unique(clusters, return_counts=True)
        large = ids[counts >= min_size]
        small = ids[counts < min_size]
        if small.size and policy != "project":
            listed = ", ".join(
                f"{c}/{element} ({n} rows)"
                for c, n in zip(ids, counts, strict=True)
                if n < min_size
            )
            if large.size == 0:
                target = int(ids[np.argmax(counts)])
                clusters = np.full_like(clusters, target)
                notes.append(f"no cluster has >= {min_size} {element} rows: merged into {target}")
            elif policy == "merge":
                clusters = _merge_small(clusters, space[rows], small, large)
                notes.append(f"merged small groups {listed} into the nearest large cluster")
            else:
                keep = np.isin(clusters, large)
                rows, clusters = rows[keep], clusters[keep]
                notes.append(f"skipped small groups {listed}")
        elif small.size:
            listed = ", ".join(f"{c}/{element}" for c in small)
            notes.append(f"kept small groups {listed} with projected active sets")
        for cluster in np.unique(clusters):
            groups[(int(cluster), element)] = rows[clusters == cluster]
    return groups, notes


def _merge_small(
    clusters: np.ndarray, space: np.ndarray, small: np.ndarray, large: np.ndarray
) -> np.ndarray:
    """Move rows of small clusters to the large cluster with the nearest centroid."""
    centroids = np.stack([space[clusters == c].mean(axis=0) for c in large])
    moved = np.isin(clusters, small)
    distance = ((space[moved, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    out = clusters.copy()
    out[moved] = large[distance.argmin(axis=1)]
    return out
