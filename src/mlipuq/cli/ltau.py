"""``mlipuq ltau fit`` / ``calibrate`` / ``predict``: LTAU from files, over the Python API.

Examples
--------
::

    mlipuq ltau fit --store store/ --descriptors train_desc.npy \\
        --structures train.extxyz --out ltau_estimator/
    mlipuq ltau calibrate --estimator ltau_estimator/ --descriptors val_desc.npy \\
        --structures val.extxyz --predicted-forces val_forces.npy
    mlipuq ltau predict --estimator ltau_estimator/ --descriptors test_desc.npy \\
        --structures test.extxyz --out results.extxyz --summary summary.json

Descriptor files are ``.npy`` arrays (n_atoms, D), one row per atom in the order of
the structure file. The training atom order must be the one of the trajectory
store (checked with the atom-table fingerprint). Per-atom results go into the
extxyz arrays ``ltau_uncertainty``, ``ltau_p``, ``ltau_expected_error`` (eV/Å),
``ltau_knn_distance``, ``ltau_knn_distance_normalised`` (and ``ltau_flag`` with
``--threshold``); per configuration into ``info``: ``ltau_config_uncertainty`` (the
mean of 1 - p over its atoms, what a threshold fitted by ``ltau calibrate`` applies
to), ``ltau_config_max_uncertainty`` and ``ltau_config_flag``.

Progress goes to stderr (:mod:`mlipuq.log`); what was written, with the fitted numbers,
is printed on stdout (``estimator: DIR (...)``, ``results: FILE``, ``summary: FILE``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from mlipuq.cli._parser import add_per_element_option, add_scheduler_option, add_threads_option
from mlipuq.exceptions import InputError
from mlipuq.log import logger


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ltau fit``, ``ltau calibrate`` and ``ltau predict`` to the ``mlipuq`` parser."""
    parser = subparsers.add_parser(
        "ltau",
        help="LTAU uncertainty: fit on training error trajectories, predict new atoms",
        description="Loss Trajectory Analysis for Uncertainty (k-NN transfer of per-atom "
        "training error distributions).",
    )
    verbs = parser.add_subparsers(dest="ltau_command", metavar="{fit,calibrate,predict}")
    verbs.required = True
    _register_fit(verbs)
    _register_calibrate(verbs)
    _register_predict(verbs)


