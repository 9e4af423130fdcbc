"""Active-learning selection: which configurations / atomic environments to label next.

Two levels, one logic:

- :func:`select_configurations`: configurations whose uncertainty exceeds a
  threshold, at most ``budget`` of them.
- :func:`select_environments`: atoms whose uncertainty exceeds a threshold; each
  selected atom is cut out with its neighbours within ``radius_A`` as a
  non-periodic cluster (MLIP-3 / pacemaker "neighbourhood" mode), ready for a
  cluster DFT calculation.

Steps (both levels):

1. candidates = uncertainty > threshold, ranked by uncertainty (rank 1 = highest);
2. near-duplicates dropped (``min_distance``): walking down the ranking, a
   candidate whose feature row is closer than ``min_distance`` (Euclidean, in the
   feature unit) to an already kept one is dropped;
3. if more candidates remain than ``budget``, a diverse subset is chosen:

   - ``diversity=None``: the ``budget`` most uncertain;
   - ``"maxvol"`` without ``reference_features``: rounds of MaxVol over the
     remaining candidates' feature rows; candidates are ranked by how many of
     their rows MaxVol puts in the active set (per-atom rows + ``config_index``:
     pacemaker's ``pace_select`` rule; one row per candidate: 0 or 1), ties by
     uncertainty; the taken ones are removed and the next round fills the budget;
   - ``"maxvol"`` with ``reference_features`` (the current training set): the
     active set of the reference is built by MaxVol, then candidates are added
     greedily: each pick is the candidate with the largest extrapolation grade
     against the current active set (the largest |det| gain of a single row
     swap), whose best row is then swapped in. When no candidate extends the
     volume (grade <= 1) the rest of the budget goes by uncertainty;
   - ``"cluster"``: k-means with ``budget`` clusters on the candidates' feature
     rows (seeded); the most uncertain candidate of each cluster.

Nothing is ever picked twice. :func:`write_selection` writes the picks as an
extxyz without calculator results (positions, cell, pbc, symbols and provenance
in ``info``) and a CSV table saying why each candidate was or was not chosen.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path
from mlipuq.validation import check_array

DIVERSITY = (None, "maxvol", "cluster")
TABLE_COLUMNS = (
    "index", "source", "config", "atom", "uncertainty", "threshold", "rank", "selected",
    "pick", "criterion",
)
_VOLUME_GAIN = 1.0 + 1e-9


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection.

    Attributes
    ----------
    level : str
        ``"config"`` or ``"atom"``.
    indices : ndarray of int64, shape (n_selected,)
        Selected configuration indices (config level) or atom rows into the
        concatenated atom arrays (atom level), in pick order.
    table : list of dict
        One row per candidate above the threshold (keys :data:`TABLE_COLUMNS`),
        sorted by rank; ``selected`` says whether it was picked and ``criterion`` why
        (or why not).
    threshold : float
        Threshold used, in the unit of the uncertainty.
    structures : list of ase.Atoms or None
        The cut clusters (atom level), in pick order.
    """

    level: str
    indices: np.ndarray
    table: list[dict]
    threshold: float
    structures: list[Atoms] | None = None

    @property
    def n_selected(self) -> int:
        """Number of picks."""
        return len(self.indices)


# --------------------------------------------------------------------------- validation


