"""LTAU: transfer per-atom training error distributions to new atoms by k-NN search.

:class:`LTAUEstimator` keeps, for every training atom i, the histogram of its logged
force errors (:class:`~mlipuq.distributions.ErrorDistributions`) and a FAISS index of
the training descriptors (one index per element by default). For a test atom j with
k nearest training atoms N_j (same element) at mean distance d_j::

    z_j = d_j / d_ref                                    (normalised k-NN distance)
    z~_j = root mean square of z over j's configuration
    s_j = s * max(1, z~_j) ** beta      (transfer="distance", the default)
    s_j = s                             (transfer="mean", the paper)
    p_j = (1/k) * sum_{i in N_j} CDF_i((atol + rtol * |F_ref,i|) / s_j)

and the uncertainty is ``1 - p_j`` (docs/methods.md). ``p_j`` is the probability
that atom j's force error is at most ``atol`` (eV/Å) under the model "test errors
are ``s_j`` times the neighbours' training errors".

- ``d_ref`` (per index) is the median over training atoms of their own mean k-NN
  distance to the training atoms of *other* configurations (leave one configuration
  out), so an in-domain test atom has z of order 1 whatever the descriptor units.
- The configuration-level z~ carries what one atom's environment misses: in a
  configuration far from training (hotter MD, a distorted molecule) the errors of
  all atoms grow, also of those whose own environment looks familiar
  (``distance_scope="atom"`` uses z_j alone, ``"both"`` the larger of z_j and z~).
  Without ``config_index`` the atoms passed to :meth:`LTAUEstimator.predict` form
  one configuration (one frame in the ASE calculator).
- ``beta`` (``distance_power``) makes the assumed error grow with the distance to the
  training set: an atom twice as far from its neighbours as training atoms are from
  theirs gets errors ``2 ** beta`` times larger. This is what lets an atom far from
  every training atom get a low p (the plain mean of the paper gives it its
  neighbours' p whatever the distance). With ``distance_power="auto"`` (default) beta
  is 1 until :meth:`LTAUEstimator.calibrate` chooses it on in-domain held-out atoms
  (lowest Brier score of p for the event "error <= atol" over a grid 0 ... 2);
  ``docs/ltau.md`` gives the measurements behind this.
- ``s`` is the calibration scale factor: 1 until :meth:`LTAUEstimator.calibrate`
  fits it on in-domain held-out atoms (then ``scale_``), or given per call.

With ``rtol > 0`` the tolerance of each neighbour uses *that training atom's*
reference force norm |F_ref,i| (the test atom's reference force is unknown at
inference), so ``rtol`` needs ``force_norm`` (or a store whose atom table has it).

The result also carries the expected error ``s_j * mean_i sum_b mass_ib * mid_b`` in
eV/Å, the mean Euclidean k-NN distance d_j (descriptor units) and z_j, a model-free
out-of-domain score.

``k`` larger than the training atoms of an element is clamped to that count with a
``UserWarning`` (the neighbours of such an element are all its training atoms).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod
from mlipuq.result import UQResult
from mlipuq.validation import (
    as_species,
    check_array,
    check_config_index,
    check_consistent_length,
    check_feature_dim,
    check_is_fitted,
)

logger = logging.getLogger(__name__)

LEGACY_FORMAT_NAME = "mlipuq.ltau"
"""Format of LTAU directories written by mlipuq 0.1 (read by :meth:`LTAUEstimator.load`)."""

KNN_DISTANCE = "knn_distance"
"""Name of LTAU's normalised k-NN distance as an out-of-domain score of its own."""
ALL_ELEMENTS = "all"
"""Group name of the single index when ``per_element=False``."""

MASS_FILE = "mass.npy"
"""The (N, B) mass as its own memory-mapped .npy (estimators fitted on a Dask cluster)."""

_SEARCH_RESULTS = 1 << 22  # (query, neighbour) results held at once by the reference search
TRANSFERS = ("distance", "mean")
"""How neighbours' distributions become a test atom's: distance-aware or the plain mean."""
DISTANCE_SCOPES = ("configuration", "atom", "both")
"""Whose normalised distance stretches an atom's distribution (see ``distance_scope``)."""
DEFAULT_DISTANCE_POWER = 1.0
"""beta of the distance-aware transfer before calibration chooses one (docs/ltau.md)."""
DISTANCE_POWER_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
"""The betas :meth:`LTAUEstimator.calibrate` chooses from with ``distance_power="auto"``."""
CONFIG_AGGREGATE = "mean"
"""LTAU's configuration uncertainty: the mean of 1 - p over the atoms (the expected share
of atoms whose error exceeds atol; the max saturates at 1 in large configurations)."""
DEFAULT_FPR = 0.05
"""In-domain false-positive rate (per configuration) of the fitted flag threshold."""


def _check_store_order(table: Any, symbols: np.ndarray) -> None:
    """InputError unless ``symbols`` (N,) are the store's atom table, atom by atom."""
    check_consistent_length(store=np.empty(table.n_atoms), species=symbols)
    if not np.array_equal(table.species, symbols):
        first = int(np.flatnonzero(table.species != symbols)[0])
        raise InputError(
            f"species: atom {first} is {symbols[first]} but the store's atom table "
            f"has {table.species[first]} (descriptors not in the store's atom order?)"
        )