def _register_fit(verbs: argparse._SubParsersAction) -> None:
    from mlipuq.knn_index import INDEX_KINDS

    fit = verbs.add_parser(
        "fit", help="build an LTAU estimator from error trajectories and descriptors",
        description="Build an LTAU estimator (per-atom error distributions and k-NN "
        "indices) from error trajectories (a trajectory store, or one .npy per model) and "
        "the training descriptors, and write it to --out.",
    )
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path, help="trajectory store directory")
    source.add_argument(
        "--errors", type=Path, nargs="+", metavar="NPY",
        help="error trajectories (E, N) in eV/Å as .npy, one file per model",
    )
    fit.add_argument("--descriptors", type=Path, required=True,
                     help="training descriptors .npy (N, D), rows in structure-file order")
    fit.add_argument("--structures", type=Path, required=True,
                     help="training structures (extxyz): species and atom order")
    fit.add_argument("-o", "--out", type=Path, required=True,
                     help="estimator directory to write")
    fit.add_argument("--k", type=int, default=5, help="neighbours per atom")
    fit.add_argument("--atol", type=float, default=None,
                     help="tolerance in eV/Å (default: mean force-error norm |F_ref - F_pred| "
                          "at the last logged epoch)")
    fit.add_argument("--rtol", type=float, default=0.0,
                     help="relative tolerance on |F_ref| of each neighbour")
    fit.add_argument("--scale", type=float, default=1.0,
                     help="scale factor s until 'ltau calibrate' fits one")
    fit.add_argument("--index", choices=("auto", *INDEX_KINDS),
                     default="auto",
                     help="FAISS index (auto: flat < 1k rows <= ivfflat < 50k <= hnsw < 5M "
                          "<= ivfpq)")
    add_per_element_option(fit, "one k-NN index per element, or one for all")
    fit.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    fit.add_argument("--ef-construction", type=int, default=40,
                     help="HNSW candidate list size while building")
    fit.add_argument("--ef-search", type=int, default=16,
                     help="HNSW candidate list size while searching")
    fit.add_argument("--ivf-nlist", type=int, default=None,
                     help="IVF lists (default: by size)")
    fit.add_argument("--pq-m", type=int, default=None,
                     help="IVF-PQ sub-quantisers (default: by size)")
    fit.add_argument("--nprobe", type=int, default=None,
                     help="IVF lists scanned per query (default: 16 ivfpq, nlist/16 ivfflat)")
    fit.add_argument("--n-bins", type=int, default=100, help="histogram bins (log-spaced)")
    fit.add_argument("--window", nargs=2, metavar=("START", "SIZE"), default=None,
                     help="epoch window: start position and size (SIZE 'all': to the end; "
                     "default: every epoch)")
    fit.add_argument("--transfer", choices=("distance", "mean"), default="distance",
                     help="distance-aware transfer, or the paper's plain mean of the "
                          "neighbours")
    fit.add_argument("--distance-power", type=_power, default="auto",
                     help="beta: assumed errors grow as (normalised k-NN distance)^beta; "
                          "'auto': 1, chosen by 'ltau calibrate' on in-domain atoms")
    add_threads_option(fit, "FAISS threads")
    add_scheduler_option(fit, "build the distributions and indices on a Dask cluster "
                         "(with --store)")
    fit.add_argument("--chunk-size", type=int, default=100_000, metavar="ATOMS",
                     help="with --scheduler: training atoms per task and rows per index "
                     "shard")
    fit.add_argument("--seed", type=int, default=0,
                     help="seed of the index training and the reference-distance sample")
    fit.set_defaults(func=run_fit)


def _register_calibrate(verbs: argparse._SubParsersAction) -> None:
    cal = verbs.add_parser(
        "calibrate",
        help="fit the scale factor and flag threshold on in-domain held-out atoms",
        description="Fit LTAU's scale factor s (minimum ECE) and its flag threshold (at an "
        "in-domain false-positive rate per configuration) on in-domain atoms the model was "
        "not trained on, and store both in the estimator (rewritten atomically).",
    )
    cal.add_argument("--estimator", type=Path, required=True,
                     help="directory written by 'mlipuq ltau fit' (updated in place)")
    cal.add_argument("--descriptors", type=Path, required=True,
                     help="descriptors .npy (n, D) of the calibration atoms")
    cal.add_argument("--structures", type=Path, required=True,
                     help="calibration structures (extxyz) with reference forces")
    cal.add_argument("--predicted-forces", type=Path, required=True,
                     help="the model's forces .npy (n, 3) in eV/Å, rows in structure order")
    cal.add_argument("--fpr", type=float, default=0.05,
                     help="in-domain false-positive rate (per configuration) of the "
                     "threshold")
    cal.set_defaults(func=run_calibrate)


