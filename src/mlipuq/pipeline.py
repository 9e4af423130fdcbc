"""Backend-level glue: fit every UQ method on a NequIP run, predict test sets, evaluate.

This is the API under ``mlipuq evaluate`` and ``mlipuq demo``; each step is a few
lines over the estimators, so a script can use any step on its own::

    run = RunFolder.open("run")
    estimators = fit_methods(run)                           # saves them in the run
    outputs, forward = model_outputs(run, frames)           # one pass per member
    results, timings = predict_methods(estimators, outputs)
    metrics = evaluate_run(run, {"300K": "test_300K.extxyz"}, out_dir="report")

Choices (documented in ``docs/demo.md``):

- LTAU, D-optimality and clustered D-optimality use member ``model_id``'s
  descriptors (``node_features``) and are judged against *that* model's errors;
  the ensemble is judged against the errors of the ensemble mean (uq-ace eqs. 5-7).
- Costs are seconds per test atom of the UQ step; the ensemble's cost includes
  the forward passes of its other M - 1 members (its real extra cost).
- Calibration protocol: a seeded fraction of the configurations of one in-domain set
  (default the run's validation frames) fits LTAU's scale (``predict(scale=s)``
  gives the neighbours' CDF at ``atol / s_j``: test errors = s_j x training errors;
  :meth:`mlipuq.ltau.LTAUEstimator.calibrate`) and every method's threshold at an
  in-domain false-positive rate; every metric uses the other configurations.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.result import UQResult
from mlipuq.run_folder import RunFolder

METHODS = ("ltau", "ensemble", "doptimality", "clustered_doptimality")
"""Every method :func:`fit_methods` knows, in report order."""

DEFAULT_FPR = 0.05
"""In-domain false-positive rate (per configuration) of every fitted flag threshold."""

DEFAULT_K = 5
DEFAULT_CLUSTERS = 4

CALIBRATED = "ltau_calibrated"
"""Name of LTAU with the fitted scale factor in the results and the report."""

KNN_DISTANCE = "knn_distance"
"""Name of LTAU's normalised k-NN distance as an out-of-domain score of its own."""

ENSEMBLE_FILE = "ensemble.json"
DOPT_FILE = "doptimality.npz"
CLUSTERED_FILE = "clustered_doptimality.npz"
LTAU_FIT_FILE = "fit.json"  # same name and fields as ``mlipuq fit`` writes
METHODS_FILE = "methods.json"
"""Provenance of the saved ensemble and D-optimality estimators of a run."""

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# ---------------------------------------------------------------------- model outputs
def model_outputs(
    run: RunFolder,
    frames: Sequence[Atoms],
    *,
    model_ids: Sequence[str] | None = None,
    threads: int = 1,
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[dict[str, ModelOutputs], dict[str, float]]:
    """Energies, forces and descriptors of ``frames`` from each member of ``run``.

    Parameters
    ----------
    run : RunFolder
    frames : sequence of ase.Atoms
        C configurations, N atoms in total.
    model_ids : sequence of str, optional
        Members to evaluate (default: all).
    threads : int
        torch threads during the passes (restored afterwards).
    batch_size : int
        Frames per forward pass.
    device : str
        torch device.

    Returns
    -------
    outputs : dict of str -> ModelOutputs
        Per member: energies (C,) eV, forces (N, 3) eV/Å, descriptors (N, D).
    seconds_per_atom : dict of str -> float
        Wall time of each member's forward passes per atom (model loading excluded).
    """
    from mlipuq.backends.nequip.features import NequIPBackend

    outputs, seconds = {}, {}
    n_atoms = sum(len(atoms) for atoms in frames)
    for model_id in model_ids or run.model_ids:
        backend = NequIPBackend(
            run.model_path(model_id), device=device, batch_size=batch_size, threads=threads
        )
        backend.known_species  # noqa: B018 -- load the model outside the timed pass
        start = time.perf_counter()
        outputs[model_id] = backend.outputs(frames)
        seconds[model_id] = (time.perf_counter() - start) / max(n_atoms, 1)
    return outputs, seconds


def _check_member(run: RunFolder, model_id: str) -> None:
    if model_id not in run.model_ids:
        raise InputError(
            f"--model-id: {model_id!r} is not a member of {run.path} (members: {run.model_ids})"
        )


def _stack(outputs: Mapping[str, ModelOutputs]) -> tuple[np.ndarray, np.ndarray]:
    """Forces (K, N, 3) and energies (K, C) of all members."""
    members = list(outputs.values())
    return (
        np.stack([o.forces for o in members]),
        np.stack([o.energies for o in members]),
    )


# ---------------------------------------------------------------------- fitting
def available_methods(run: RunFolder, methods: Sequence[str] | None = None) -> tuple[str, ...]:
    """Check ``methods`` against :data:`METHODS` and the run (ensemble needs M >= 2).

    ``None`` selects every method the run supports (the ensemble only with >= 2 models).
    """
    if methods is None:
        return tuple(m for m in METHODS if m != "ensemble" or len(run.model_ids) >= 2)
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"methods: expected some of {list(METHODS)}, got {list(methods)}")
    if "ensemble" in methods and len(run.model_ids) < 2:
        raise InputError(
            f"methods: 'ensemble' needs at least 2 models, the run {run.path} has "
            f"{len(run.model_ids)}"
        )
    return methods