class LTAUEstimator(UQMethod):
    """LTAU uncertainty from training error distributions and k-NN in descriptor space.

    Parameters
    ----------
    k : int
        Neighbours per test atom.
    atol : float, optional
        Absolute tolerance in eV/Å. None: the mean force-error norm |F_ref - F_pred| of
        the final model(s) over the training atoms
        (:func:`mlipuq.confidence.default_atol`), which needs trajectories (a store or
        arrays), not bare distributions.
    rtol : float
        Relative tolerance: neighbour i counts errors up to ``atol + rtol * |F_ref,i|``.
    scale : float
        Default calibration scale factor ``s`` (1: uncalibrated).
    index : {"auto", "flat", "ivfflat", "hnsw", "ivfpq"}
        FAISS index kind; ``"auto"`` picks by size per index
        (:func:`mlipuq.knn_index.choose_kind`). The choice is in ``index_kinds_``.
    per_element : bool
        One index per element (neighbours share the test atom's element), else one.
    hnsw_m, ef_construction, ef_search : int
        ``IndexHNSWFlat`` parameters (paper: 32, 40, 16).
    ivf_nlist, pq_m, nprobe : int, optional
        ``IndexIVFFlat`` / ``IndexIVFPQ`` parameters (defaults by size in
        :mod:`mlipuq.knn_index`).
    n_bins : int
        Histogram bins (log-spaced) when errors are given as trajectories.
    window : (start, size), optional
        Epoch window of the trajectories (see :func:`mlipuq.trajectory_store.window_slice`).
    n_threads : int
        FAISS OpenMP threads while building and searching.
    seed : int
        Seed of index training (IVF-PQ) and of the reference-distance sample.
    transfer : {"distance", "mean"}
        ``"distance"``: the neighbours' error distributions are stretched by
        ``max(1, z_j) ** distance_power`` (z_j: normalised k-NN distance), so far atoms
        get low p. ``"mean"``: the paper's plain mean of the neighbours' p.
    distance_power : float or "auto"
        beta of the distance-aware transfer (>= 0; 0 is the plain mean). ``"auto"``:
        1 until :meth:`calibrate` chooses it from :data:`DISTANCE_POWER_GRID` by the
        Brier score on the calibration atoms.
    distance_scope : {"configuration", "atom", "both"}
        Which z stretches an atom's distribution: the root mean square of z over its
        configuration (``"configuration"``: a configuration far from training raises
        the errors of all its atoms; measured best in ``docs/ltau.md``), its own z
        (``"atom"``), or the larger of the two (``"both"``: keeps a single far atom in
        a large cell visible).
    reference_sample : int
        Training atoms per index whose leave-one-configuration-out k-NN distance
        gives the reference distance ``d_ref`` (a seeded sample when there are more).
    chunk_size : int
        On a Dask cluster (:meth:`fit_distributed`, ``client=``): training atoms per
        task and rows per index shard. No effect in-process.

    Attributes
    ----------
    distributions_ : ErrorDistributions
        Per-training-atom error histograms (N rows).
    atol_ : float
        Tolerance in eV/Å used by default in :meth:`predict`.
    species_ : ndarray of str, shape (N,)
        Element of each training atom.
    force_norm_ : ndarray of float64, shape (N,) or None
        Reference force norms (eV/Å) of the training atoms, when known.
    group_rows_ : dict of str -> ndarray of int64
        Training rows of each index (element symbol, or ``"all"``).
    indices_ : dict of str -> faiss.Index
        The FAISS index of each group.
    index_kinds_ : dict of str -> str
        Kind of each index (``"flat"``, ``"ivfflat"``, ``"hnsw"``, ``"ivfpq"``).
    n_features_in_ : int
        Descriptor size D.
    reference_distance_ : dict of str -> float
        d_ref of each index: median leave-one-configuration-out mean k-NN distance of
        its training atoms (descriptor units).
    scale_ : float
        Calibration scale factor used by :meth:`predict` (``scale`` until
        :meth:`calibrate` fits one).
    distance_power_ : float
        beta used by :meth:`predict` (chosen by :meth:`calibrate` with
        ``distance_power="auto"``).
    threshold_ : float or None
        Flag threshold on 1 - p fitted by :meth:`calibrate` (None before).
    calibration_ : dict or None
        What :meth:`calibrate` fitted and measured (JSON types), None before.

    Examples
    --------
    >>> from mlipuq.backends.base import ModelOutputs
    >>> rng = np.random.default_rng(0)
    >>> errors = rng.gamma(2.0, 0.05, size=(30, 200))          # (epochs, atoms), eV/Å
    >>> X = ModelOutputs(descriptors=rng.normal(size=(200, 8)),
    ...                  species=np.array(["H", "O"] * 100),
    ...                  config_index=np.repeat(np.arange(50), 4))
    >>> est = LTAUEstimator(k=3).fit(X, errors)                 # errors: store or arrays
    >>> result = est.predict(X.subset(np.arange(50) < 2))      # two configurations
    >>> result.atom_uncertainty.shape, result.config_uncertainty.shape, est.index_kinds_
    ((8,), (2,), {'H': 'flat', 'O': 'flat'})
    """

    name = "ltau"
    display_name = "LTAU"
    requires = ("descriptors",)
    needs_store = True
    calibrates = True
    derived_names = ("knn_distance",)
    bounds = (0.0, 1.0)

    def __init__(
        self,
        *,
        k: int = 5,
        atol: float | None = None,
        rtol: float = 0.0,
        scale: float = 1.0,
        index: str = "auto",
        per_element: bool = True,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 16,
        ivf_nlist: int | None = None,
        pq_m: int | None = None,
        nprobe: int | None = None,
        n_bins: int = 100,
        window: tuple[int, int | None] | None = None,
        n_threads: int = 1,
        seed: int = 0,
        transfer: str = "distance",
        distance_power: float | str = "auto",
        distance_scope: str = "configuration",
        reference_sample: int = 20_000,
        chunk_size: int = 100_000,
    ) -> None:
        self.k = k
        self.atol = atol
        self.rtol = rtol
        self.scale = scale
        self.index = index
        self.per_element = per_element
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.ivf_nlist = ivf_nlist
        self.pq_m = pq_m
        self.nprobe = nprobe
        self.n_bins = n_bins
        self.window = window
        self.n_threads = n_threads
        self.seed = seed
        self.transfer = transfer
        self.distance_power = distance_power
        self.distance_scope = distance_scope
        self.reference_sample = reference_sample
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ fit
    def fit(self, X: ModelOutputs, store: Any = None) -> LTAUEstimator:
        """Fit on the training set's outputs ``X`` and its error trajectories ``store``.

        Parameters
        ----------
        X : ModelOutputs
            ``descriptors`` (N, D), ``species`` (N,), ``config_index`` (N,) of the
            training atoms, in the store's atom-table order.
        store : TrajectoryStore, path, ErrorDistributions, ndarray (E, N) or list
            The per-atom force errors of the training atoms (see :meth:`fit_arrays`).

        Returns
        -------
        self
        """
        self.check_inputs(X)
        if store is None:
            raise InputError("ltau: fit needs the training error trajectories (store)")
        return self.fit_arrays(store, X.descriptors, X.species, config_index=X.config_index)

    def fit_arrays(
        self,
        errors: Any,
        descriptors: np.ndarray,
        species: Sequence[str] | np.ndarray,
        *,
        force_norm: np.ndarray | None = None,
        config_index: np.ndarray | None = None,
        client: Any = None,
    ) -> LTAUEstimator:
        """Learn the training error distributions and build the neighbour indices.

        Parameters
        ----------
        errors : ErrorDistributions, TrajectoryStore, path, ndarray (E, N) or list of them
            Per-atom force errors of the training atoms in eV/Å: histograms already
            made, a trajectory store (or its directory), or the error trajectory of
            one model (E, N) or of several models (a list, one (E_m, N) per model).
        descriptors : ndarray, shape (N, D)
            Training descriptors (latent features), row i = atom i of the atom table.
        species : sequence of str or int, shape (N,)
            Element of each training atom (symbols or atomic numbers).
        force_norm : ndarray, shape (N,), optional
            Reference force norms |F_ref,i| in eV/Å (needed for ``rtol > 0``; taken from
            the store's atom table when ``errors`` is a store).
        config_index : ndarray of int, shape (N,), optional
            Configuration of each training atom, for the leave-one-configuration-out
            reference distances (taken from the store's atom table when ``errors`` is a
            store; without it each atom only leaves itself out).
        client : distributed.Client, optional
            Build the distributions, p_i and the indices on this Dask cluster
            (:mod:`mlipuq.distributed.ltau`; needs a trajectory store on a shared
            filesystem; ``descriptors`` may then be a dask array chunked by rows). The
            fitted estimator is the one the in-process fit gives.

        Returns
        -------
        self
        """
        self._check_params()
        if client is not None:
            from mlipuq.trajectory_store import TrajectoryStore

            if isinstance(errors, (str, os.PathLike)):
                errors = TrajectoryStore.open(errors)
            if isinstance(errors, TrajectoryStore):
                return self._fit_on_cluster(errors, descriptors, species, client,
                                            force_norm=force_norm, config_index=config_index)
            if hasattr(descriptors, "compute"):
                descriptors = descriptors.compute()
        desc = check_array(descriptors, "descriptors", ndim=2, dtype=np.float32)
        symbols = as_species(species)
        distributions, atol_source, store_norms, store_configs = self._distributions(
            errors, symbols
        )
        return self._fit_state(desc, symbols, distributions, atol_source, store_norms,
                               store_configs, force_norm, config_index)

    def _fit_state(self, desc: Any, symbols: np.ndarray, distributions: Any, atol_source: Any,
                   store_norms: Any, store_configs: Any, force_norm: Any, config_index: Any,
                   *, build: Any = None, expected: Any = None, train_p: Any = None,
                   atol: float | None = None) -> LTAUEstimator:
        """Everything after the distributions: atol, indices, reference distances.

        ``build(name, rows) -> (index, shards)`` replaces the in-process index build
        (the distributed fit); ``expected`` / ``train_p`` are the per-training-atom
        expected errors and p_i when already computed; ``atol`` the resolved one.
        """
        from mlipuq.knn_index import build_index, index_kind

        check_consistent_length(
            errors=np.empty(distributions.mass.shape[0]), descriptors=desc, species=symbols
        )
        configs = store_configs if config_index is None else config_index
        if configs is not None:
            configs = check_config_index(configs, len(symbols))
        self.atol_ = self._resolve_atol(atol_source) if atol is None else float(atol)
        self.force_norm_ = self._resolve_force_norm(force_norm, store_norms, len(symbols))
        self.distributions_ = distributions
        self.species_ = symbols
        self.n_features_in_ = int(desc.shape[1])
        self.n_train_atoms_ = int(desc.shape[0])
        groups = _group_rows(symbols, self.per_element)
        indices, kinds = {}, {}
        self.index_files_ = {}
        for name, rows in groups.items():
            if len(rows) < self.k:
                warnings.warn(
                    f"k={self.k} is larger than the {len(rows)} training atoms of {name}; "
                    f"predictions for {name} will use k={len(rows)}",
                    UserWarning,
                    stacklevel=2,
                )
            if build is None:
                indices[name] = build_index(desc[rows], **self._index_options())
            else:
                indices[name], shards = build(name, rows)
                if shards:
                    self.index_files_[name] = shards
            kinds[name] = index_kind(indices[name])
        self.group_rows_ = groups
        self.indices_ = indices
        self.index_kinds_ = kinds
        self._reset_caches()
        if expected is None:
            expected = distributions.expected_error()
        self._expected_train = np.asarray(expected, dtype=np.float64)
        if train_p is not None:  # p_i built with the distributions (distributed fit)
            self._cache[(float(self.atol_), 1.0, float(self.rtol))] = train_p
        self.reference_distance_ = {
            name: self._reference_distance(desc, name, configs) for name in groups
        }
        unknown = [n for n, d in self.reference_distance_.items() if not (np.isfinite(d) and d > 0)]
        if unknown and self.transfer == "distance":
            warnings.warn(
                f"LTAU: no reference distance for {', '.join(unknown)} (a single training "
                "atom, or all at one point): their atoms are not stretched by distance and "
                "have no normalised distance",
                UserWarning,
                stacklevel=2,
            )
        self.scale_ = float(self.scale)
        self.distance_power_ = self._initial_power()
        self.threshold_ = None
        self.threshold_source_ = None
        self.calibration_ = None
        logger.info("LTAU fitted on %d atoms, indices %s", self.n_train_atoms_, kinds)
        return self

    def fit_distributed(self, X: ModelOutputs, store: Any = None, client: Any = None
                        ) -> LTAUEstimator:
        """:meth:`fit` on a Dask cluster (see :meth:`UQMethod.fit_distributed`).

        With a trajectory store, the distributions and p_i are built per atom chunk by
        the workers and the indices shard by shard (:mod:`mlipuq.distributed.ltau`);
        the fitted state equals :meth:`fit`'s. Without a client: :meth:`fit`.
        """
        self.check_inputs_lazy(X)
        if store is None:
            raise InputError("ltau: fit needs the training error trajectories (store)")
        if client is None:
            return super().fit_distributed(X, store, None)
        return self.fit_arrays(store, X.descriptors, X.species, config_index=X.config_index,
                               client=client)

    def check_inputs_lazy(self, X: ModelOutputs) -> None:
        """:meth:`check_inputs` without reading a dask array of descriptors (its shape
        only; finite values are the backend's duty there)."""
        descriptors = getattr(X, "descriptors", None)
        if descriptors is None or not hasattr(descriptors, "compute"):
            self.check_inputs(X)
            return
        if not isinstance(X, ModelOutputs):
            raise InputError(f"ltau: expected ModelOutputs as X, got {type(X).__name__}")
        if descriptors.ndim != 2 or descriptors.shape[0] != X.n_atoms:
            raise InputError(f"ltau: descriptors of shape {descriptors.shape} for "
                             f"{X.n_atoms} atoms")

    def _fit_on_cluster(self, store: Any, descriptors: Any, species: Any, client: Any, *,
                        force_norm: Any, config_index: Any) -> LTAUEstimator:
        """:meth:`fit_arrays` with a store, the work done by the cluster of ``client``."""
        from mlipuq.distributed import ltau as dist
        from mlipuq.knn_index import choose_kind

        symbols = as_species(species)
        table = store.atom_table
        _check_store_order(table, symbols)
        chunk = int(self.chunk_size)
        desc = dist.as_row_chunks(descriptors, chunk)
        check_consistent_length(store=np.empty(table.n_atoms),
                                descriptors=np.empty(desc.shape[0]))
        store_norms = table.force_norm if not np.any(np.isnan(table.force_norm)) else None
        norms = self._resolve_force_norm(force_norm, store_norms, len(symbols))
        atol = self._resolve_atol(store)
        limits = float(atol) if self.rtol == 0 or norms is None else atol + self.rtol * norms
        earlier = self.__dict__.pop("_work_directory", None)
        if earlier is not None:  # a refit: the earlier fit's mass.npy and shards go
            import shutil

            shutil.rmtree(earlier, ignore_errors=True)
        work = dist.work_directory(store.path.parent, owner=self)
        self._work_directory = work
        distributions, train_p, expected = dist.distributions_on_cluster(
            store, client, out=work, limits=limits, n_bins=self.n_bins, window=self.window,
            chunk_size=chunk)
        options = {key: value for key, value in self._index_options().items()
                   if key != "kind"}

        def build(name: str, rows: np.ndarray) -> tuple[Any, list]:
            kind = choose_kind(len(rows)) if self.index == "auto" else self.index
            if kind in dist.SHARDABLE:
                return dist.build_group_index(client, desc, rows, kind=kind, options=options,
                                              out=work / "index", name=name, chunk_size=chunk)
            from mlipuq.knn_index import build_index

            data = np.asarray(desc[rows].compute(), dtype=np.float32)
            return build_index(data, **self._index_options()), []

        return self._fit_state(desc, symbols, distributions, store, store_norms,
                               table.config_index, force_norm, config_index, build=build,
                               expected=expected, train_p=train_p, atol=atol)

    def _check_params(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise InputError(f"k: expected a positive integer, got {self.k!r}")
        if self.atol is not None and (not np.isfinite(self.atol) or self.atol <= 0):
            raise InputError(f"atol: expected a positive tolerance in eV/Å, got {self.atol!r} "
                             "(0 makes every p 0: uncertainty 1 everywhere)")
        if not np.isfinite(self.rtol) or self.rtol < 0:
            raise InputError(f"rtol: expected a finite non-negative number, got {self.rtol!r}")
        _check_scale_scalar(self.scale)
        if self.transfer not in TRANSFERS:
            raise InputError(
                f"transfer: expected one of {', '.join(TRANSFERS)}, got {self.transfer!r}"
            )
        power = self.distance_power
        if power != "auto" and (isinstance(power, (bool, str)) or not np.isscalar(power)
                                or not np.isfinite(power) or power < 0):
            raise InputError(
                f"distance_power: expected 'auto' or a finite number >= 0, got {power!r}"
            )
        if self.distance_scope not in DISTANCE_SCOPES:
            raise InputError(
                f"distance_scope: expected one of {', '.join(DISTANCE_SCOPES)}, "
                f"got {self.distance_scope!r}"
            )
        for name in ("reference_sample", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name}: expected a positive integer, got {value!r}")
        from mlipuq.knn_index import INDEX_KINDS

        if self.index != "auto" and self.index not in INDEX_KINDS:
            raise InputError(
                f"index: expected auto, {', '.join(INDEX_KINDS)}, got {self.index!r}"
            )

    def _index_options(self) -> dict[str, Any]:
        return {
            "kind": self.index,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "ivf_nlist": self.ivf_nlist,
            "pq_m": self.pq_m,
            "nprobe": self.nprobe,
            "n_threads": self.n_threads,
            "seed": self.seed,
        }

    def _distributions(self, errors: Any, symbols: np.ndarray) -> tuple[Any, Any, Any]:
        """(distributions, source for default atol or None, store force norms or None)."""
        from mlipuq.distributions import (
            ErrorDistributions,
            distributions_from_errors,
            distributions_from_store,
        )
        from mlipuq.trajectory_store import TrajectoryStore, window_slice

        if isinstance(errors, ErrorDistributions):
            return errors, None, None, None
        if isinstance(errors, (str, os.PathLike)):
            errors = TrajectoryStore.open(errors)
        if isinstance(errors, TrajectoryStore):
            table = errors.atom_table
            _check_store_order(table, symbols)
            dists = distributions_from_store(errors, n_bins=self.n_bins, window=self.window)
            norms = table.force_norm if not np.any(np.isnan(table.force_norm)) else None
            return dists, errors, norms, table.config_index
        arrays = [errors] if isinstance(errors, np.ndarray) else list(errors)
        if not arrays:
            raise InputError("errors: no error trajectories given")
        arrays = [
            check_array(a, "errors", ndim=2, dtype=None, nonnegative=True) for a in arrays
        ]
        widths = sorted({a.shape[1] for a in arrays})
        if len(widths) > 1:
            raise InputError(f"errors: the models' trajectories have {widths} atoms (must agree)")
        finals = [a[-1] for a in arrays]
        windowed = [a[window_slice(len(a), self.window)] for a in arrays]
        dists = distributions_from_errors(windowed, n_bins=self.n_bins)
        return dists, finals, None, None

    def _initial_power(self) -> float:
        """beta before calibration: the given number, or 1 for ``"auto"``."""
        if self.distance_power == "auto":
            return DEFAULT_DISTANCE_POWER
        return float(self.distance_power)

    def _reset_caches(self) -> None:
        """Drop every cache derived from fitted state (a refit must not reuse them)."""
        self._cache: dict[tuple[float, float, float], np.ndarray] = {}
        self.__dict__.pop("_table_cache", None)
        self.__dict__.pop("_groups_cache", None)

    def _reference_distance(
        self, desc: np.ndarray, name: str, configs: np.ndarray | None
    ) -> float:
        """d_ref of index ``name``: median leave-one-configuration-out mean k-NN distance.

        A seeded sample of at most ``reference_sample`` training atoms of the index is
        searched for ``k`` + (most atoms of one configuration in the index) neighbours;
        neighbours from the query's own configuration (or the query itself, without
        ``configs``) are dropped and the first ``k`` others averaged. Queries left
        with no neighbour (every atom of the index in one configuration) fall back to
        leaving out only themselves.
        """
        from mlipuq.knn_index import faiss_threads, set_search_params

        rows = self.group_rows_[name]
        index = self.indices_[name]
        k = min(self.k, len(rows))
        if len(rows) < 2:
            return float("nan")
        rng = np.random.default_rng(self.seed)
        sample = np.arange(len(rows))
        if len(rows) > self.reference_sample:
            sample = np.sort(rng.choice(len(rows), self.reference_sample, replace=False))
        own = rows if configs is None else configs[rows]
        largest = int(np.unique(own, return_counts=True)[1].max())
        n_search = min(k + largest, len(rows))
        if n_search > k + 1 and n_search >= len(rows) // 2:
            n_search = len(rows)  # cheaper to take every row than to miss neighbours
        queries = np.ascontiguousarray(desc[rows[sample]])
        block = max(1, _SEARCH_RESULTS // n_search)  # bounded memory whatever the sizes
        means = []
        set_search_params(index, ef_search=max(self.ef_search, n_search))
        try:
            for start in range(0, len(sample), block):
                part = slice(start, start + block)
                with faiss_threads(self.n_threads):
                    sq_dist, local = index.search(queries[part], n_search)
                means.append(_loco_means(sq_dist, local, own, sample[part], k))
        finally:
            set_search_params(index, ef_search=self.ef_search)
        mean = np.concatenate(means)
        mean = mean[np.isfinite(mean)]
        return float(np.median(mean)) if len(mean) else float("nan")

    def _resolve_atol(self, source: Any) -> float:
        if self.atol is not None:
            return float(self.atol)
        if source is None:
            raise InputError(
                "atol: required when errors are ErrorDistributions (no final-epoch errors "
                "to take the mean force-error norm from)"
            )
        from mlipuq.confidence import default_atol

        return float(default_atol(source))

    def _resolve_force_norm(
        self, force_norm: np.ndarray | None, store_norms: np.ndarray | None, n_atoms: int
    ) -> np.ndarray | None:
        norms = force_norm if force_norm is not None else store_norms
        if norms is None:
            if self.rtol > 0:
                raise InputError(
                    "force_norm: required when rtol > 0 (reference force norms |F_ref| of "
                    "the training atoms)"
                )
            return None
        norms = check_array(norms, "force_norm", ndim=1, nonnegative=True)
        check_consistent_length(force_norm=norms, species=np.empty(n_atoms))
        return norms

    # ------------------------------------------------------------------ predict
    def predict(self, X: ModelOutputs, **options: Any) -> UQResult:
        """LTAU uncertainty of the atoms of ``X`` (``descriptors``, ``species``,
        ``config_index``); ``options`` as in :meth:`predict_arrays`."""
        self.check_inputs(X)
        return self.predict_arrays(X.descriptors, X.species, config_index=X.config_index,
                                   **options)

    def summary(self) -> str:
        """atol and its source, the indices, the training size, calibration, threshold."""
        check_is_fitted(self, "indices_")
        source = "given" if self.atol is not None else (
            "mean force-error norm |F_ref - F_pred| of the final models on the training atoms")
        kinds = ", ".join(f"{name}={kind}" for name, kind in self.index_kinds_.items())
        text = (f"atol {self.atol_:.4g} eV/Å ({source}); index {kinds} (k={self.k}); "
                f"{self.n_train_atoms_} training atoms, D={self.n_features_in_}")
        if self.calibration_ is not None:
            cal = self.calibration_
            bound = " (at the search bound: see docs/ltau.md)" if cal["at_bound"] else ""
            text += (f"; calibrated on {cal['n_configs']} configurations: s = "
                     f"{cal['scale']:.4g}{bound}, beta {cal['distance_power']:g}, ECE "
                     f"{cal['ece_before']:.3f} -> {cal['ece_after']:.3f}")
        return f"{text}; {super().summary()}"

    def derived_results(self, result: UQResult) -> dict[str, UQResult]:
        """The normalised k-NN distance z as a score of its own (``"knn_distance"``)."""
        distance = distance_result(result)
        return {} if distance is None else {KNN_DISTANCE: distance}

    def predict_arrays(
        self,
        descriptors: np.ndarray,
        species: Sequence[str] | np.ndarray,
        *,
        k: int | None = None,
        scale: float | np.ndarray | None = None,
        atol: float | None = None,
        config_index: np.ndarray | None = None,
        return_distribution: bool = False,
        threshold: float | None = None,
        client: Any = None,
    ) -> UQResult:
        """LTAU uncertainty of new atoms.

        Parameters
        ----------
        descriptors : ndarray, shape (n, D)
            Test descriptors from the same model as the training descriptors.
        species : sequence of str or int, shape (n,)
            Element of each test atom; every element must occur in training.
        k : int, optional
            Neighbours (default ``self.k``), clamped per element with a warning. The
            normalised distance still divides by ``d_ref`` measured with ``self.k``.
        scale : float or ndarray of shape (n,), optional
            Calibration scale factor ``s`` (default ``scale_``: the calibrated one, else
            ``self.scale``); per atom for per-group calibration.
        atol : float, optional
            Tolerance in eV/Å (default ``atol_``).
        config_index : ndarray of int, shape (n,), optional
            Configuration of each atom (0-based): the groups of the configuration-level
            z~ (RMS of z) and of the configuration uncertainty (mean of 1 - p). Without
            it the atoms form one configuration (as one frame of a simulation).
        return_distribution : bool
            Add the mean neighbour histogram ``extras["distribution"]`` (n, B): mass
            on ``distributions_.bin_edges`` (training-error scale; multiply the edges by
            ``s`` for the calibrated test-error scale).
        threshold : float, optional
            Flag atoms and configurations with uncertainty above it. None: the fitted
            ``threshold_`` when ``scale``, ``atol`` and ``k`` are the defaults; it is a
            threshold on the configuration uncertainty, so it flags configurations only
            (``atom_flags`` stays None).
        client : distributed.Client, optional
            Spread the k-NN search over this Dask cluster (one task per query block and
            index shard, top-k merge; :mod:`mlipuq.distributed.ltau`); the transfer
            runs here. Needs an estimator whose indices are in files (saved and
            loaded, or fitted on a cluster); else the search runs here.

        Returns
        -------
        UQResult
            ``method="ltau"``, ``atom_uncertainty = 1 - p_j`` (unitless), per-config mean
            of 1 - p (one configuration without ``config_index``;
            ``extras["config_max_uncertainty"]`` the max), ``extras``: ``"p"`` (n,),
            ``"expected_error"`` (n,) in eV/Å, ``"knn_distance"`` (n,) mean Euclidean
            distance to the k neighbours (descriptor units), ``"knn_distance_normalised"``
            (n,), optionally ``"distribution"`` (n, B).
        """
        check_is_fitted(self, "indices_")
        desc, groups = self._test_input(descriptors, species)
        n_atoms = len(desc)
        configs = (np.zeros(n_atoms, dtype=np.int64) if config_index is None  # one config
                   else check_config_index(config_index, n_atoms))
        fitted = threshold is None and scale is None and atol is None and k is None
        k = self.k if k is None else k
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError(f"k: expected a positive integer, got {k!r}")
        atol = self.atol_ if atol is None else atol
        if not np.isscalar(atol) or not np.isfinite(atol) or atol <= 0:
            raise InputError(f"atol: expected a positive tolerance in eV/Å, got {atol!r}")
        scales = self._check_scale(self.scale_ if scale is None else scale, n_atoms)
        if fitted:
            threshold = self.threshold_
        if threshold is not None and (not np.isscalar(threshold) or not np.isfinite(threshold)):
            raise InputError(f"threshold: expected a finite number, got {threshold!r}")

        found = list(self._neighbours(desc, groups, k, client))
        distance, normalised = self._distances(found, n_atoms)
        p, expected = self._transfer(found, normalised, configs, scales, float(atol))
        mass = None
        if return_distribution:
            mass = np.empty((n_atoms, self.distributions_.mass.shape[1]), dtype=np.float32)
            for _, rows, neighbours, _ in found:
                mass[rows] = self.distributions_.mean_over(neighbours).mass
        return _result(p, expected, distance, normalised, mass, configs, threshold,
                       atom_level=not fitted, atol=float(atol))

    def _distances(self, found: list, n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean k-NN distance d_j and z_j = d_j / d_ref of every atom, shapes (n,)."""
        distance = np.empty(n_atoms)
        normalised = np.empty(n_atoms)
        for name, rows, neighbours, distance_sum in found:
            distance[rows] = distance_sum / neighbours.shape[1]
            normalised[rows] = self._normalised(distance[rows], name)
        return distance, normalised

    def _transfer(
        self,
        found: list,
        normalised: np.ndarray,
        configs: np.ndarray | None,
        scales: float | np.ndarray,
        atol: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """p_j and the expected error (eV/Å) from the neighbours ``found`` by one search."""
        n_atoms = len(normalised)
        p = np.empty(n_atoms)
        expected = np.empty(n_atoms)
        base = float(scales) if np.ndim(scales) == 0 else None
        stretch = self._stretch(normalised, configs)
        for _, rows, neighbours, _ in found:
            s_rows = (scales if base is not None else scales[rows]) * stretch[rows]
            p[rows] = self._neighbour_p(neighbours, atol, s_rows, base)
            expected[rows] = (s_rows * self._expected_train[neighbours].sum(axis=1)
                              / neighbours.shape[1])
        return p, expected

    def _test_input(
        self, descriptors: np.ndarray, species: Sequence[str] | np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Checked float32 descriptors (n, D) and the test rows of each index."""
        desc = check_array(descriptors, "descriptors", ndim=2, dtype=np.float32)
        check_feature_dim(desc, self.n_features_in_, "descriptors")
        groups = self._test_groups(species)
        check_consistent_length(
            descriptors=desc, species=np.empty(sum(len(rows) for rows in groups.values()))
        )
        return desc, groups

    def _neighbours(
        self, desc: np.ndarray, groups: dict[str, np.ndarray], k: int, client: Any = None
    ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """Per index: its name, the test rows, their training neighbours (n_g, k_g) and
        the sum of the k_g neighbour distances (n_g,), one FAISS search each (with
        ``client``: spread over the cluster's workers, shard by shard, when the index is
        in files they can read)."""
        from mlipuq.knn_index import search_checked

        files = self.__dict__.get("index_files_", {})
        for name, rows in groups.items():
            k_group = self._clamped_k(k, name)
            queries = desc if len(groups) == 1 else np.ascontiguousarray(desc[rows])
            if client is not None and files.get(name):
                from mlipuq.distributed.ltau import search_on_cluster

                index = self.indices_[name]
                sq_dist, local = search_on_cluster(
                    client, files[name], queries, k_group,
                    nprobe=getattr(index, "nprobe", None), ef_search=self.ef_search)
                if np.any(local < 0):
                    raise InputError(f"index: {int(np.any(local < 0, axis=1).sum())} queries "
                                     f"got fewer than k={k_group} neighbours; raise ef_search "
                                     "or nprobe")
            else:
                sq_dist, local = search_checked(self.indices_[name], queries, k_group,
                                                n_threads=self.n_threads)
            distance_sum = np.sqrt(np.maximum(sq_dist, 0.0)).sum(1, dtype=np.float64)
            yield name, rows, self.group_rows_[name][local], distance_sum

    def _normalised(self, distance: np.ndarray, name: str) -> np.ndarray:
        """z = d / d_ref of index ``name`` (NaN when d_ref is unknown or zero)."""
        reference = self.__dict__.get("reference_distance_", {}).get(name, np.nan)
        if not np.isfinite(reference) or reference <= 0:
            return np.full(len(distance), np.nan)
        return distance / reference

    def _stretch(self, normalised: np.ndarray, configs: np.ndarray | None) -> np.ndarray:
        """Factor on s per atom: ``max(1, z~) ** distance_power`` (1 for the plain mean).

        z~ is the root mean square of z over the atom's configuration
        (``distance_scope="configuration"``; without ``configs`` all atoms form one
        configuration), the atom's own z (``"atom"``), or the larger of the two
        (``"both"``). Atoms whose z is unknown count as z = 1.
        """
        power = float(self.__dict__.get("distance_power_", DEFAULT_DISTANCE_POWER))
        if self.transfer == "mean" or power == 0:
            return np.ones(len(normalised))
        z = np.where(np.isfinite(normalised), normalised, 1.0)
        if self.distance_scope != "atom":
            if configs is None:
                rms = np.full(len(z), np.sqrt(np.mean(z**2)))
            else:
                counts = np.maximum(np.bincount(configs), 1)
                rms = np.sqrt(np.bincount(configs, z**2) / counts)[configs]
            z = rms if self.distance_scope == "configuration" else np.maximum(z, rms)
        return np.maximum(z, 1.0) ** power

    def _check_scale(self, scale: Any, n_atoms: int) -> float | np.ndarray:
        if np.ndim(scale) == 0:
            return _check_scale_scalar(scale)
        values = check_array(scale, "scale", ndim=1, dtype=np.float64)
        check_consistent_length(scale=values, descriptors=np.empty(n_atoms))
        if np.any(values <= 0):
            raise InputError(f"scale: expected positive values, min {values.min():.6g}")
        return values

    def _test_groups(self, species: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        """Test rows of each index for ``species`` (cached for a repeated species array).

        Inside an MD loop every call has the same species; the grouping (and its
        element check) is then computed once.
        """
        raw = np.asarray(species)
        key = (raw.dtype.str, raw.shape, raw.tobytes())
        cached = self.__dict__.get("_groups_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        symbols = as_species(raw)
        if not self.per_element:
            unknown = sorted(set(symbols.tolist()) - set(self.species_.tolist()))
            groups = {ALL_ELEMENTS: np.arange(len(symbols), dtype=np.int64)}
        else:
            unknown = sorted(set(symbols.tolist()) - set(self.group_rows_))
            groups = _group_rows(symbols, per_element=True)
        if unknown:
            raise InputError(_unknown_message(unknown, self.species_))
        self._groups_cache = (key, groups)
        return groups

    def _clamped_k(self, k: int, name: str) -> int:
        n_train = len(self.group_rows_[name])
        if k <= n_train:
            return int(k)
        warnings.warn(
            f"k={k} is larger than the {n_train} training atoms of {name}; using k={n_train}",
            UserWarning,
            stacklevel=3,
        )
        return n_train

    def calibrate(
        self, X: ModelOutputs, force_errors: np.ndarray | None = None, *,
        fpr: float = DEFAULT_FPR, source: str = "in-domain held-out data",
    ) -> LTAUEstimator:
        """Fit s, beta and the threshold on held-out in-domain outputs ``X`` with their
        force-error norms (eV/Å, shape (N,)); see :meth:`calibrate_arrays`."""
        self.check_inputs(X)
        if force_errors is None:
            raise InputError("ltau: calibrate needs the force errors of the calibration atoms")
        self.calibrate_arrays(X.descriptors, X.species, force_errors,
                              config_index=X.config_index, fpr=fpr)
        self.threshold_source_ = f"FPR {fpr:g} on {source}"
        return self

    def calibrate_arrays(
        self,
        descriptors: np.ndarray,
        species: Sequence[str] | np.ndarray,
        errors: np.ndarray,
        *,
        config_index: np.ndarray,
        fpr: float = DEFAULT_FPR,
        bounds: tuple[float, float] = (0.1, 20.0),
        n_bins: int = 10,
    ) -> LTAUEstimator:
        """Fit the scale factor, beta and the flag threshold on in-domain held-out atoms.

        The atoms must be in domain and unseen in training (a validation set, or a
        calibration split of an in-domain test set): what is fitted here is what
        :meth:`predict`, the calculator, ``simulate``, ``select`` and ``evaluate`` use
        afterwards, and :meth:`save` stores it.

        - ``distance_power_``: with ``distance_power="auto"``, each beta of
          :data:`DISTANCE_POWER_GRID` gets its own s (below) and the one whose p has
          the lowest Brier score for the event "error <= atol" is kept; a number is
          kept as it is.
        - ``scale_``: the s minimising the expected calibration error (ECE) of
          p = CDF(atol / s_j) against the observed share of atoms with error <= atol
          (:func:`mlipuq.calibration.fit_scale`, ``threshold_scales=False``). An s at
          a bound of ``bounds`` is kept, flagged ``at_bound`` in ``calibration_`` and
          warned about (the atoms may not be in domain, or the bounds too narrow).
        - ``threshold_``: the (1 - ``fpr``) quantile of the calibrated configuration
          uncertainty (the mean of 1 - p over its atoms), so that a share ``fpr`` of
          in-domain configurations is flagged.

        Parameters
        ----------
        descriptors : ndarray, shape (n, D)
            Descriptors of the calibration atoms (same model as training).
        species : sequence of str or int, shape (n,)
            Their elements.
        errors : ndarray, shape (n,)
            Their true force-error norms |F_ref - F_pred| in eV/Å (same model).
        config_index : ndarray of int, shape (n,)
            Configuration of each atom (any integer labels; renumbered).
        fpr : float
            In-domain false-positive rate (per configuration) of the threshold, in (0, 1).
        bounds : (float, float)
            Search interval of s.
        n_bins : int
            Bins of the calibration curve.

        Returns
        -------
        self
            A failed calibration raises and leaves the estimator as it was.
        """
        check_is_fitted(self, "indices_")
        errors = check_array(errors, "errors", ndim=1, nonnegative=True)
        desc = check_array(descriptors, "descriptors", ndim=2, dtype=np.float32)
        check_consistent_length(errors=errors, descriptors=desc)
        if not 0.0 < fpr < 1.0:
            raise InputError(f"fpr: expected a rate in (0, 1), got {fpr!r}")
        if config_index is None:
            raise InputError("config_index: required (the configuration of each "
                             "calibration atom: the threshold is per configuration)")
        labels = check_array(config_index, "config_index", ndim=1, dtype=None)
        check_consistent_length(config_index=labels, descriptors=desc)
        configs = np.unique(labels, return_inverse=True)[1].astype(np.int64)
        desc, groups = self._test_input(desc, species)
        found = list(self._neighbours(desc, groups, self.k))  # one search for every s, beta
        _, normalised = self._distances(found, len(desc))
        state = {key: self.__dict__.get(key) for key in
                 ("distance_power_", "scale_", "threshold_", "calibration_")}
        try:
            self._fit_calibration(found, normalised, configs, errors, fpr, bounds, n_bins)
        except BaseException:
            self.__dict__.update(state)  # a failed calibration leaves the state as it was
            raise
        finally:
            self._reset_caches()
        return self

    def _fit_calibration(self, found, normalised, configs, errors, fpr, bounds, n_bins):
        """The work of :meth:`calibrate` on neighbours already searched."""
        from mlipuq import metrics
        from mlipuq.atom_table import config_mean
        from mlipuq.calibration import fit_scale
        from mlipuq.thresholds import fpr_threshold

        atol = float(self.atol_)

        def predict_p(scale: float | np.ndarray) -> np.ndarray:
            return self._transfer(found, normalised, configs, float(scale), atol)[0]

        within = (errors <= atol).astype(float)
        powers = [self._initial_power()]
        if self.distance_power == "auto" and self.transfer == "distance":
            powers = list(DISTANCE_POWER_GRID)
        brier: dict[float, float] = {}
        fitted: dict[float, tuple[float, bool]] = {}
        for power in powers:
            self.distance_power_ = float(power)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                scale = fit_scale(predict_p, errors, atol, bounds=bounds, n_bins=n_bins,
                                  threshold_scales=False)
            fitted[power] = (scale, any("search bound" in str(w.message) for w in caught))
            brier[power] = float(np.mean((predict_p(scale) - within) ** 2))
        power = min(powers, key=lambda b: (round(brier[b], 12), abs(b - DEFAULT_DISTANCE_POWER)))
        self.distance_power_ = float(power)
        scale, at_bound = fitted[power]
        if at_bound:
            warnings.warn(
                f"LTAU calibration: s = {scale:.4g} is at the search bound {bounds}: the "
                "calibration atoms may not be in domain, or the bounds are too narrow",
                UserWarning,
                stacklevel=3,
            )
        before = predict_p(float(self.scale))  # same beta, the unfitted scale
        after = predict_p(scale)
        scores = config_mean(1.0 - after, configs)
        threshold = fpr_threshold(scores, fpr)
        self.scale_ = float(scale)
        self.threshold_ = float(threshold)
        self.calibration_ = {
            "scale": float(scale),
            "at_bound": bool(at_bound),
            "bounds": [float(bounds[0]), float(bounds[1])],
            "atol": atol,
            "convention": "p = CDF_train(atol / s_j): test errors = s_j x training errors",
            "ece_before": float(metrics.ece(before, errors, atol, n_bins=n_bins)),
            "ece_after": float(metrics.ece(after, errors, atol, n_bins=n_bins)),
            "scale_before": float(self.scale),
            "distance_power": float(power),
            "distance_power_at_grid_end": bool(len(powers) > 1 and power == max(powers)),
            "brier_by_distance_power": {str(b): v for b, v in brier.items()},
            "n_atoms": int(len(errors)),
            "n_configs": int(len(scores)),
            "fpr": float(fpr),
            "threshold": float(threshold),
            "threshold_level": "configuration (mean of 1 - p over its atoms)",
        }

    def uncalibrated(self) -> LTAUEstimator:
        """A shallow copy predicting as before :meth:`calibrate`: s = ``scale``, beta 1 (or
        the given number), no fitted threshold. Shares the indices and histograms."""
        import copy

        check_is_fitted(self, "indices_")
        other = copy.copy(self)
        other.scale_ = float(self.scale)
        other.distance_power_ = self._initial_power()
        other.threshold_ = None
        other.threshold_source_ = None
        other.calibration_ = None
        other._reset_caches()
        return other

    def train_confidence(
        self, atol: float | None = None, scale: float = 1.0
    ) -> np.ndarray:
        """CDF of every training atom at ``(atol + rtol * |F_ref,i|) / scale``, shape (N,).

        This is p_i of the training atoms as the histograms give it (cached per
        (atol, scale, rtol)).
        """
        check_is_fitted(self, "distributions_")
        atol = self.atol_ if atol is None else float(atol)
        key = (float(atol), float(scale), float(self.rtol))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            limits = self._tolerance(atol, np.arange(self.n_train_atoms_)) / scale
            cache.clear()  # one tolerance at a time: N floats
            cache[key] = np.asarray(self.distributions_.cdf(limits), dtype=np.float64)
        return cache[key]

    def _tolerance(self, atol: float, rows: np.ndarray) -> np.ndarray:
        """Unscaled tolerance ``atol + rtol * |F_ref,i|`` of training rows, eV/Å."""
        if self.rtol == 0 or self.force_norm_ is None:
            return np.full(len(rows), atol)
        return atol + self.rtol * self.force_norm_[rows]

    def _neighbour_p(
        self, neighbours: np.ndarray, atol: float, s_rows: np.ndarray, base: float | None
    ) -> np.ndarray:
        """Mean neighbour CDF at the tolerance over each atom's scale, shape (n,).

        Rows whose scale equals the scalar ``base`` read the cached per-training-row
        table (:meth:`train_confidence`, one gather: the per-MD-step path); the
        others evaluate each (atom, neighbour) pair at its own scale.
        """
        n_rows, k = neighbours.shape
        p = np.empty(n_rows)
        simple = np.zeros(n_rows, bool) if base is None else s_rows == base
        if np.any(simple):
            confidence = self.train_confidence(atol, base)
            p[simple] = confidence[neighbours[simple]].sum(axis=1) / k
        rest = np.flatnonzero(~simple)
        if rest.size:
            flat_rows = neighbours[rest].ravel()
            limits = self._tolerance(atol, flat_rows) / np.repeat(s_rows[rest], k)
            values = self.distributions_.cdf_at(flat_rows, limits)
            p[rest] = values.reshape(len(rest), k).mean(axis=1)
        return p

    # ------------------------------------------------------------------ persistence
    @classmethod
    def _params_from_json(cls, params: dict) -> dict:
        if params.get("window") is not None:
            params["window"] = tuple(params["window"])
        return params

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        check_is_fitted(self, "indices_")
        dists = self.distributions_
        arrays = {
            "bin_edges": np.asarray(dists.bin_edges),
            "n_samples": np.asarray(dists.n_samples),
            "species": self.species_.astype("U3"),
        }
        array_files = {}
        if _memory_mapped(dists.mass):  # large (distributed fit): its own .npy
            array_files["mass"] = MASS_FILE
        else:
            arrays["mass"] = np.asarray(dists.mass)
        if self.force_norm_ is not None:
            arrays["force_norm"] = self.force_norm_
        groups = []
        shards_of = self.__dict__.get("index_files_", {})
        for number, (name, rows) in enumerate(self.group_rows_.items()):
            arrays[f"rows_{number}"] = rows
            group = {"name": name, "kind": self.index_kinds_[name],
                     "file": f"index_{name}.faiss", "n_rows": len(rows),
                     "rows_key": f"rows_{number}"}
            if len(shards_of.get(name, ())) > 1:
                group["file"] = None
                group["shards"] = [
                    {"file": f"index_{name}.{part}.faiss", "first_row": int(first),
                     "n_rows": int(size)}
                    for part, (_, first, size) in enumerate(shards_of[name])]
            groups.append(group)
        state = {
            "atol": self.atol_,
            "n_features": self.n_features_in_,
            "n_train_atoms": self.n_train_atoms_,
            "groups": groups,
            "reference_distance": {
                name: _json_float(value) for name, value in self.reference_distance_.items()
            },
            "scale": self.scale_,
            "distance_power": self.distance_power_,
            "threshold": self.threshold_,
            "threshold_source": self.__dict__.get("threshold_source_"),
            "calibration": self.calibration_,
            "units": {"atol": "eV/Å", "bin_edges": "eV/Å",
                      "reference_distance": "descriptor units"},
        }
        if array_files:
            state["array_files"] = array_files
        return state, arrays

    def _write_files(self, directory: Path) -> list[str]:
        import shutil

        from mlipuq.knn_index import save_index

        files = []
        shards_of = self.__dict__.get("index_files_", {})
        for name, index in self.indices_.items():
            shards = shards_of.get(name, ())
            if len(shards) > 1:  # sharded (distributed fit): the shard files as they are
                for part, (source, _, _) in enumerate(shards):
                    shutil.copyfile(source, directory / f"index_{name}.{part}.faiss")
                    files.append(f"index_{name}.{part}.faiss")
                continue
            save_index(index, directory / f"index_{name}.faiss")
            files.append(f"index_{name}.faiss")
        mass = self.distributions_.mass
        if _memory_mapped(mass):
            from numpy.lib.format import open_memmap

            from mlipuq.distributions import _row_blocks

            out = open_memmap(directory / MASS_FILE, mode="w+", dtype=np.float32,
                              shape=mass.shape)
            for rows in _row_blocks(len(mass)):
                out[rows] = mass[rows]
            out.flush()
            del out
            files.append(MASS_FILE)
        return files

    def _set_state(self, state: dict, arrays: Any, directory: Path) -> None:
        from mlipuq.distributions import ErrorDistributions
        from mlipuq.knn_index import load_index

        n_atoms, n_features = int(state["n_train_atoms"]), int(state["n_features"])
        arrays = dict(arrays)
        for key, file in state.get("array_files", {}).items():  # large arrays, memory-mapped
            try:
                arrays[key] = np.load(directory / file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise InputError(f"{directory / file}: not a readable .npy file ({error})") \
                    from None
        if arrays["mass"].shape[0] != n_atoms or len(arrays["species"]) != n_atoms:
            raise InputError(
                f"{directory}: the arrays hold {arrays['mass'].shape[0]} atoms, "
                f"the header says {n_atoms}"
            )
        self.distributions_ = ErrorDistributions(
            bin_edges=arrays["bin_edges"], mass=arrays["mass"], n_samples=arrays["n_samples"]
        )
        self.species_ = arrays["species"].astype(str)
        self.force_norm_ = arrays.get("force_norm")
        self.atol_ = float(state["atol"])
        self.n_features_in_ = n_features
        self.n_train_atoms_ = n_atoms
        self.group_rows_, self.indices_, self.index_kinds_ = {}, {}, {}
        self.index_files_ = {}
        for group in state["groups"]:
            name = group["name"]
            if group.get("shards"):  # written by a distributed fit: merged here
                from mlipuq.knn_index import merge_shards

                shards = [(str(directory / part["file"]), int(part["first_row"]),
                           int(part["n_rows"])) for part in group["shards"]]
                index = merge_shards([load_index(file) for file, _, _ in shards])
                self.index_files_[name] = shards
            else:
                index = load_index(directory / group["file"])
                self.index_files_[name] = [(str(directory / group["file"]), 0,
                                            int(index.ntotal))]
            rows = arrays[group["rows_key"]]
            if index.d != n_features or index.ntotal != len(rows):
                raise InputError(
                    f"{directory / group['file']}: index holds {index.ntotal} x {index.d}, "
                    f"expected {len(rows)} x {n_features}"
                )
            self.group_rows_[name] = rows.astype(np.int64)
            self.indices_[name] = index
            self.index_kinds_[name] = group["kind"]
        self._reset_caches()
        self.reference_distance_ = {
            name: np.nan if value is None else float(value)
            for name, value in state.get("reference_distance", {}).items()
        }
        self.scale_ = float(state.get("scale", self.scale))
        power = state.get("distance_power")
        self.distance_power_ = self._initial_power() if power is None else float(power)
        threshold = state.get("threshold")
        self.threshold_ = None if threshold is None else float(threshold)
        self.threshold_source_ = state.get("threshold_source")
        self.calibration_ = state.get("calibration")
        self._expected_train = np.asarray(self.distributions_.expected_error(),
                                          dtype=np.float64)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LTAUEstimator:
        """Load an estimator written by :meth:`save` (or by mlipuq 0.1: ``mlipuq.ltau``
        format 1 or 2, read as it was).

        Raises
        ------
        InputError
            Not an LTAU estimator directory, unknown format version, or files that do
            not agree with the header.
        """
        from mlipuq.io import load_npz, read_json

        directory = Path(directory)
        header_file = directory / "estimator.json"
        header = read_json(header_file) if header_file.is_file() else {}
        if header.get("format") != LEGACY_FORMAT_NAME:
            return super().load(directory)
        from mlipuq.io import read_header

        meta = read_header(header_file, what="LTAU estimator", format_name=LEGACY_FORMAT_NAME,
                           format_version=(1, 2))
        params = cls._params_from_json(dict(meta["params"]))
        if meta["format_version"] == 1:  # written before the distance-aware transfer
            params["transfer"] = "mean"
        estimator = cls(**params)
        estimator._set_state(meta, load_npz(directory / "ltau.npz"), directory)
        estimator.provenance_ = None
        return estimator


def _loco_means(
    sq_dist: np.ndarray, local: np.ndarray, own: np.ndarray, queries: np.ndarray, k: int
) -> np.ndarray:
    """Mean distance to the first k neighbours outside each query's own configuration.

    ``local`` (m, K) are neighbour rows (-1: none), ``own`` the configuration of every
    row, ``queries`` (m,) the query rows. A query whose neighbours are all in its own
    configuration leaves out only itself; one with no neighbour at all gets NaN.
    """
    valid = local >= 0
    safe = np.where(valid, local, 0)
    other = valid & (own[safe] != own[queries][:, None])
    alone = ~other.any(axis=1)
    if np.any(alone):
        other[alone] = valid[alone] & (safe[alone] != queries[alone, None])
    taken = other & (np.cumsum(other, axis=1) <= k)
    counts = taken.sum(axis=1)
    total = (np.sqrt(np.maximum(sq_dist, 0.0)) * taken).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def _memory_mapped(array: np.ndarray) -> bool:
    """True when ``array`` is (a view of) a memory-mapped file."""
    import mmap

    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _check_scale_scalar(scale: Any) -> float:
    if not np.isscalar(scale) or not np.isfinite(scale) or scale <= 0:
        raise InputError(f"scale: expected a positive number, got {scale!r}")
    return float(scale)


def _group_rows(symbols: np.ndarray, per_element: bool) -> dict[str, np.ndarray]:
    if not per_element:
        return {ALL_ELEMENTS: np.arange(len(symbols), dtype=np.int64)}
    return {
        str(element): np.flatnonzero(symbols == element).astype(np.int64)
        for element in np.unique(symbols)
    }


def _unknown_message(unknown: list[str], trained: np.ndarray) -> str:
    known = ", ".join(sorted(set(trained.tolist())))
    return f"species: element(s) {', '.join(unknown)} not in the training set (trained on {known})"


def _result(
    p: np.ndarray,
    expected: np.ndarray,
    distance: np.ndarray,
    normalised: np.ndarray,
    mass: np.ndarray | None,
    configs: np.ndarray | None,
    threshold: float | None,
    *,
    atom_level: bool,
    atol: float | None = None,
) -> UQResult:
    """The UQResult; ``atom_level=False``: the threshold is a configuration threshold
    (fitted on the mean of 1 - p), so only configurations are flagged."""
    from mlipuq.atom_table import config_max, config_mean

    uncertainty = 1.0 - p
    config_u = None if configs is None else config_mean(uncertainty, configs)
    extras = {"p": p, "expected_error": expected, "knn_distance": distance,
              "knn_distance_normalised": normalised}
    if configs is not None:
        extras["config_max_uncertainty"] = config_max(uncertainty, configs)
    if mass is not None:
        extras["distribution"] = mass
    atom_flags = config_flags = None
    if threshold is not None:
        atom_flags = uncertainty > threshold if atom_level else None
        config_flags = None if config_u is None else config_u > threshold
    return UQResult(
        method="ltau",
        atom_uncertainty=uncertainty,
        config_uncertainty=config_u,
        config_index=configs,
        atom_flags=atom_flags,
        config_flags=config_flags,
        threshold=None if threshold is None else float(threshold),
        unit="",
        config_aggregate=CONFIG_AGGREGATE,
        bounds=(0.0, 1.0),
        atol=None if atol is None else float(atol),
        extras=extras,
    )


def distance_result(ltau_result: UQResult) -> UQResult | None:
    """LTAU's normalised k-NN distance z as a result of its own (an out-of-domain score).

    Atom uncertainty z (1 = a typical training atom's distance to its neighbours),
    configuration uncertainty the mean z over the atoms. None when some atom has no z
    (an element with a single training atom, or an estimator without reference
    distances).
    """
    from mlipuq.atom_table import config_mean

    z = np.asarray(ltau_result.extras["knn_distance_normalised"], dtype=float)
    if not np.all(np.isfinite(z)):
        return None
    configs = ltau_result.config_index
    return UQResult(
        method=KNN_DISTANCE, atom_uncertainty=z, config_index=configs,
        config_uncertainty=None if configs is None else config_mean(z, configs),
        unit="", config_aggregate="mean", bounds=(0.0, None),
    )