def _register_predict(verbs: argparse._SubParsersAction) -> None:
    predict = verbs.add_parser(
        "predict", help="LTAU uncertainty of new structures",
        description="Per-atom and per-configuration LTAU uncertainty of new structures, "
        "written as extxyz arrays (ltau_uncertainty, ltau_p, ltau_expected_error, ...).",
    )
    predict.add_argument("--estimator", type=Path, required=True,
                         help="directory written by 'mlipuq ltau fit'")
    predict.add_argument("--descriptors", type=Path, required=True,
                         help="test descriptors .npy (n, D), rows in structure-file order")
    predict.add_argument("--structures", type=Path, required=True, help="test structures")
    predict.add_argument("-o", "--out", type=Path, required=True,
                         help="extxyz to write, with the per-atom ltau_* arrays")
    predict.add_argument("--summary", type=Path, default=None, help="JSON summary to write")
    predict.add_argument("--scale", type=float, default=None,
                         help="scale factor s (default: the estimator's)")
    predict.add_argument("--atol", type=float, default=None,
                         help="tolerance in eV/Å (default: the estimator's)")
    predict.add_argument("--k", type=int, default=None, help="neighbours (default: fitted k)")
    predict.add_argument("--threshold", type=float, default=None,
                         help="flag atoms/configurations with uncertainty above this "
                         "(default: the calibrated threshold, at the calibrated s, atol, k)")
    add_threads_option(predict, "FAISS threads (default: the estimator's)", default=None)
    add_scheduler_option(predict, "spread the k-NN search over a Dask cluster")
    predict.set_defaults(func=run_predict)


def load_npy(path: Path, name: str) -> np.ndarray:
    """Read a .npy array without pickle, with an :class:`InputError` naming the file."""
    if not path.is_file():
        raise InputError(f"{name}: file {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: {path} is not a readable .npy array ({exc})") from None