def fit_methods(
    run: RunFolder,
    *,
    model_id: str = "model_0",
    methods: Sequence[str] | None = None,
    train_outputs: Mapping[str, ModelOutputs] | None = None,
    k: int = 5,
    ltau_window: tuple[int, int | None] | None = None,
    ltau_transfer: str = "distance",
    n_clusters: int = 4,
    threads: int = 1,
    seed: int = 0,
    save: bool = True,
) -> dict[str, Any]:
    """Fit the UQ methods on the training set of ``run`` (and save them in it).

    Parameters
    ----------
    run : RunFolder
        A trained run (``mlipuq train``).
    model_id : str
        Member whose descriptors LTAU and (clustered) D-optimality use.
    methods : sequence of str, optional
        Subset of :data:`METHODS` (default: all the run supports).
    train_outputs : dict of str -> ModelOutputs, optional
        Outputs of the members on ``run.train_frames()`` (computed when missing).
    k : int
        LTAU neighbours.
    ltau_window : (start, size), optional
        Epoch window of LTAU's error distributions (default: every logged epoch).
    ltau_transfer : {"distance", "mean"}
        LTAU's transfer (:class:`~mlipuq.ltau.LTAUEstimator` ``transfer``).
    n_clusters : int
        k-means clusters of clustered D-optimality.
    threads : int
        torch and FAISS threads.
    seed : int
        Clustering seed.
    save : bool
        Write ``RUN/ltau``, ``RUN/ensemble.json``, ``RUN/doptimality.npz`` and
        ``RUN/clustered_doptimality.npz``.

    Returns
    -------
    dict of str -> estimator
        Fitted :class:`~mlipuq.ltau.LTAUEstimator`,
        :class:`~mlipuq.ensemble.EnsembleEstimator`,
        :class:`~mlipuq.doptimality.DOptimalityEstimator`,
        :class:`~mlipuq.clustered_doptimality.ClusteredDOptimalityEstimator`.
    """
    methods = available_methods(run, methods)
    _check_member(run, model_id)
    if train_outputs is None:
        needed = run.model_ids if "ensemble" in methods else [model_id]
        train_outputs, _ = model_outputs(run, run.train_frames(), model_ids=needed,
                                         threads=threads)
    base = train_outputs[model_id]
    estimators: dict[str, Any] = {}
    for name in methods:
        estimators[name] = _FITTERS[name](run, base, train_outputs, k=k, n_clusters=n_clusters,
                                          threads=threads, seed=seed, window=ltau_window,
                                          transfer=ltau_transfer, model_id=model_id)
    fit_on_validation(run, estimators, model_id=model_id, threads=threads)
    if save:
        save_methods(run, estimators, model_id=model_id)
    return estimators


def _fit_ltau(run, base, _outputs, *, k, threads, window, model_id, transfer="distance", **_):
    from mlipuq.ltau import LTAUEstimator

    if not run.store_path.is_dir():
        raise InputError(f"{run.store_path}: the run has no error trajectories (needed by LTAU)")
    estimator = LTAUEstimator(k=k, window=window, n_threads=threads, transfer=transfer)
    return estimator.fit(run.store, base.descriptors, base.species)