def check_threshold(threshold: float, *, upper_bound: float | None = None) -> float:
    """A finite threshold >= 0 (and <= ``upper_bound``, e.g. 1 for LTAU)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold: expected a number, got {threshold!r}") from None
    if not np.isfinite(value) or value < 0:
        raise InputError(f"threshold: expected a finite number >= 0, got {threshold!r}")
    if upper_bound is not None and value > upper_bound:
        raise InputError(f"threshold: expected a value <= {upper_bound:g}, got {value:g}")
    return value


def _check_uncertainty(values: np.ndarray, name: str, upper_bound: float | None) -> np.ndarray:
    array = check_array(values, name, ndim=1, nonnegative=True)
    if upper_bound is not None and array.max() > upper_bound:
        raise InputError(
            f"{name}: expected values in [0, {upper_bound:g}], got maximum {array.max():.6g}"
        )
    return array


def _check_budget(budget: int, n_total: int, what: str) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise InputError(f"budget: expected an integer >= 1, got {budget!r}")
    if budget > n_total:
        raise InputError(f"budget: {budget} is larger than the number of {what} ({n_total})")
    return int(budget)


def _check_options(diversity: str | None, min_distance: float | None) -> None:
    if diversity not in DIVERSITY:
        raise InputError(f"diversity: expected one of {list(DIVERSITY)}, got {diversity!r}")
    if min_distance is not None and (not np.isfinite(min_distance) or min_distance < 0):
        raise InputError(f"min_distance: expected a finite number >= 0, got {min_distance!r}")


# --------------------------------------------------------------------------- configurations


def select_configurations(
    uncertainty_cfg: np.ndarray,
    *,
    threshold: float,
    budget: int,
    features: np.ndarray | None = None,
    config_index: np.ndarray | None = None,
    reference_features: np.ndarray | None = None,
    diversity: str | None = None,
    min_distance: float | None = None,
    upper_bound: float | None = None,
    groups: Sequence[object] | np.ndarray | None = None,
    seed: int = 0,
) -> Selection:
    """Select at most ``budget`` configurations whose uncertainty exceeds ``threshold``.

    Parameters
    ----------
    uncertainty_cfg : ndarray of float, shape (C,)
        Per-configuration uncertainty (e.g. max gamma, 1 - p, U_F,cfg), >= 0.
    threshold : float
        Candidates have ``uncertainty_cfg > threshold`` (same unit).
    budget : int
        Maximum number of picks, 1 <= budget <= C.
    features : ndarray, shape (C, D) or (N, D), optional
        One row per configuration, or one per atom together with ``config_index``
        (then MaxVol counts atoms per configuration, and k-means / ``min_distance``
        use the per-configuration mean of the rows). Needed for ``diversity`` and
        ``min_distance``.
    config_index : ndarray of int, shape (N,), optional
        Configuration of each feature row when ``features`` is per atom.
    reference_features : ndarray, shape (R, D), optional
        Feature rows of the current training set (``"maxvol"`` only): candidates
        are chosen to extend its active set's volume.
    diversity : {None, "maxvol", "cluster"}
        How to choose among more candidates than ``budget``.
    min_distance : float, optional
        Drop candidates closer than this (feature unit) to a more uncertain kept one.
    upper_bound : float, optional
        Largest valid uncertainty (1 for LTAU); larger values or thresholds are errors.
    groups : sequence, shape (C,), optional
        A label per configuration (e.g. the MD run it comes from). The budget is
        shared out over the groups (:func:`share_budget`: round-robin, most uncertain
        group first, a group never gets more than its candidates) and the rule above
        runs within each group, as active-learning MD collects the extrapolative
        frames of every trajectory rather than of the most uncertain one only.
    seed : int
        Seed of k-means.

    Returns
    -------
    Selection
        ``level="config"``.

    Examples
    --------
    >>> sel = select_configurations(np.array([0.1, 3.0, 2.0, 5.0]), threshold=1.0, budget=2)
    >>> sel.indices.tolist()
    [3, 1]
    """
    _check_options(diversity, min_distance)
    uncertainty = _check_uncertainty(uncertainty_cfg, "uncertainty_cfg", upper_bound)
    threshold = check_threshold(threshold, upper_bound=upper_bound)
    n_cfg = len(uncertainty)
    budget = _check_budget(budget, n_cfg, "configurations")
    rows, owner = _config_rows(features, config_index, n_cfg, diversity, min_distance)
    pooled = _pool(rows, owner, n_cfg) if rows is not None else None
    reference = _check_reference(reference_features, rows)
    options = dict(rows=rows, owner=owner, pooled=pooled, reference=reference,
                   diversity=diversity, min_distance=min_distance, seed=seed)
    if groups is None:
        picks, table = _select(uncertainty, threshold, budget, **options)
    else:
        labels = _check_groups(groups, n_cfg)
        picks, table = _select_per_group(uncertainty, threshold, budget, labels, **options)
    for row in table:
        row.update(source=f"config {row['index']}", config=row["index"], atom=-1)
    return Selection("config", np.asarray(picks, dtype=np.int64), table, threshold)


def _config_rows(
    features: np.ndarray | None,
    config_index: np.ndarray | None,
    n_cfg: int,
    diversity: str | None,
    min_distance: float | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if features is None:
        if diversity is not None or min_distance is not None:
            raise InputError(f"features: required for diversity={diversity!r} / min_distance")
        if config_index is not None:
            raise InputError("config_index: given without features")
        return None, None
    rows = check_array(features, "features", ndim=2)
    if config_index is None:
        if len(rows) != n_cfg:
            raise InputError(
                f"features: expected one row per configuration ({n_cfg}), got {len(rows)} "
                "(pass config_index for per-atom rows)"
            )
        return rows, np.arange(n_cfg)
    owner = check_array(config_index, "config_index", ndim=1, dtype=np.int64)
    if len(owner) != len(rows):
        raise InputError(f"config_index: has {len(owner)} entries, features has {len(rows)} rows")
    if owner.min() < 0 or owner.max() >= n_cfg:
        raise InputError(f"config_index: values must lie in [0, {n_cfg}), got [{owner.min()}, "
                         f"{owner.max()}]")
    return rows, owner


def _pool(rows: np.ndarray, owner: np.ndarray, n_owner: int) -> np.ndarray:
    """Mean feature row per owner, shape (n_owner, D) (zeros where an owner has no rows)."""
    sums = np.zeros((n_owner, rows.shape[1]))
    np.add.at(sums, owner, rows)
    counts = np.bincount(owner, minlength=n_owner)
    return sums / np.maximum(counts, 1)[:, None]


def _check_reference(reference: np.ndarray | None, rows: np.ndarray | None) -> np.ndarray | None:
    if reference is None:
        return None
    reference = check_array(reference, "reference_features", ndim=2)
    if rows is not None and reference.shape[1] != rows.shape[1]:
        raise InputError(
            f"reference_features: expected {rows.shape[1]} features per row, "
            f"got {reference.shape[1]}"
        )
    return reference


# --------------------------------------------------------------------------- core


def _select(
    uncertainty: np.ndarray,
    threshold: float,
    budget: int,
    *,
    rows: np.ndarray | None,
    owner: np.ndarray | None,
    pooled: np.ndarray | None,
    reference: np.ndarray | None,
    diversity: str | None,
    min_distance: float | None,
    seed: int,
) -> tuple[list[int], list[dict]]:
    """Shared selection logic over "candidates" (configurations or atoms)."""
    above = np.flatnonzero(uncertainty > threshold)
    order = above[np.argsort(-uncertainty[above], kind="stable")]
    rank = {int(c): r + 1 for r, c in enumerate(order)}
    why: dict[int, str] = {}
    kept = [int(c) for c in order]
    if min_distance is not None:
        kept, why = _drop_near_duplicates(kept, pooled, min_distance)
    if len(kept) <= budget or diversity is None:
        picks = kept[:budget]
        reason = f"uncertainty > {threshold:g}, top {budget} by uncertainty"
        picked_why = {c: reason for c in picks}
    elif diversity == "cluster":
        picks, picked_why = _pick_kmeans(kept, pooled, uncertainty, budget, seed)
    elif reference is not None:
        picks, picked_why = _pick_volume_extension(kept, rows, owner, reference, uncertainty,
                                                   budget)
    else:
        picks, picked_why = _pick_maxvol_rounds(kept, rows, owner, uncertainty, budget)
    chosen = set(picks)
    pick_number = {c: k + 1 for k, c in enumerate(picks)}
    table = []
    for candidate in order:
        c = int(candidate)
        if c in chosen:
            criterion = picked_why[c]
        else:
            criterion = why.get(c, f"not selected: budget {budget} filled by more diverse or "
                                   "more uncertain candidates")
        table.append({
            "index": c, "uncertainty": float(uncertainty[c]), "threshold": threshold,
            "rank": rank[c], "selected": c in chosen, "pick": pick_number.get(c, 0),
            "criterion": criterion,
        })
    return picks, table


def _check_groups(groups: Sequence[object] | np.ndarray, n_cfg: int) -> np.ndarray:
    labels = np.asarray(groups).astype(str)
    if labels.shape != (n_cfg,):
        raise InputError(
            f"groups: expected one label per configuration ({n_cfg}), got shape {labels.shape}"
        )
    return labels


def share_budget(budget: int, n_candidates: Sequence[int]) -> np.ndarray:
    """Split ``budget`` over groups round-robin, never beyond a group's candidates.

    Parameters
    ----------
    budget : int
        Picks to share out.
    n_candidates : sequence of int, shape (G,)
        Candidates (above the threshold) of each group, in the order that gets
        the remainder first.

    Returns
    -------
    ndarray of int64, shape (G,)
        Picks per group; sums to ``min(budget, sum(n_candidates))``.

    Examples
    --------
    >>> share_budget(7, [10, 1, 10]).tolist()
    [3, 1, 3]
    """
    available = np.asarray(n_candidates, dtype=np.int64)
    quota = np.zeros(len(available), dtype=np.int64)
    remaining = min(int(budget), int(available.sum()))
    while remaining > 0:
        for group in np.flatnonzero(quota < available):
            if remaining == 0:
                break
            quota[group] += 1
            remaining -= 1
    return quota


def _select_per_group(
    uncertainty: np.ndarray, threshold: float, budget: int, labels: np.ndarray, **options
) -> tuple[list[int], list[dict]]:
    """:func:`_select` within each group on a share of the budget; one merged table."""
    names = np.unique(labels)
    peak = [float(np.max(uncertainty[labels == name])) for name in names]
    names = names[np.argsort(-np.asarray(peak), kind="stable")]  # remainder: most uncertain
    counts = [int(np.count_nonzero((labels == name) & (uncertainty > threshold)))
              for name in names]
    quotas = share_budget(budget, counts)
    picks: list[int] = []
    table: list[dict] = []
    for name, quota in zip(names, quotas, strict=True):
        masked = np.where(labels == name, uncertainty, -np.inf)
        if quota == 0:
            above = np.flatnonzero(masked > threshold)
            table += [{"index": int(c), "uncertainty": float(uncertainty[c]),
                       "threshold": threshold, "selected": False, "pick": 0,
                       "criterion": f"group {name}: not selected: no budget left"}
                      for c in above]
            continue
        group_picks, group_table = _select(masked, threshold, int(quota), **options)
        for row in group_table:
            row["criterion"] = f"group {name} ({quota} of {budget}): {row['criterion']}"
        picks += group_picks
        table += group_table
    return _merge_ranks(picks, table, uncertainty)


def _merge_ranks(
    picks: list[int], table: list[dict], uncertainty: np.ndarray
) -> tuple[list[int], list[dict]]:
    """Order picks and table rows by uncertainty; rank and pick number over all groups."""
    picks = sorted(picks, key=lambda c: -uncertainty[c])
    pick_number = {c: k + 1 for k, c in enumerate(picks)}
    table = sorted(table, key=lambda row: -row["uncertainty"])
    for rank, row in enumerate(table, start=1):
        row.update(rank=rank, pick=pick_number.get(row["index"], 0))
    return picks, table


def _drop_near_duplicates(
    candidates: list[int], pooled: np.ndarray, min_distance: float
) -> tuple[list[int], dict[int, str]]:
    kept: list[int] = []
    why: dict[int, str] = {}
    for c in candidates:
        if kept:
            distance = np.linalg.norm(pooled[kept] - pooled[c], axis=1)
            nearest = int(np.argmin(distance))
            if distance[nearest] < min_distance:
                why[c] = (f"dropped: near-duplicate of {kept[nearest]} (feature distance "
                          f"{distance[nearest]:.4g} < {min_distance:g})")
                continue
        kept.append(c)
    return kept, why


def _pick_kmeans(
    candidates: list[int], pooled: np.ndarray, uncertainty: np.ndarray, budget: int, seed: int
) -> tuple[list[int], dict[int, str]]:
    from sklearn.cluster import KMeans

    data = pooled[candidates]
    labels = KMeans(n_clusters=budget, random_state=seed, n_init=10).fit_predict(data)
    picks, why = [], {}
    for label in range(budget):
        members = [c for c, lab in zip(candidates, labels, strict=True) if lab == label]
        if not members:
            continue
        best = max(members, key=lambda c: uncertainty[c])
        picks.append(best)
        why[best] = (f"k-means cluster {label} of {budget} ({len(members)} candidates): "
                     "most uncertain member")
    picks.sort(key=lambda c: -uncertainty[c])
    return picks, why


def _pick_maxvol_rounds(
    candidates: list[int],
    rows: np.ndarray,
    owner: np.ndarray,
    uncertainty: np.ndarray,
    budget: int,
) -> tuple[list[int], dict[int, str]]:
    from mlipuq.maxvol import maxvol

    remaining = list(candidates)
    picks: list[int] = []
    why: dict[int, str] = {}
    round_number = 0
    while len(picks) < budget and remaining:
        round_number += 1
        row_ids = np.flatnonzero(np.isin(owner, remaining))
        if not np.any(rows[row_ids]):
            break  # all-zero rows: no volume to compare, fall back to uncertainty
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            active = row_ids[maxvol(rows[row_ids], warn=False).indices]
        counts = np.bincount(owner[active], minlength=len(uncertainty))
        ranked = sorted((c for c in remaining if counts[c] > 0),
                        key=lambda c: (-counts[c], -uncertainty[c]))
        if not ranked:
            break
        for c in ranked[: budget - len(picks)]:
            picks.append(c)
            why[c] = (f"MaxVol round {round_number}: {int(counts[c])} of {len(active)} "
                      "active-set rows")
        remaining = [c for c in remaining if c not in set(picks)]
    for c in remaining[: budget - len(picks)]:
        picks.append(c)
        why[c] = "uncertainty (MaxVol rounds exhausted)"
    return picks, why


def _pick_volume_extension(
    candidates: list[int],
    rows: np.ndarray,
    owner: np.ndarray,
    reference: np.ndarray,
    uncertainty: np.ndarray,
    budget: int,
) -> tuple[list[int], dict[int, str]]:
    from mlipuq.maxvol import active_set_inverse, maxvol

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = maxvol(reference, warn=False)
    projection = result.projection
    active = reference[result.indices].copy()
    remaining = list(candidates)
    picks: list[int] = []
    why: dict[int, str] = {}
    while len(picks) < budget and remaining:
        inverse = active_set_inverse(active, projection)
        row_ids = np.flatnonzero(np.isin(owner, remaining))
        coefficients = rows[row_ids] @ inverse
        gamma = np.abs(coefficients).max(axis=1)
        best_row = int(np.argmax(gamma))
        if gamma[best_row] <= _VOLUME_GAIN:
            break
        c = int(owner[row_ids[best_row]])
        slot = int(np.argmax(np.abs(coefficients[best_row])))
        active[slot] = rows[row_ids[best_row]]
        picks.append(c)
        why[c] = (f"MaxVol extension of the reference active set: grade "
                  f"{gamma[best_row]:.4g} (|det| gain of the swap)")
        remaining.remove(c)
    for c in remaining[: budget - len(picks)]:
        picks.append(c)
        why[c] = "uncertainty (no candidate extends the reference volume any more)"
    return picks, why


# --------------------------------------------------------------------------- environments


def select_environments(
    frames: Sequence[Atoms],
    atom_uncertainty: np.ndarray,
    config_index: np.ndarray | None = None,
    *,
    threshold: float,
    budget: int,
    radius_A: float,
    features: np.ndarray | None = None,
    reference_features: np.ndarray | None = None,
    diversity: str | None = None,
    min_distance: float | None = None,
    upper_bound: float | None = None,
    elements: Sequence[str] | None = None,
    seed: int = 0,
) -> Selection:
    """Select uncertain atoms and cut their neighbourhoods as non-periodic clusters.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        The C candidate configurations.
    atom_uncertainty : ndarray of float, shape (N,)
        Per-atom uncertainty of all atoms of ``frames`` in frame order.
    config_index : ndarray of int, shape (N,), optional
        Configuration of each atom; checked against ``frames`` (derived if omitted).
    threshold, budget : float, int
        Atoms with uncertainty > threshold are candidates; at most ``budget`` (<= N)
        are picked.
    radius_A : float
        Cut radius in Å: the cluster holds the atom and every atom (periodic images
        included) at distance < radius_A.
    features : ndarray, shape (N, D), optional
        Per-atom feature rows for ``diversity`` / ``min_distance``.
    reference_features, diversity, min_distance, upper_bound, seed
        As in :func:`select_configurations`, with one row per atom.
    elements : sequence of str, optional
        Known (training) elements: candidates with other elements are an error.

    Returns
    -------
    Selection
        ``level="atom"``, ``indices`` are atom rows, ``structures`` the clusters
        (``pbc=False``, no cell; ``info`` holds ``origin_config``, ``origin_atom``,
        ``radius_A``, ``uncertainty``; ``arrays["origin_atom"]`` maps each cluster atom
        to its atom in the source frame; the centre atom comes first).
    """
    if len(frames) == 0:
        raise InputError("frames: no configurations given")
    _check_options(diversity, min_distance)
    _check_elements(frames, elements)
    sizes = np.array([len(atoms) for atoms in frames], dtype=np.int64)
    derived = np.repeat(np.arange(len(frames), dtype=np.int64), sizes)
    uncertainty = _check_uncertainty(atom_uncertainty, "atom_uncertainty", upper_bound)
    if len(uncertainty) != sizes.sum():
        raise InputError(f"atom_uncertainty: has {len(uncertainty)} values, the frames have "
                         f"{int(sizes.sum())} atoms")
    if config_index is not None:
        given = check_array(config_index, "config_index", ndim=1, dtype=np.int64)
        if not np.array_equal(given, derived):
            raise InputError("config_index: does not match the frames (frame order, sizes)")
    if not np.isfinite(radius_A) or radius_A <= 0:
        raise InputError(f"radius_A: expected a positive length in Å, got {radius_A!r}")
    threshold = check_threshold(threshold, upper_bound=upper_bound)
    budget = _check_budget(budget, len(uncertainty), "atoms")
    rows = None
    if features is not None:
        rows = check_array(features, "features", ndim=2)
        if len(rows) != len(uncertainty):
            raise InputError(f"features: expected one row per atom ({len(uncertainty)}), got "
                             f"{len(rows)}")
    elif diversity is not None or min_distance is not None:
        raise InputError(f"features: required for diversity={diversity!r} / min_distance")
    owner = np.arange(len(uncertainty)) if rows is not None else None
    reference = _check_reference(reference_features, rows)
    picks, table = _select(
        uncertainty, threshold, budget, rows=rows, owner=owner, pooled=rows,
        reference=reference, diversity=diversity, min_distance=min_distance, seed=seed,
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for row in table:
        c = int(derived[row["index"]])
        a = int(row["index"] - offsets[c])
        row.update(source=f"config {c} atom {a}", config=c, atom=a)
    structures = []
    for number, pick in enumerate(picks):
        c = int(derived[pick])
        cluster = cut_environment(frames[c], int(pick - offsets[c]), radius_A)
        cluster.info.update(origin_config=c, uncertainty=float(uncertainty[pick]), pick=number + 1)
        structures.append(cluster)
    return Selection("atom", np.asarray(picks, dtype=np.int64), table, threshold, structures)


def _check_elements(frames: Sequence[Atoms], elements: Sequence[str] | None) -> None:
    if elements is None:
        return
    known = set(elements)
    for number, atoms in enumerate(frames):
        unknown = sorted(set(atoms.get_chemical_symbols()) - known)
        if unknown:
            raise InputError(f"candidates: configuration {number} has element(s) {unknown} "
                             f"not among the known elements {sorted(known)}")


def cut_environment(atoms: Atoms, center: int, radius_A: float) -> Atoms:
    """Cut the atom ``center`` and its neighbours within ``radius_A`` as a free cluster.

    Neighbours come from ``ase.neighborlist.neighbor_list`` on the (periodic)
    structure, so periodic images are included with their image positions (an atom
    may appear more than once if several of its images are within the radius in a
    small cell). Positions are ``r_center + d_ij`` (Å, the source frame's
    coordinates around the centre); the cluster has no cell and ``pbc=False``.

    Returns
    -------
    ase.Atoms
        Centre first, then neighbours by increasing distance; ``info`` holds
        ``origin_atom`` and ``radius_A``; ``arrays["origin_atom"]`` the source index of
        every atom.
    """
    from ase.neighborlist import neighbor_list

    if not 0 <= center < len(atoms):
        raise InputError(f"center: atom {center} out of range for {len(atoms)} atoms")
    i, j, vectors = neighbor_list("ijD", atoms, float(radius_A))
    mine = i == center
    j, vectors = j[mine], vectors[mine]
    order = np.argsort(np.linalg.norm(vectors, axis=1), kind="stable")
    j, vectors = j[order], vectors[order]
    origin = atoms.positions[center]
    positions = np.vstack([origin, origin + vectors])
    indices = np.concatenate([[center], j]).astype(np.int64)
    numbers = atoms.numbers[indices]
    cluster = Atoms(numbers=numbers, positions=positions, pbc=False)
    cluster.arrays["origin_atom"] = indices
    cluster.info.update(origin_atom=int(center), radius_A=float(radius_A))
    return cluster


# --------------------------------------------------------------------------- output


def labelling_copy(atoms: Atoms, **info: object) -> Atoms:
    """A copy with only symbols, positions, cell, pbc (and ``info`` provenance)."""
    copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                 pbc=atoms.pbc)
    for key in ("config_type",):
        if key in atoms.info:
            copy.info[key] = atoms.info[key]
    if "origin_atom" in atoms.arrays:
        copy.arrays["origin_atom"] = np.asarray(atoms.arrays["origin_atom"])
    for key in ("origin_config", "origin_atom", "radius_A", "uncertainty", "pick"):
        if key in atoms.info:
            copy.info[key] = atoms.info[key]
    copy.info.update(info)
    return copy


def write_selection(
    selection: Selection,
    path: str | os.PathLike,
    *,
    frames: Sequence[Atoms] | None = None,
    table_path: str | os.PathLike | None = None,
    source: str | None = None,
) -> list[Atoms]:
    """Write the picks as an extxyz for labelling and the reasons as a CSV table.

    Parameters
    ----------
    selection : Selection
        From :func:`select_configurations` (then ``frames`` is required) or
        :func:`select_environments` (its ``structures`` are written).
    path : path-like
        Output extxyz: no calculator results, only symbols, positions, cell, pbc
        and provenance in ``info`` (``selection_source``, ``origin_config``,
        ``uncertainty``, ``pick``, ...).
    frames : sequence of ase.Atoms, optional
        The candidate configurations (config level).
    table_path : path-like, optional
        CSV with one row per candidate above the threshold (columns
        :data:`TABLE_COLUMNS`).
    source : str, optional
        Name of the candidate file, recorded in ``info["selection_source"]``.

    Returns
    -------
    list of ase.Atoms
        The structures written.
    """
    from ase.io import write

    by_index = {row["index"]: row for row in selection.table}
    provenance = {"selection_source": source} if source else {}
    if selection.level == "config":
        if frames is None:
            raise InputError("frames: required to write a configuration-level selection")
        if selection.n_selected and max(selection.indices) >= len(frames):
            raise InputError(f"frames: has {len(frames)} configurations, the selection "
                             f"refers to configuration {max(selection.indices)}")
        out = [
            labelling_copy(frames[c], origin_config=int(c),
                           uncertainty=by_index[int(c)]["uncertainty"], pick=k + 1, **provenance)
            for k, c in enumerate(selection.indices)
        ]
    else:
        out = [labelling_copy(atoms, **provenance) for atoms in selection.structures or []]
    with atomic_path(path, suffix=".extxyz") as tmp:
        write(tmp, out, format="extxyz")
    if table_path is not None:
        write_table(selection, table_path, source=source)
    return out


def write_table(
    selection: Selection, path: str | os.PathLike, *, source: str | None = None
) -> None:
    """Write the selection's reasons table as CSV, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in selection.table:
        values = {key: row.get(key, "") for key in TABLE_COLUMNS}
        if source:
            values["source"] = f"{source}: {values['source']}"
        values["selected"] = int(bool(values["selected"]))
        writer.writerow(values)
    with atomic_path(path, suffix=".csv") as tmp:
        tmp.write_text(buffer.getvalue())
