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
- LTAU calibration follows the lead's convention: ``predict(scale=s)`` gives the
  neighbours' CDF at ``atol / s`` (test errors = s x training errors), fitted with
  :func:`mlipuq.calibration.calibrate` (``threshold_scales=False``) on a seeded,
  configuration-level split of one in-domain test set.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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

DEFAULT_K = 5
DEFAULT_CLUSTERS = 4

CALIBRATED = "ltau_calibrated"
"""Name of LTAU with the fitted scale factor in the results and the report."""

ENSEMBLE_FILE = "ensemble.json"
DOPT_FILE = "doptimality.npz"
CLUSTERED_FILE = "clustered_doptimality.npz"
LTAU_FIT_FILE = "fit.json"  # same name and fields as ``mlipuq fit`` writes

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
                                          threads=threads, seed=seed, window=ltau_window)
    if save:
        save_methods(run, estimators, model_id=model_id)
    return estimators


def _fit_ltau(run, base, _outputs, *, k, threads, window, **_):
    from mlipuq.ltau import LTAUEstimator

    if not run.store_path.is_dir():
        raise InputError(f"{run.store_path}: the run has no error trajectories (needed by LTAU)")
    estimator = LTAUEstimator(k=k, window=window, n_threads=threads)
    return estimator.fit(run.store, base.descriptors, base.species)


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
    """Save fitted estimators into the run folder (each write atomic)."""
    files = {"ensemble": ENSEMBLE_FILE, "doptimality": DOPT_FILE,
             "clustered_doptimality": CLUSTERED_FILE}
    for name, estimator in estimators.items():
        if name == "ltau":
            save_ltau(run, estimator, model_id)
        else:
            estimator.save(run.path / files[name])