def _power(value: str) -> float | str:
    """``--distance-power``: 'auto' or a number (checked by the estimator)."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None


def _window(values: list[str] | None) -> tuple[int, int | None] | None:
    if values is None:
        return None
    start, size = values
    try:
        return int(start), None if size.lower() in ("all", "none") else int(size)
    except ValueError:
        raise InputError(f"--window: expected START SIZE integers, got {start} {size}") from None


def _structures_and_descriptors(args: argparse.Namespace) -> tuple[list, Any, np.ndarray]:
    from mlipuq.atom_table import AtomTable
    from mlipuq.io import read_structures

    logger.info(f"reading {args.structures}")
    frames = read_structures(args.structures)
    table = AtomTable.from_atoms(frames)
    descriptors = load_npy(args.descriptors, "descriptors")
    if descriptors.ndim != 2:
        raise InputError(f"descriptors: expected a 2-d array (atoms, features), got shape "
                         f"{descriptors.shape} in {args.descriptors}")
    if len(descriptors) != table.n_atoms:
        raise InputError(
            f"descriptors: {args.descriptors} has {len(descriptors)} rows but "
            f"{args.structures} has {table.n_atoms} atoms"
        )
    return frames, table, descriptors


def run_fit(args: argparse.Namespace) -> int:
    """``mlipuq ltau fit``."""
    from mlipuq.distributed.scheduler import client_for, parse_scheduler
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.trajectory_store import TrajectoryStore

    parse_scheduler(args.scheduler)  # a bad value: one line, before any work
    if args.chunk_size < 1:
        raise InputError(f"--chunk-size: expected a positive number of atoms, got "
                         f"{args.chunk_size}")
    _, table, descriptors = _structures_and_descriptors(args)
    if args.store is not None:
        logger.info(f"opening trajectory store {args.store}")
        errors: Any = TrajectoryStore.open(args.store)
        if errors.atom_table.fingerprint() != table.fingerprint():
            raise InputError(
                f"--structures: {args.structures} ({table.n_atoms} atoms, fingerprint "
                f"{table.fingerprint()}) is not the training set of the store {args.store} "
                f"({errors.atom_table.n_atoms} atoms, fingerprint "
                f"{errors.atom_table.fingerprint()})"
            )
        force_norm = None  # the estimator takes it from the store's atom table
    else:
        errors = [load_npy(path, "errors") for path in args.errors]
        norms = table.force_norm
        force_norm = norms if not np.any(np.isnan(norms)) else None
    estimator = LTAUEstimator(
        k=args.k, atol=args.atol, rtol=args.rtol, scale=args.scale, index=args.index,
        transfer=args.transfer, distance_power=args.distance_power,
        per_element=args.per_element, hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction, ef_search=args.ef_search,
        ivf_nlist=args.ivf_nlist, pq_m=args.pq_m, nprobe=args.nprobe, n_bins=args.n_bins,
        window=_window(args.window), n_threads=args.threads, seed=args.seed,
        chunk_size=args.chunk_size,
    )
    logger.info(f"building error distributions and indices for {table.n_atoms} atoms")
    with client_for(args.scheduler) as client:
        estimator.fit_arrays(errors, descriptors, table.species, force_norm=force_norm,
                             config_index=table.config_index, client=client)
    kinds = ", ".join(f"{name}: {kind}" for name, kind in estimator.index_kinds_.items())
    _save(estimator, args.out)
    source = "given" if args.atol is not None else "mean force-error norm at the last logged epoch"
    print(f"estimator: {args.out} (atol = {estimator.atol_:.6g} eV/Å, {source}; indices "
          f"{kinds})")
    return 0


def _save(estimator: Any, out: Path) -> None:
    """Write the estimator directory atomically, keeping the provenance it was loaded with
    (a run's method: the model and training set it describes)."""
    estimator.save(out, provenance=getattr(estimator, "provenance_", None))


def run_calibrate(args: argparse.Namespace) -> int:
    """``mlipuq ltau calibrate``."""
    import warnings

    from mlipuq.ltau import LTAUEstimator

    logger.info(f"loading estimator {args.estimator}")
    estimator = LTAUEstimator.load(args.estimator)
    frames, table, descriptors = _structures_and_descriptors(args)
    from mlipuq.io import reference_forces

    reference = []
    for number, atoms in enumerate(frames):
        forces = reference_forces(atoms)
        if forces is None:
            raise InputError(f"--structures: configuration {number} of {args.structures} has "
                             "no reference forces (calibration needs force errors)")
        reference.append(np.asarray(forces, dtype=float))
    predicted = load_npy(args.predicted_forces, "predicted forces")
    if predicted.shape != (table.n_atoms, 3):
        raise InputError(f"--predicted-forces: expected shape ({table.n_atoms}, 3), got "
                         f"{predicted.shape} in {args.predicted_forces}")
    errors = np.linalg.norm(np.concatenate(reference) - predicted, axis=1)
    logger.info(f"calibrating on {table.n_atoms} atoms ({table.n_configs} configurations)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        estimator.calibrate_arrays(descriptors, table.species, errors,
                                   config_index=table.config_index, fpr=args.fpr)
    cal = estimator.calibration_
    _save(estimator, args.estimator)
    bound = " (at the search bound: are these atoms in domain?)" if cal["at_bound"] else ""
    print(f"estimator: {args.estimator} (s = {cal['scale']:.4g}{bound}; ECE "
          f"{cal['ece_before']:.3f} -> {cal['ece_after']:.3f}; threshold "
          f"{cal['threshold']:.4g} on the mean of 1 - p, flags {cal['fpr']:.0%} of these "
          "configurations)")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``mlipuq ltau predict``."""
    from mlipuq.distributed.scheduler import client_for, parse_scheduler
    from mlipuq.ltau import LTAUEstimator

    parse_scheduler(args.scheduler)  # a bad value: one line, before any work
    logger.info(f"loading estimator {args.estimator}")
    estimator = LTAUEstimator.load(args.estimator)
    if args.threads is not None:
        estimator.n_threads = args.threads
    frames, table, descriptors = _structures_and_descriptors(args)
    logger.info(f"searching {estimator.k if args.k is None else args.k} neighbours of "
                f"{table.n_atoms} atoms")
    with client_for(args.scheduler) as client:
        result = estimator.predict_arrays(
            descriptors, table.species, k=args.k, scale=args.scale, atol=args.atol,
            config_index=table.config_index, threshold=args.threshold, client=client,
        )
    _write_results(frames, table, result, args.out)
    print(f"results: {args.out}")
    if args.summary is not None:
        from mlipuq.io import write_json

        write_json(args.summary, summarise(table, result, estimator, args))
        print(f"summary: {args.summary}")
    return 0


def _write_results(frames: list, table: Any, result: Any, out: Path) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from mlipuq.io import atomic_path

    arrays = result.as_arrays("ltau")
    config_max_u = result.extras["config_max_uncertainty"]
    written = []
    for number, atoms in enumerate(frames):
        rows = table.config_index == number
        frame = atoms.copy()
        if atoms.calc is not None and getattr(atoms.calc, "results", None):
            frame.calc = SinglePointCalculator(frame, **atoms.calc.results)
        for name, values in arrays.items():
            frame.arrays[name] = np.asarray(values)[rows]
        frame.info["ltau_config_uncertainty"] = float(result.config_uncertainty[number])
        frame.info["ltau_config_max_uncertainty"] = float(config_max_u[number])
        if result.config_flags is not None:
            frame.info["ltau_config_flag"] = bool(result.config_flags[number])
        written.append(frame)
    with atomic_path(out, suffix=".extxyz") as tmp:
        write(tmp, written, format="extxyz")


def _stats(atom_u: np.ndarray, config_u: np.ndarray, distance: np.ndarray,
           normalised: np.ndarray, atom_flags: np.ndarray | None,
           config_flags: np.ndarray | None) -> dict:
    stats = {
        "n_atoms": int(len(atom_u)),
        "n_configs": int(len(config_u)),
        "mean_atom_uncertainty": float(atom_u.mean()),
        "max_atom_uncertainty": float(atom_u.max()),
        "mean_config_uncertainty": float(config_u.mean()),
        "max_config_uncertainty": float(config_u.max()),
        "mean_knn_distance": float(distance.mean()),
        "mean_knn_distance_normalised": float(np.nanmean(normalised))
        if np.any(np.isfinite(normalised)) else None,
        "max_knn_distance_normalised": float(np.nanmax(normalised))
        if np.any(np.isfinite(normalised)) else None,
    }
    if atom_flags is not None:
        stats["n_flagged_atoms"] = int(atom_flags.sum())
        stats["n_flagged_configs"] = int(config_flags.sum())
    return stats


def summarise(table: Any, result: Any, estimator: Any, args: argparse.Namespace) -> dict:
    """JSON-ready summary: settings, overall and per-``config_type`` statistics."""
    atom_u, config_u = result.atom_uncertainty, result.config_uncertainty
    distance = result.extras["knn_distance"]
    normalised = result.extras["knn_distance_normalised"]
    groups = {}
    atom_group = table.atom_group
    for label in sorted(set(table.config_type.tolist())):
        atoms, configs = atom_group == label, table.config_type == label
        groups[label] = _stats(
            atom_u[atoms], config_u[configs], distance[atoms], normalised[atoms],
            None if result.atom_flags is None else result.atom_flags[atoms],
            None if result.config_flags is None else result.config_flags[configs],
        )
    return {
        "method": "ltau",
        "estimator": str(args.estimator),
        "structures": str(args.structures),
        "atol": float(estimator.atol_ if args.atol is None else args.atol),
        "scale": float(estimator.scale_ if args.scale is None else args.scale),
        "transfer": estimator.transfer,
        "rtol": float(estimator.rtol),
        "k": int(estimator.k if args.k is None else args.k),
        "per_element": bool(estimator.per_element),
        "index_kinds": dict(estimator.index_kinds_),
        "threshold": result.threshold,
        "threshold_source": "given" if args.threshold is not None else (
            "fitted" if estimator.threshold_ is not None else None),
        "units": {"atol": "eV/Å", "uncertainty": "1 - p (unitless)",
                  "knn_distance": "descriptor units",
                  "knn_distance_normalised": "unitless (1: typical training distance)"},
        "overall": _stats(atom_u, config_u, distance, normalised, result.atom_flags,
                          result.config_flags),
        "by_config_type": groups,
    }