def fit_on_validation(
    run: RunFolder,
    estimators: Mapping[str, Any],
    *,
    model_id: str,
    fpr: float = DEFAULT_FPR,
    threads: int = 1,
    batch_size: int = 16,
    device: str = "cpu",
) -> str | None:
    """Fit what needs in-domain held-out data on the run's validation frames, in place.

    The validation frames are in domain and were never trained on. LTAU is calibrated
    (scale factor, beta, threshold: :meth:`~mlipuq.ltau.LTAUEstimator.calibrate`; a
    scale at its search bound is flagged in ``calibration_``, not warned about). Every
    other method's flag threshold becomes the (1 - ``fpr``) quantile of its
    configuration uncertainty on those frames (:func:`fit_thresholds`): D-optimality's
    ``threshold`` parameter, the ensemble's force thresholds (``threshold_source_``
    then says so). The calculator, ``simulate`` and ``select`` use them.

    Returns
    -------
    str or None
        None when fitted, else why not (no validation frames, or frames without
        forces); the estimators are then left as they were.
    """
    from mlipuq.io import read_structures, reference_forces

    path = run.val_path
    if not path.is_file() or path.stat().st_size == 0:
        return f"no validation frames ({path.name})"
    frames = read_structures(path)
    reference = [reference_forces(atoms) for atoms in frames]
    if any(forces is None for forces in reference):
        return f"{path.name} has frames without forces"
    members = run.model_ids if "ensemble" in estimators else [model_id]
    outputs, _ = model_outputs(run, frames, model_ids=members, threads=threads,
                               batch_size=batch_size, device=device)
    out = outputs[model_id]
    if "ltau" in estimators:
        errors = np.linalg.norm(np.concatenate(reference) - out.forces, axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            estimators["ltau"].calibrate(out.descriptors, out.species, errors,
                                         config_index=out.config_index, fpr=fpr)
    others = {name: e for name, e in estimators.items() if name != "ltau"}
    if others:
        results, _ = predict_methods(others, outputs, model_id=model_id)
        for name, value in fit_thresholds(results, fpr).items():
            _set_threshold(others[name], value, f"FPR {fpr:g} on {path.name}")
    return None


def _set_threshold(estimator: Any, value: float, source: str) -> None:
    """Give a fitted estimator a configuration threshold fitted elsewhere."""
    if hasattr(estimator, "thresholds_"):  # the ensemble: its force thresholds
        estimator.thresholds_["atom_force"] = float(value)
        estimator.thresholds_["config_force"] = float(value)
        estimator.threshold_source_ = (f"forces: {source}; energy: {estimator.threshold_source_} "
                                       "fence of the training set")
    else:  # D-optimality: gamma threshold (a max over atoms: atom and config flags agree)
        estimator.threshold = float(value)


def _fit_ensemble(_run, base, outputs, **_):
    from mlipuq.ensemble import EnsembleEstimator

    forces, energies = _stack(outputs)
    return EnsembleEstimator().fit(forces, energies, base.config_index)


def _fit_doptimality(_run, base, _outputs, **_):
    from mlipuq.doptimality import DOptimalityEstimator

    return DOptimalityEstimator().fit(base.descriptors.astype(np.float64), base.species)


def _fit_clustered(_run, base, _outputs, *, n_clusters, seed, **_):
    from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator

    estimator = ClusteredDOptimalityEstimator(n_clusters=n_clusters, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank notes of small clusters
        return estimator.fit(base.descriptors.astype(np.float64), base.species)


_FITTERS = {
    "ltau": _fit_ltau,
    "ensemble": _fit_ensemble,
    "doptimality": _fit_doptimality,
    "clustered_doptimality": _fit_clustered,
}


def save_methods(run: RunFolder, estimators: Mapping[str, Any], *, model_id: str) -> None:
    """Save fitted estimators into the run folder (each write atomic), with provenance.

    LTAU's provenance goes into ``RUN/ltau/fit.json``; the others' into
    ``RUN/methods.json`` (per method: the member it describes and
    :func:`mlipuq.provenance.run_provenance`), written after the estimator files.
    """
    from mlipuq.io import read_json, write_json
    from mlipuq.provenance import run_provenance

    files = {"ensemble": ENSEMBLE_FILE, "doptimality": DOPT_FILE,
             "clustered_doptimality": CLUSTERED_FILE}
    records = {}
    for name, estimator in estimators.items():
        if name == "ltau":
            save_ltau(run, estimator, model_id)
            continue
        estimator.save(run.path / files[name])
        members = run.model_ids if name == "ensemble" else [model_id]
        records[name] = {"model_id": model_id, **run_provenance(run, members)}
    if records:
        path = run.path / METHODS_FILE
        saved = read_json(path) if path.is_file() else {}
        write_json(path, {**saved, **records})


def save_ltau(run: RunFolder, estimator: Any, model_id: str) -> None:
    """Save a fitted LTAU estimator as ``RUN/ltau`` (used by ``mlipuq fit`` too).

    Writes into a temporary directory inside RUN and renames it onto ``RUN/ltau``,
    so a reader never sees a half-written estimator; ``RUN/ltau/fit.json`` records
    the member whose descriptors it was fitted on (the calculator checks it).
    """
    from mlipuq import __version__
    from mlipuq.io import atomic_directory, write_json
    from mlipuq.provenance import run_provenance

    with atomic_directory(run.ltau_dir) as tmp:
        estimator.save(tmp)
        write_json(tmp / LTAU_FIT_FILE, {
            "model_id": model_id,
            "model_file": str(run.model_path(model_id).relative_to(run.path)),
            "mlipuq_version": __version__,
            **run_provenance(run, [model_id]),
        })


def load_methods(run: RunFolder, methods: Sequence[str], *, model_id: str) -> dict[str, Any]:
    """The estimators saved in ``run`` for ``methods`` (those present and matching).

    A saved estimator is loaded only when it describes ``model_id`` (the ensemble: every
    member) and its provenance matches the run as it is now: the same model files
    (SHA-256) and training set (:func:`mlipuq.provenance.stale_reason`). Missing or
    stale methods are absent from the returned dict (the caller refits them).
    """
    from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator
    from mlipuq.doptimality import DOptimalityEstimator
    from mlipuq.ensemble import EnsembleEstimator
    from mlipuq.io import read_json
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.provenance import stale_reason

    records_file = run.path / METHODS_FILE
    records = read_json(records_file) if records_file.is_file() else {}
    loaded: dict[str, Any] = {}
    for name in methods:
        if name == "ltau":
            fit_file = run.ltau_dir / LTAU_FIT_FILE
            record = read_json(fit_file) if fit_file.is_file() else {}
            if record.get("model_id") == model_id and stale_reason(record, run) is None:
                loaded[name] = LTAUEstimator.load(run.ltau_dir)
            continue
        record = records.get(name, {})
        if (name != "ensemble" and record.get("model_id") != model_id) or (
                stale_reason(record, run) is not None):
            continue
        cls, file = {
            "ensemble": (EnsembleEstimator, ENSEMBLE_FILE),
            "doptimality": (DOptimalityEstimator, DOPT_FILE),
            "clustered_doptimality": (ClusteredDOptimalityEstimator, CLUSTERED_FILE),
        }[name]
        if (run.path / file).is_file():
            loaded[name] = cls.load(run.path / file)
    return loaded


# ---------------------------------------------------------------------- prediction
def predict_methods(
    estimators: Mapping[str, Any],
    outputs_by_member: Mapping[str, ModelOutputs],
    *,
    model_id: str = "model_0",
) -> tuple[dict[str, UQResult], dict[str, float]]:
    """Every estimator's :class:`UQResult` on one set of model outputs, with timings.

    Parameters
    ----------
    estimators : dict of str -> fitted estimator
        From :func:`fit_methods` or :func:`load_methods`; ``"ltau"`` is predicted at
        s = 1 (uncalibrated), :data:`CALIBRATED` (an LTAU estimator after
        :meth:`~mlipuq.ltau.LTAUEstimator.calibrate`) with its fitted scale.
    outputs_by_member : dict of str -> ModelOutputs
        Outputs of the members on the test frames (all members for the ensemble).
    model_id : str
        Member whose descriptors the descriptor-based methods use.

    Returns
    -------
    results : dict of str -> UQResult
    seconds_per_atom : dict of str -> float
        Wall time of each method's UQ step per atom (ensemble: the deviation
        arithmetic only; add the other members' forward passes for its full cost).
    """
    if model_id not in outputs_by_member:
        raise InputError(f"outputs_by_member: no outputs of {model_id!r}")
    base = outputs_by_member[model_id]
    n_atoms = len(base.species)
    results: dict[str, UQResult] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, call: Callable[[], UQResult]) -> None:
        start = time.perf_counter()
        results[name] = call()
        seconds[name] = (time.perf_counter() - start) / max(n_atoms, 1)

    for name, estimator in estimators.items():
        if name in ("ltau", CALIBRATED):
            chosen = estimator.uncalibrated() if name == "ltau" else estimator
            timed(name, lambda e=chosen, n=name: _renamed(e.predict(
                base.descriptors, base.species, config_index=base.config_index), n))
            distance = distance_result(results[name]) if name == "ltau" else None
            if distance is not None:  # the search gives the distance for free: same cost
                results[KNN_DISTANCE] = distance
                seconds[KNN_DISTANCE] = seconds[name]
        elif name == "ensemble":
            forces, energies = _stack(outputs_by_member)
            timed(name, lambda e=estimator, f=forces, en=energies: e.predict(
                f, en, base.config_index))
        else:
            timed(name, lambda e=estimator: e.predict(
                base.descriptors.astype(np.float64), base.species,
                config_index=base.config_index))
    return results, seconds


def distance_result(ltau_result: UQResult) -> UQResult | None:
    """LTAU's normalised k-NN distance z as a result of its own (an out-of-domain score).

    Atom uncertainty z (1 = a typical training atom's distance to its neighbours),
    configuration uncertainty the mean z over the atoms. None when some atom has no z
    (an estimator saved before reference distances existed, or an element with a
    single training atom).
    """
    from mlipuq.atom_table import config_mean

    z = np.asarray(ltau_result.extras["knn_distance_normalised"], dtype=float)
    if not np.all(np.isfinite(z)):
        return None
    configs = ltau_result.config_index
    return UQResult(
        method=KNN_DISTANCE, atom_uncertainty=z, config_index=configs,
        config_uncertainty=None if configs is None else config_mean(z, configs),
        unit="", config_aggregate="mean",
    )


def _renamed(result: UQResult, method: str) -> UQResult:
    from dataclasses import replace

    return replace(result, method=method)


# ---------------------------------------------------------------------- test sets
@dataclass(frozen=True)
class EvaluationData:
    """Test sets concatenated in one list with their reference values.

    Attributes
    ----------
    frames : list of ase.Atoms
        All configurations (C), set after set.
    groups : ndarray of str, shape (C,)
        Test-set name of each configuration.
    config_index : ndarray of int, shape (N,)
    ref_forces : ndarray, shape (N, 3)
        Reference forces in eV/Å; NaN rows for configurations without forces.
    ref_energies : ndarray, shape (C,)
        Reference energies in eV; NaN where absent.
    """

    frames: list
    groups: np.ndarray
    config_index: np.ndarray
    ref_forces: np.ndarray
    ref_energies: np.ndarray

    def atom_groups(self) -> np.ndarray:
        """Test-set name of each atom, shape (N,)."""
        return self.groups[self.config_index]


def load_test_sets(
    test_sets: Mapping[str, str | os.PathLike | Sequence[Atoms]], elements: Sequence[str]
) -> EvaluationData:
    """Read and check test sets: files must exist, be non-empty, and hold known elements.

    Parameters
    ----------
    test_sets : dict of name -> path or list of ase.Atoms
    elements : sequence of str
        Chemical symbols of the training set.

    Raises
    ------
    InputError
        No test sets, a missing or unreadable file, an empty set, or elements not in
        the training set (the message names the file and the elements).
    """
    from mlipuq.io import read_structures, reference_energy, reference_forces

    if not test_sets:
        raise InputError("test sets: none given (use --test NAME=PATH)")
    known = set(elements)
    frames: list[Atoms] = []
    groups: list[str] = []
    forces: list[np.ndarray] = []
    energies: list[float] = []
    for name, source in test_sets.items():
        if isinstance(source, (str, os.PathLike)):
            label = str(source)
            if Path(source).is_file() and Path(source).stat().st_size == 0:
                raise InputError(f"{label}: empty file (no configurations)")
            found = read_structures(source)
        else:
            label = f"test set {name!r}"
            found = list(source)
        if not found:
            raise InputError(f"{label}: contains no configurations")
        present = set()
        for number, atoms in enumerate(found):
            if len(atoms) == 0:
                raise InputError(f"{label}: configuration {number} has no atoms")
            present.update(atoms.get_chemical_symbols())
        unknown = sorted(present - known)
        if unknown:
            raise InputError(
                f"{label}: element(s) {', '.join(unknown)} not in the training set "
                f"(trained on {', '.join(sorted(known))})"
            )
        for number, atoms in enumerate(found):
            ref = reference_forces(atoms)
            ok = ref is not None and np.shape(ref) == (len(atoms), 3)
            if ok and not np.all(np.isfinite(ref)):
                raise InputError(f"{label}: configuration {number} has NaN or infinite "
                                 "reference forces")
            forces.append(np.asarray(ref, float) if ok else np.full((len(atoms), 3), np.nan))
            energy = reference_energy(atoms)
            if energy is not None and not np.isfinite(energy):
                raise InputError(f"{label}: configuration {number} has a NaN or infinite "
                                 "reference energy")
            energies.append(np.nan if energy is None else float(energy))
            groups.append(str(name))
        frames.extend(found)
    sizes = [len(atoms) for atoms in frames]
    return EvaluationData(
        frames=frames,
        groups=np.asarray(groups),
        config_index=np.repeat(np.arange(len(frames), dtype=np.int64), sizes),
        ref_forces=np.concatenate(forces),
        ref_energies=np.asarray(energies, dtype=float),
    )


# ---------------------------------------------------------------------- calibration
def split_configurations(
    groups: np.ndarray, calibration_set: str, fraction: float, seed: int
) -> np.ndarray:
    """Calibration configurations: a seeded ``fraction`` of those of ``calibration_set``.

    Parameters
    ----------
    groups : ndarray of str, shape (C,)
        Test-set name of each configuration.
    calibration_set : str
        The in-domain set to split.
    fraction : float
        Share of its configurations used for calibration, in (0, 1).
    seed : int
        Seed of the split.

    Returns
    -------
    ndarray of bool, shape (C,)
        True for the calibration configurations (the rest stay held out).
    """
    from mlipuq.calibration import split_calibration

    local = np.flatnonzero(groups == calibration_set)
    if len(local) < 2:
        raise InputError(
            f"--calibrate-on: test set {calibration_set!r} has {len(local)} configuration(s); "
            "at least 2 are needed to split it into calibration and held-out parts"
        )
    cal, _ = split_calibration(len(local), fraction, seed)
    mask = np.zeros(len(groups), bool)
    mask[local[cal]] = True
    return mask


def _kept_atoms(configs: np.ndarray, config_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(atom mask (N,), config_index of those atoms renumbered 0..C'-1) for ``configs``."""
    atoms = configs[config_index]
    return atoms, (np.cumsum(configs) - 1)[config_index[atoms]]


def subset_outputs(outputs: ModelOutputs, configs: np.ndarray) -> ModelOutputs:
    """The outputs of the configurations where ``configs`` (bool, (C,)) is True,
    renumbered 0..C'-1 in their order."""
    atoms, index = _kept_atoms(configs, outputs.config_index)
    return ModelOutputs(
        energies=outputs.energies[configs],
        forces=outputs.forces[atoms],
        descriptors=outputs.descriptors[atoms],
        species=outputs.species[atoms],
        config_index=index,
    )


def subset_data(data: EvaluationData, configs: np.ndarray) -> EvaluationData:
    """The test data of the configurations where ``configs`` (bool, (C,)) is True."""
    atoms, index = _kept_atoms(configs, data.config_index)
    return EvaluationData(
        frames=[frame for frame, keep in zip(data.frames, configs, strict=True) if keep],
        groups=data.groups[configs],
        config_index=index,
        ref_forces=data.ref_forces[atoms],
        ref_energies=data.ref_energies[configs],
    )


def calibrate_ltau(
    ltau: Any,
    calibration_outputs: ModelOutputs,
    calibration_errors: np.ndarray,
    *,
    fpr: float = DEFAULT_FPR,
) -> Any:
    """A copy of ``ltau`` calibrated on in-domain held-out atoms (scale and threshold).

    Only atoms with reference forces count; see
    :meth:`mlipuq.ltau.LTAUEstimator.calibrate`. A scale at a search bound is kept and
    flagged in ``calibration_["at_bound"]`` (the warning is left to the caller).
    """
    rows = np.flatnonzero(np.isfinite(calibration_errors))
    if len(rows) == 0:
        raise InputError("--calibrate-on: the calibration configurations have no reference "
                         "forces (LTAU is calibrated on force errors)")
    calibrated = ltau.uncalibrated()  # shares the indices and histograms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        calibrated.calibrate(
            calibration_outputs.descriptors[rows], calibration_outputs.species[rows],
            calibration_errors[rows], config_index=calibration_outputs.config_index[rows],
            fpr=fpr)
    return calibrated


def fit_thresholds(
    results: Mapping[str, UQResult], fpr: float = DEFAULT_FPR
) -> dict[str, float]:
    """Per method: the threshold flagging a share ``fpr`` of in-domain configurations.

    ``results`` are the methods' predictions on held-out in-domain configurations
    (the calibration part); the threshold is the (1 - ``fpr``) quantile of each
    method's configuration uncertainty (:func:`mlipuq.thresholds.fpr_threshold`).
    """
    from mlipuq.thresholds import fpr_threshold

    out = {}
    for name, result in results.items():
        scores = result.config_uncertainty
        if scores is None:
            scores = result.atom_uncertainty
        scores = np.asarray(scores, dtype=float)
        scores = scores[np.isfinite(scores)]
        if len(scores):
            out[name] = fpr_threshold(scores, fpr)
    return out


def ece_by_set(
    p_before: np.ndarray, p_after: np.ndarray, errors: np.ndarray, atom_groups: np.ndarray,
    atol: float,
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """ECE of p before and after calibration on each set's atoms with forces."""
    from mlipuq import metrics

    before, after = {}, {}
    for name in dict.fromkeys(atom_groups.tolist()):
        idx = np.flatnonzero((atom_groups == name) & np.isfinite(errors))
        before[name] = float(metrics.ece(p_before[idx], errors[idx], atol)) if len(idx) else None
        after[name] = float(metrics.ece(p_after[idx], errors[idx], atol)) if len(idx) else None
    return before, after


# ---------------------------------------------------------------------- evaluation
def evaluate_run(
    run: RunFolder | str | os.PathLike,
    test_sets: Mapping[str, str | os.PathLike | Sequence[Atoms]],
    *,
    out_dir: str | os.PathLike,
    methods: Sequence[str] | None = None,
    calibration_set: tuple[str, float] | None = None,
    in_domain: Sequence[str] | None = None,
    model_id: str = "model_0",
    refit: bool = False,
    fpr: float = DEFAULT_FPR,
    thresholds: Mapping[str, float] | None = None,
    k: int | None = None,
    ltau_window: tuple[int, int | None] | None = None,
    ltau_transfer: str | None = None,
    n_clusters: int | None = None,
    threads: int = 1,
    seed: int = 0,
    title: str | None = None,
    progress: Progress = _quiet,
) -> dict:
    """Fit (or load) the methods, predict every test set, evaluate, write the report.

    Protocol: a seeded ``fraction`` of the configurations of one in-domain set (the
    calibration set: ``calibration_set``, by default the run's validation frames as
    the set ``"validation"``) is used only to fit LTAU's scale and every method's flag
    threshold (at in-domain false-positive rate ``fpr`` per configuration); every
    metric is computed on the other configurations, so the in-domain figures are
    held out.

    Parameters
    ----------
    run : RunFolder or path
        Trained run (``mlipuq train``).
    test_sets : dict of name -> path or list of ase.Atoms
        Test sets; a set without reference forces is evaluated on energies only.
    out_dir : path-like
        Report directory (``index.html``, ``metrics.json``, PNGs); replaced as a whole.
    methods : sequence of str, optional
        Subset of :data:`METHODS` (default: all the run supports).
    calibration_set : (name, fraction), optional
        In-domain set to calibrate on and the share of its configurations used. None:
        ``("validation", 0.5)`` with the run's ``val.extxyz`` added as a test set (no
        calibration when the run has no validation frames).
    in_domain : sequence of str, optional
        In-domain test sets (default: the calibration set); the others are out of
        domain for ROC-AUC / TPR / FPR.
    model_id : str
        Member whose descriptors and errors the single-model methods use.
    refit : bool
        Refit even when estimators are saved in the run (else saved ones are reused).
    fpr : float
        In-domain false-positive rate (per configuration) of the fitted thresholds.
    thresholds : dict of str -> float, optional
        Thresholds given by the user (per method name); they replace the fitted ones.
    k, ltau_window, ltau_transfer, n_clusters : optional
        LTAU neighbours, epoch window and transfer ("distance" or "mean"), clusters of
        clustered D-optimality. None: reuse a saved estimator whatever its value, else
        fit with 5 / every epoch / "distance" / 4; a value that differs from the saved
        estimator's makes that method refit.
    threads, seed
        torch/FAISS threads; seed of the clustering and of the calibration split.
    title : str, optional
        Report title.
    progress : callable, optional
        Called with one line per step.

    Returns
    -------
    dict
        The metrics of :func:`mlipuq.evaluation.evaluate` with extra keys
        ``"calibration"``, ``"thresholds"``, ``"test_sets"``, ``"run"``,
        ``"errors_from"``, ``"forward_seconds_per_atom"`` (as written to
        ``out_dir/metrics.json``).
    """
    from mlipuq.backends.nequip.features import torch_threads

    run = run if isinstance(run, RunFolder) else RunFolder.open(run)
    _check_member(run, model_id)
    methods = available_methods(run, methods)
    if not 0.0 < float(fpr) < 1.0:
        raise InputError(f"--fpr: expected a rate in (0, 1), got {fpr!r}")
    test_sets, calibration_set = _with_validation(run, test_sets, calibration_set)
    data = load_test_sets(test_sets, run.elements)
    names = list(dict.fromkeys(data.groups.tolist()))
    cal_name, fraction = _check_calibration(calibration_set, names)
    in_domain = _check_in_domain(in_domain, cal_name, names)
    user_thresholds = _check_thresholds(thresholds, methods)
    with torch_threads(threads):
        estimators = _fitted(run, methods, model_id=model_id, refit=refit, k=k,
                             window=ltau_window, transfer=ltau_transfer,
                             n_clusters=n_clusters, threads=threads, seed=seed,
                             progress=progress)
        members = run.model_ids if "ensemble" in methods else [model_id]
        progress(f"predicting {len(data.frames)} test configurations "
                 f"({len(data.config_index)} atoms) with {len(members)} model(s)")
        outputs, forward = model_outputs(run, data.frames, model_ids=members, threads=threads)

    is_cal = (np.zeros(len(data.frames), bool) if cal_name is None
              else split_configurations(data.groups, cal_name, fraction, seed))
    held = subset_data(data, ~is_cal)
    held_outputs = {m: subset_outputs(o, ~is_cal) for m, o in outputs.items()}
    calibration, fitted = None, {}
    if cal_name is not None:
        cal_outputs = {m: subset_outputs(o, is_cal) for m, o in outputs.items()}
        cal_data = subset_data(data, is_cal)
        if "ltau" in estimators:
            progress(f"calibrating LTAU on {fraction:.0%} of the configurations of {cal_name!r}")
            errors = np.linalg.norm(cal_data.ref_forces - cal_outputs[model_id].forces, axis=1)
            estimators[CALIBRATED] = calibrate_ltau(estimators["ltau"], cal_outputs[model_id],
                                                    errors, fpr=fpr)
        cal_results, _ = predict_methods(estimators, cal_outputs, model_id=model_id)
        fitted = fit_thresholds(cal_results, fpr)
    progress("uncertainty of every method")
    results, seconds = predict_methods(estimators, held_outputs, model_id=model_id)
    if "ensemble" in results:  # its real cost: the other members' forward passes too
        seconds["ensemble"] += sum(v for m, v in forward.items() if m != model_id)
    base = held_outputs[model_id]
    force_errors = np.linalg.norm(held.ref_forces - base.forces, axis=1)
    energy_errors = np.abs(held.ref_energies - base.energies)
    if CALIBRATED in estimators:
        calibration = _calibration_summary(estimators[CALIBRATED], cal_name, fraction, seed,
                                           results, force_errors, held)
    threshold_info = _threshold_info(results, fitted, user_thresholds, fpr, cal_name,
                                     int(is_cal.sum()))
    metrics = _evaluate_all(results, estimators, held, held_outputs, force_errors,
                            energy_errors, in_domain, seconds, forward[model_id],
                            {n: t["value"] for n, t in threshold_info.items()})
    metrics["calibration"] = calibration
    metrics["thresholds"] = threshold_info
    metrics["run"] = _run_info(run, model_id, estimators)
    metrics["forward_seconds_per_atom"] = forward
    metrics["test_sets"] = test_set_table(held, held_outputs, model_id, in_domain)
    progress(f"writing the report to {out_dir}")
    index = _write(metrics, out_dir, results, force_errors, energy_errors, held, title)
    metrics["report"] = str(index)
    return metrics


VALIDATION = "validation"
"""Name of the run's validation frames when they are added as a test set."""


def _with_validation(run, test_sets, calibration_set):
    """Add the run's validation frames as the set ``"validation"`` when they calibrate."""
    wanted = calibration_set is None or calibration_set[0] == VALIDATION
    if not wanted:
        return test_sets, calibration_set
    if VALIDATION in test_sets:  # the user's own "validation" set calibrates
        return test_sets, calibration_set or (VALIDATION, 0.5)
    path = run.val_path
    if not path.is_file() or path.stat().st_size == 0:
        if calibration_set is not None:
            raise InputError(f"--calibrate-on validation: the run has no validation frames "
                             f"({path} missing or empty)")
        return test_sets, None
    return {**test_sets, VALIDATION: path}, calibration_set or (VALIDATION, 0.5)


def _check_thresholds(thresholds, methods) -> dict[str, float]:
    out = {}
    known = (*methods, CALIBRATED, KNN_DISTANCE) if "ltau" in methods else tuple(methods)
    for name, value in (thresholds or {}).items():
        if name not in known:
            raise InputError(f"--threshold: unknown method {name!r} (methods: {list(known)})")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"--threshold: {name}: expected a number, got {value!r}") from None
        if not np.isfinite(value):
            raise InputError(f"--threshold: {name}: expected a finite number, got {value!r}")
        out[name] = value
    return out


def _threshold_info(results, fitted, given, fpr, cal_name, n_cal_configs) -> dict:
    """Per method: the threshold used for the flags and where it comes from."""
    out = {}
    for name, result in results.items():
        if name in given:
            out[name] = {"value": given[name], "source": "given"}
        elif name in fitted:
            out[name] = {"value": fitted[name], "source": "fitted", "fpr": float(fpr),
                         "calibration_set": cal_name, "n_configs": n_cal_configs}
        else:
            out[name] = {"value": result.threshold, "source": "method default"}
    return out


def _calibration_summary(calibrated, cal_name, fraction, seed, results, force_errors,
                         held) -> dict:
    out = dict(calibrated.calibration_)
    before, after = ece_by_set(results["ltau"].extras["p"], results[CALIBRATED].extras["p"],
                               force_errors, held.atom_groups(), out["atol"])
    out.update({"calibration_set": cal_name, "fraction": float(fraction), "seed": int(seed),
                "ece_before": before, "ece_after": after,
                "ece_before_calibration_atoms": out["ece_before"],
                "ece_after_calibration_atoms": out["ece_after"]})
    return out


def test_set_table(
    data: EvaluationData, outputs: Mapping[str, ModelOutputs], model_id: str, in_domain: set
) -> dict:
    """Per test set: size, in-domain flag and the errors of ``model_id`` (and the mean).

    ``force_mae_component`` is the MAE over the x, y, z components (eV/Å, what
    training logs print); ``force_mae_norm`` the mean of |F_ref - F_pred| over atoms
    (eV/Å, the error LTAU's atol is defined on); ``energy_mae_per_atom`` the mean of
    |E_ref - E_pred| / n_atoms over configurations (eV/atom).
    """
    atom_groups = data.atom_groups()
    sizes = np.bincount(data.config_index, minlength=len(data.groups))
    forces, energies = _stack(outputs)
    models = {model_id: (outputs[model_id].forces, outputs[model_id].energies)}
    if len(outputs) > 1:
        models["ensemble mean"] = (forces.mean(axis=0), energies.mean(axis=0))
    table = {}
    for name in dict.fromkeys(data.groups.tolist()):
        atoms, configs = atom_groups == name, data.groups == name
        entry = {"n_configs": int(configs.sum()), "n_atoms": int(atoms.sum()),
                 "in_domain": name in in_domain,
                 "has_forces": bool(np.any(np.isfinite(data.ref_forces[atoms]))),
                 "has_energies": bool(np.any(np.isfinite(data.ref_energies[configs])))}
        for label, (f, e) in models.items():
            diff = data.ref_forces[atoms] - f[atoms]
            ok = np.all(np.isfinite(diff), axis=1)
            per_atom = np.abs(data.ref_energies[configs] - e[configs]) / sizes[configs]
            per_atom = per_atom[np.isfinite(per_atom)]
            entry[label] = {
                "force_mae_component": float(np.abs(diff[ok]).mean()) if ok.any() else None,
                "force_mae_norm": float(np.linalg.norm(diff[ok], axis=1).mean())
                if ok.any() else None,
                "energy_mae_per_atom": float(per_atom.mean()) if len(per_atom) else None,
            }
        table[name] = entry
    return table


def _check_calibration(calibration_set, names) -> tuple[str | None, float]:
    if calibration_set is None:
        return None, 0.5
    name, fraction = calibration_set
    if name not in names:
        raise InputError(f"--calibrate-on: no test set named {name!r} (test sets: {names})")
    if not 0.0 < float(fraction) < 1.0:
        raise InputError(f"--calibrate-on: fraction must be in (0, 1), got {fraction!r}")
    return name, float(fraction)


def _check_in_domain(in_domain, cal_name, names) -> set[str]:
    if in_domain is None:
        return {cal_name} if cal_name is not None else set()
    unknown = [n for n in in_domain if n not in names]
    if unknown:
        raise InputError(f"--in-domain: no test set named {unknown} (test sets: {names})")
    return set(in_domain)


def _fitted(run, methods, *, model_id, refit, k, window, transfer, n_clusters, threads, seed,
            progress):
    """Saved estimators where present (unless ``refit``), the rest fitted and saved."""
    saved = {} if refit else load_methods(run, methods, model_id=model_id)
    ltau = saved.get("ltau")
    if ltau is not None and ((k is not None and ltau.k != k) or (
            window is not None and _window(ltau.window) != _window(window)) or (
            transfer is not None and ltau.transfer != transfer)):
        del saved["ltau"]  # other parameters asked for: refit
    clustered = saved.get("clustered_doptimality")
    if clustered is not None and n_clusters is not None and clustered.n_clusters != n_clusters:
        del saved["clustered_doptimality"]
    missing = [m for m in methods if m not in saved]
    if saved:
        progress(f"using saved {', '.join(saved)} from {run.path}")
    if missing:
        members = run.model_ids if "ensemble" in missing else [model_id]
        frames = run.train_frames()
        progress(f"fitting {', '.join(missing)} on {len(frames)} training configurations "
                 f"({sum(len(a) for a in frames)} atoms, {len(members)} model(s))")
        train, _ = model_outputs(run, frames, model_ids=members, threads=threads)
        saved.update(fit_methods(
            run, model_id=model_id, methods=missing, train_outputs=train,
            k=DEFAULT_K if k is None else k, ltau_window=window,
            ltau_transfer="distance" if transfer is None else transfer,
            n_clusters=DEFAULT_CLUSTERS if n_clusters is None else n_clusters,
            threads=threads, seed=seed))
    return {m: saved[m] for m in methods}


def _window(window) -> tuple | None:
    return None if window is None else tuple(window)


def _evaluate_all(results, estimators, data, outputs, force_errors, energy_errors, in_domain,
                  seconds, forward, thresholds):
    """evaluate() for the single-model methods; the ensemble against ensemble-mean errors."""
    from mlipuq.evaluation import evaluate

    atol = float(estimators["ltau"].atol_) if "ltau" in estimators else None
    is_ood = None
    if in_domain and not set(data.groups.tolist()) <= in_domain:
        is_ood = ~np.isin(data.groups, sorted(in_domain))
    common = {"config_index": data.config_index, "groups": data.groups, "atol": atol,
              "is_ood": is_ood, "timings": seconds, "forward_seconds_per_atom": forward}
    thresholds = {n: t for n, t in thresholds.items() if t is not None}
    single = {n: r for n, r in results.items() if n != "ensemble"}
    metrics = None
    if single:
        metrics = evaluate(single, force_errors=force_errors, energy_errors=energy_errors,
                           thresholds=thresholds, **common)
    if "ensemble" in results:
        forces, energies = _stack(outputs)
        mean_force_errors = np.linalg.norm(data.ref_forces - forces.mean(axis=0), axis=1)
        mean_energy_errors = np.abs(data.ref_energies - energies.mean(axis=0))
        ens = evaluate({"ensemble": results["ensemble"]}, force_errors=mean_force_errors,
                       energy_errors=mean_energy_errors, thresholds=thresholds, **common)
        if metrics is None:
            metrics = ens
        else:
            metrics["methods"]["ensemble"] = ens["methods"]["ensemble"]
    order = [n for n in (*METHODS[:1], CALIBRATED, KNN_DISTANCE, *METHODS[1:])
             if n in metrics["methods"]]
    metrics["methods"] = {n: metrics["methods"][n] for n in order}
    metrics["errors_from"] = {n: ("ensemble mean" if n == "ensemble" else "model")
                              for n in metrics["methods"]}
    return metrics


def _run_info(run: RunFolder, model_id: str, estimators: Mapping[str, Any]) -> dict:
    info = {
        "path": str(run.path),
        "model_id": model_id,
        "model_ids": run.model_ids,
        "elements": run.elements,
        "preset": run.meta.get("preset"),
        "epochs": run.meta.get("epochs"),
        "n_train_atoms": int(run.atom_table.n_atoms),
    }
    if "ltau" in estimators:
        ltau = estimators["ltau"]
        info["ltau"] = {"k": int(ltau.k), "atol": float(ltau.atol_),
                        "window": None if ltau.window is None else list(ltau.window),
                        "index": dict(ltau.index_kinds_)}
    return info


def _write(metrics, out_dir, results, force_errors, energy_errors, data, title) -> Path:
    from mlipuq.report import write_report

    return write_report(
        metrics, out_dir, results=results, force_errors=force_errors,
        energy_errors=energy_errors, config_index=data.config_index, groups=data.groups,
        title=title or "mlipuq evaluation",
    )


def say(message: str, *, start: float | None = None, stream=None) -> None:
    """Print one progress line ``mlipuq: [12.3 s] message`` (elapsed since ``start``)."""
    stamp = "" if start is None else f"[{time.perf_counter() - start:6.1f} s] "
    print(f"mlipuq: {stamp}{message}", file=stream or sys.stdout, flush=True)