def save_ltau(run: RunFolder, estimator: Any, model_id: str) -> None:
    """Save a fitted LTAU estimator as ``RUN/ltau`` (used by ``mlipuq fit`` too).

    Writes into a temporary directory inside RUN and renames it onto ``RUN/ltau``,
    so a reader never sees a half-written estimator; ``RUN/ltau/fit.json`` records
    the member whose descriptors it was fitted on (the calculator checks it).
    """
    from mlipuq import __version__
    from mlipuq.io import write_json

    target = Path(run.ltau_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".ltau.", dir=run.path))
    try:
        estimator.save(tmp)
        write_json(tmp / LTAU_FIT_FILE, {
            "model_id": model_id,
            "model_file": str(run.model_path(model_id).relative_to(run.path)),
            "atom_table_fingerprint": run.atom_table.fingerprint(),
            "mlipuq_version": __version__,
        })
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".ltau.old.", dir=run.path))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_methods(run: RunFolder, methods: Sequence[str], *, model_id: str) -> dict[str, Any]:
    """The estimators saved in ``run`` for ``methods`` (those present and matching).

    LTAU is loaded only when its ``fit.json`` names ``model_id``; missing methods are
    simply absent from the returned dict.
    """
    from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator
    from mlipuq.doptimality import DOptimalityEstimator
    from mlipuq.ensemble import EnsembleEstimator
    from mlipuq.io import read_json
    from mlipuq.ltau import LTAUEstimator

    loaded: dict[str, Any] = {}
    for name in methods:
        if name == "ltau":
            fit_file = run.ltau_dir / LTAU_FIT_FILE
            if fit_file.is_file() and read_json(fit_file).get("model_id") == model_id:
                loaded[name] = LTAUEstimator.load(run.ltau_dir)
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
    ltau_scale: float | np.ndarray | None = None,
) -> tuple[dict[str, UQResult], dict[str, float]]:
    """Every estimator's :class:`UQResult` on one set of model outputs, with timings.

    Parameters
    ----------
    estimators : dict of str -> fitted estimator
        From :func:`fit_methods` or :func:`load_methods`.
    outputs_by_member : dict of str -> ModelOutputs
        Outputs of the members on the test frames (all members for the ensemble).
    model_id : str
        Member whose descriptors the descriptor-based methods use.
    ltau_scale : float or ndarray of shape (N,), optional
        If given, an extra result :data:`CALIBRATED` = LTAU with this scale factor.

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
        if name == "ltau":
            timed(name, lambda e=estimator: e.predict(
                base.descriptors, base.species, config_index=base.config_index))
            if ltau_scale is not None:
                timed(CALIBRATED, lambda e=estimator: _renamed(e.predict(
                    base.descriptors, base.species, config_index=base.config_index,
                    scale=ltau_scale), CALIBRATED))
        elif name == "ensemble":
            forces, energies = _stack(outputs_by_member)
            timed(name, lambda e=estimator, f=forces, en=energies: e.predict(
                f, en, base.config_index))
        else:
            timed(name, lambda e=estimator: e.predict(
                base.descriptors.astype(np.float64), base.species,
                config_index=base.config_index))
    return results, seconds


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
        for atoms in found:
            ref = reference_forces(atoms)
            ok = ref is not None and np.shape(ref) == (len(atoms), 3)
            forces.append(np.asarray(ref, float) if ok else np.full((len(atoms), 3), np.nan))
            energy = reference_energy(atoms)
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
def calibrate_ltau(
    ltau: Any,
    outputs: ModelOutputs,
    force_errors: np.ndarray,
    atom_groups: np.ndarray,
    *,
    calibration_set: str,
    fraction: float = 0.5,
    seed: int = 0,
    min_group_size: int = 100,
) -> dict:
    """Fit LTAU's scale factor s on part of one test set; ECE before/after everywhere.

    The global s is fitted on ``fraction`` of the configurations of
    ``calibration_set`` (seeded split by configuration). ECE before (s = 1) and
    after is reported on the held-out rest of that set and on every other set.
    Separately, one s per set is fitted on half of each set's configurations
    (``group_scales``; sets with fewer than ``min_group_size`` atoms in their half
    keep the global s) and judged on the other half: how much s grows out of domain.

    Returns
    -------
    dict
        ``scale``, ``calibration_set``, ``fraction``, ``seed``, ``atol``,
        ``n_calibration_atoms``, ``ece_before`` / ``ece_after`` per set (held-out
        atoms only for the calibration set), ``group_scales``,
        ``group_ece_before`` / ``group_ece_after`` (held-out halves).
    """
    from mlipuq import metrics
    from mlipuq.calibration import calibrate, split_calibration

    has_force = np.isfinite(force_errors)
    in_set = (atom_groups == calibration_set) & has_force
    if not np.any(in_set):
        raise InputError(
            f"--calibrate-on: test set {calibration_set!r} has no atoms with reference forces "
            f"(sets: {sorted(set(atom_groups.tolist()))})"
        )
    rows = np.flatnonzero(has_force)  # calibration works on atoms with forces only
    errors = force_errors[rows]
    groups = atom_groups[rows]
    configs = outputs.config_index[rows]
    atol = float(ltau.atol_)

    def predict_p(scale: float | np.ndarray) -> np.ndarray:
        return ltau.predict(outputs.descriptors[rows], outputs.species[rows],
                            scale=scale).extras["p"]

    local = np.flatnonzero(groups == calibration_set)
    cal, held = split_calibration(len(local), fraction, seed, config_index=configs[local])
    cal_index, held_index = local[cal], local[held]
    p_before = predict_p(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = calibrate(predict_p, errors, atol, cal_index=cal_index, test_index=held_index,
                           threshold_scales=False)
    p_after = predict_p(result.scale)
    before, after = {}, {}
    for name in dict.fromkeys(groups.tolist()):
        idx = held_index if name == calibration_set else np.flatnonzero(groups == name)
        before[name] = metrics.ece(p_before[idx], errors[idx], atol)
        after[name] = metrics.ece(p_after[idx], errors[idx], atol)
    out = {
        "calibration_set": calibration_set,
        "fraction": float(fraction),
        "seed": int(seed),
        "atol": atol,
        "convention": "p = CDF_train(atol / s): test errors = s x training errors",
        "scale": float(result.scale),
        "n_calibration_atoms": int(len(cal_index)),
        "n_held_out_atoms": int(len(held_index)),
        "ece_before": before,
        "ece_after": after,
    }
    out.update(_group_scales(predict_p, errors, atol, groups, configs, seed, min_group_size,
                             result.scale))
    return out


def _group_scales(predict_p, errors, atol, groups, configs, seed, min_group_size, default):
    """One s per test set, fitted on half of its configurations, judged on the rest."""
    from mlipuq.calibration import calibrate, split_calibration

    cal_parts, held_parts = [], []
    for name in dict.fromkeys(groups.tolist()):
        local = np.flatnonzero(groups == name)
        if len(np.unique(configs[local])) < 2:
            continue
        cal, held = split_calibration(len(local), 0.5, seed, config_index=configs[local])
        cal_parts.append(local[cal])
        held_parts.append(local[held])
    if not cal_parts:
        return {"group_scales": {}, "group_ece_before": {}, "group_ece_after": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = calibrate(
            predict_p, errors, atol, cal_index=np.concatenate(cal_parts),
            test_index=np.concatenate(held_parts), groups=groups,
            min_group_size=min_group_size, threshold_scales=False,
        )
    scales = {name: float(result.group_scales.get(name, default))
              for name in dict.fromkeys(groups.tolist())}
    cal_groups = groups[np.concatenate(cal_parts)]
    fitted = {name: bool(np.sum(cal_groups == name) >= min_group_size) for name in scales}
    return {
        "group_scales": scales,
        "group_scale_fitted": fitted,
        "group_min_atoms": int(min_group_size),
        "group_ece_before": dict(result.ece_before_by_group),
        "group_ece_after": dict(result.ece_after_by_group),
    }


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
    ltau_threshold: float = 0.5,
    k: int | None = None,
    ltau_window: tuple[int, int | None] | None = None,
    n_clusters: int | None = None,
    threads: int = 1,
    seed: int = 0,
    title: str | None = None,
    progress: Progress = _quiet,
) -> dict:
    """Fit (or load) the methods, predict every test set, evaluate, write the report.

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
        Fit LTAU's scale factor on ``fraction`` of the configurations of test set
        ``name`` (in domain); adds the result ``"ltau_calibrated"``.
    in_domain : sequence of str, optional
        Test sets that are in domain (default: the calibration set); the others are
        out of domain for ROC-AUC / TPR / FPR.
    model_id : str
        Member whose descriptors and errors the single-model methods use.
    refit : bool
        Refit even when estimators are saved in the run (else saved ones are reused).
    ltau_threshold : float
        LTAU flags atoms with 1 - p above it (0.5: an error above atol is more likely
        than not). A Tukey fence of the training atoms' 1 - p is no use here: p is
        bounded and spread over [0, 1], so the fence often lies above 1.
    k, ltau_window, n_clusters : optional
        LTAU neighbours and epoch window, clusters of clustered D-optimality. None:
        reuse a saved estimator whatever its value, else fit with 5 / every epoch / 4;
        a value that differs from the saved estimator's makes that method refit.
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
        ``"calibration"``, ``"run"``, ``"errors_from"``, ``"forward_seconds_per_atom"``
        (as written to ``out_dir/metrics.json``).
    """
    from mlipuq.backends.nequip.features import torch_threads

    run = run if isinstance(run, RunFolder) else RunFolder.open(run)
    _check_member(run, model_id)
    methods = available_methods(run, methods)
    data = load_test_sets(test_sets, run.elements)
    names = list(dict.fromkeys(data.groups.tolist()))
    cal_name, fraction = _check_calibration(calibration_set, names, methods)
    in_domain = _check_in_domain(in_domain, cal_name, names)
    with torch_threads(threads):
        estimators = _fitted(run, methods, model_id=model_id, refit=refit, k=k,
                             window=ltau_window, n_clusters=n_clusters, threads=threads,
                             seed=seed, progress=progress)
        members = run.model_ids if "ensemble" in methods else [model_id]
        progress(f"predicting {len(data.frames)} test configurations "
                 f"({len(data.config_index)} atoms) with {len(members)} model(s)")
        outputs, forward = model_outputs(run, data.frames, model_ids=members, threads=threads)
    base = outputs[model_id]
    force_errors = np.linalg.norm(data.ref_forces - base.forces, axis=1)
    energy_errors = np.abs(data.ref_energies - base.energies)

    calibration = None
    if cal_name is not None:
        progress(f"calibrating LTAU on {fraction:.0%} of {cal_name!r}")
        calibration = calibrate_ltau(
            estimators["ltau"], base, force_errors, data.atom_groups(),
            calibration_set=cal_name, fraction=fraction, seed=seed)
    progress("uncertainty of every method")
    results, seconds = predict_methods(
        estimators, outputs, model_id=model_id,
        ltau_scale=None if calibration is None else calibration["scale"])
    if "ensemble" in results:  # its real cost: the other members' forward passes too
        seconds["ensemble"] += sum(v for m, v in forward.items() if m != model_id)

    metrics = _evaluate_all(results, estimators, data, outputs, force_errors, energy_errors,
                            in_domain, seconds, forward[model_id], ltau_threshold)
    metrics["calibration"] = calibration
    metrics["run"] = _run_info(run, model_id, estimators)
    metrics["forward_seconds_per_atom"] = forward
    metrics["test_sets"] = {name: {"in_domain": name in in_domain,
                                   "has_forces": bool(np.any(np.isfinite(
                                       force_errors[data.atom_groups() == name])))}
                            for name in names}
    progress(f"writing the report to {out_dir}")
    index = _write(metrics, out_dir, results, force_errors, energy_errors, data, title)
    metrics["report"] = str(index)
    return metrics


def _check_calibration(calibration_set, names, methods) -> tuple[str | None, float]:
    if calibration_set is None:
        return None, 0.5
    name, fraction = calibration_set
    if "ltau" not in methods:
        raise InputError("--calibrate-on: calibration is for LTAU, which is not among --methods")
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


def _fitted(run, methods, *, model_id, refit, k, window, n_clusters, threads, seed, progress):
    """Saved estimators where present (unless ``refit``), the rest fitted and saved."""
    saved = {} if refit else load_methods(run, methods, model_id=model_id)
    ltau = saved.get("ltau")
    if ltau is not None and ((k is not None and ltau.k != k) or (
            window is not None and _window(ltau.window) != _window(window))):
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
            n_clusters=DEFAULT_CLUSTERS if n_clusters is None else n_clusters,
            threads=threads, seed=seed))
    return {m: saved[m] for m in methods}


def _window(window) -> tuple | None:
    return None if window is None else tuple(window)


def _evaluate_all(results, estimators, data, outputs, force_errors, energy_errors, in_domain,
                  seconds, forward, ltau_threshold):
    """evaluate() for the single-model methods; the ensemble against ensemble-mean errors."""
    from mlipuq.evaluation import evaluate

    atol = float(estimators["ltau"].atol_) if "ltau" in estimators else None
    is_ood = None
    if in_domain and not set(data.groups.tolist()) <= in_domain:
        is_ood = ~np.isin(data.groups, sorted(in_domain))
    common = {"config_index": data.config_index, "groups": data.groups, "atol": atol,
              "is_ood": is_ood, "timings": seconds, "forward_seconds_per_atom": forward}
    single = {n: r for n, r in results.items() if n != "ensemble"}
    thresholds = {n: ltau_threshold for n in single if n.startswith("ltau")}
    metrics = None
    if single:
        metrics = evaluate(single, force_errors=force_errors, energy_errors=energy_errors,
                           thresholds=thresholds, **common)
    if "ensemble" in results:
        forces, energies = _stack(outputs)
        mean_force_errors = np.linalg.norm(data.ref_forces - forces.mean(axis=0), axis=1)
        mean_energy_errors = np.abs(data.ref_energies - energies.mean(axis=0))
        ens = evaluate({"ensemble": results["ensemble"]}, force_errors=mean_force_errors,
                       energy_errors=mean_energy_errors, **common)
        if metrics is None:
            metrics = ens
        else:
            metrics["methods"]["ensemble"] = ens["methods"]["ensemble"]
    order = [n for n in (*METHODS[:1], CALIBRATED, *METHODS[1:]) if n in metrics["methods"]]
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
    from mlipuq.io import atomic_path
    from mlipuq.report import write_report

    index = write_report(
        metrics, out_dir, results=results, force_errors=force_errors,
        energy_errors=energy_errors, config_index=data.config_index, groups=data.groups,
        title=title or "mlipuq evaluation",
    )
    extra = _extra_html(metrics)
    text = index.read_text()
    with atomic_path(index, suffix=".html") as tmp:
        Path(tmp).write_text(text.replace("</body>", extra + "\n</body>"))
    return index


def _extra_html(metrics: Mapping) -> str:
    """Calibration and run sections appended to the report page."""
    import html

    parts = []
    cal = metrics.get("calibration")
    if cal:
        rows = "".join(
            f"<tr><td class='l'>{html.escape(name)}</td><td>{_fmt(cal['ece_before'][name])}</td>"
            f"<td>{_fmt(cal['ece_after'][name])}</td>"
            f"<td>{_group_scale(cal, name)}</td>"
            f"<td>{_fmt(cal['group_ece_after'].get(name))}</td></tr>"
            for name in cal["ece_before"]
        )
        parts.append(
            "<h2>LTAU calibration</h2>"
            f"<p>Scale factor s = {cal['scale']:.3g} fitted on {cal['fraction']:.0%} of the "
            f"configurations of <b>{html.escape(cal['calibration_set'])}</b> "
            f"({cal['n_calibration_atoms']} atoms, seed {cal['seed']}); p = CDF of the "
            f"neighbours' training errors at atol / s, atol = {cal['atol']:.4g} eV/Å. "
            "ECE on the held-out configurations of the calibration set and on all of "
            "every other set; the last two columns fit one s per set on half of its "
            "configurations and report the ECE on the other half.</p>"
            "<table><tr><th class='l'>test set</th><th>ECE s = 1</th>"
            f"<th>ECE s = {cal['scale']:.3g}</th><th>s per set</th><th>ECE (s per set)</th>"
            f"</tr>{rows}</table>"
        )
    run = metrics.get("run", {})
    if run:
        parts.append(
            f"<p>Run {html.escape(str(run.get('path')))}: models "
            f"{html.escape(', '.join(run.get('model_ids', [])))}, preset "
            f"{html.escape(str(run.get('preset')))}, {run.get('epochs')} epochs, "
            f"{run.get('n_train_atoms')} training atoms. Single-model methods use "
            f"{html.escape(str(run.get('model_id')))}; the ensemble is judged against the "
            "errors of the ensemble mean.</p>"
        )
    return "\n".join(parts)


def _group_scale(cal: Mapping, name: str) -> str:
    text = _fmt(cal["group_scales"].get(name), "{:.2f}")
    return text if cal.get("group_scale_fitted", {}).get(name) else f"{text} (global)"


def _fmt(value: object, fmt: str = "{:.3f}") -> str:
    return "–" if value is None or not np.isfinite(value) else fmt.format(value)


def say(message: str, *, start: float | None = None, stream=None) -> None:
    """Print one progress line ``mlipuq: [12.3 s] message`` (elapsed since ``start``)."""
    stamp = "" if start is None else f"[{time.perf_counter() - start:6.1f} s] "
    print(f"mlipuq: {stamp}{message}", file=stream or sys.stdout, flush=True)
