"""Evaluate the UQ methods of a run on test sets and write the report.

This is the API under ``mlipuq evaluate`` and ``mlipuq demo``; it orchestrates the
steps of :mod:`mlipuq.run_methods` (fit, save, load, predict through the method
registry), :mod:`mlipuq.evaluation_data` (test sets) and
:mod:`mlipuq.calibration_protocol` (calibrate on a held-out in-domain part)::

    metrics = evaluate_run("run", {"300K": "test_300K.extxyz"}, out_dir="report")

Choices (documented in ``docs/evaluation.md``):

- Single-model methods use member ``model_id``'s outputs and are judged against that
  model's errors; committee methods (``errors_from = "committee mean"``) against the
  errors of the committee mean (uq-ace eqs. 5-7).
- Costs are seconds per test atom of the UQ step; a committee method's cost includes
  the forward passes of its other members (its real extra cost).
- Calibration protocol: a seeded fraction of the configurations of one in-domain set
  (default the run's validation frames) calibrates the methods and fits every flag
  threshold at an in-domain false-positive rate; every metric uses the other
  configurations.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipuq.backends.base import committee
from mlipuq.calibration_protocol import (
    calibration_summaries,
    ece_by_set,
    fit_thresholds,
    for_evaluation,
)
from mlipuq.evaluation_data import (
    EvaluationData,
    load_test_sets,
    split_configurations,
    subset_data,
    test_set_table,
)
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod
from mlipuq.run_folder import RunFolder
from mlipuq.run_methods import (
    CALIBRATED_SUFFIX,
    DEFAULT_FPR,
    available_methods,
    check_member,
    fit_methods,
    fit_on_validation,
    load_methods,
    members_needed,
    method_dir,
    model_outputs,
    predict_methods,
    save_methods,
)

__all__ = [
    "CALIBRATED_SUFFIX", "DEFAULT_FPR", "EvaluationData", "available_methods",
    "calibration_summaries", "ece_by_set", "evaluate_run", "fit_methods",
    "fit_on_validation", "fit_thresholds", "for_evaluation", "load_methods",
    "load_test_sets", "method_dir", "model_outputs", "predict_methods", "save_methods",
    "split_configurations", "subset_data", "test_set_table",
]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def evaluate_run(
    run: RunFolder | str | os.PathLike,
    test_sets: Mapping[str, str | os.PathLike | Sequence[Atoms]],
    *,
    out_dir: str | os.PathLike,
    methods: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    calibration_set: tuple[str, float] | None = None,
    in_domain: Sequence[str] | None = None,
    model_id: str = "model_0",
    refit: bool = False,
    fpr: float = DEFAULT_FPR,
    thresholds: Mapping[str, float] | None = None,
    threads: int = 1,
    seed: int = 0,
    title: str | None = None,
    progress: Progress = _quiet,
    client: Any = None,
) -> dict:
    """Fit (or load) the methods, predict every test set, evaluate, write the report.

    Protocol: a seeded ``fraction`` of the configurations of one in-domain set (the
    calibration set: ``calibration_set``, by default the run's validation frames as
    the set ``"validation"``) is used only to calibrate the methods and fit every
    flag threshold (at in-domain false-positive rate ``fpr`` per configuration);
    every metric is computed on the other configurations, so the in-domain figures
    are held out.

    Parameters
    ----------
    run : RunFolder or path
        Trained run (``mlipuq train``).
    test_sets : dict of name -> path or list of ase.Atoms
        Test sets; a set without reference forces is evaluated on energies only.
    out_dir : path-like
        Report directory (``index.html``, ``metrics.json``, PNGs); replaced as a whole.
    methods : sequence of str, optional
        Registered method names (default: all the run supports).
    params : dict of str -> dict, optional
        Constructor parameters per method (``{"ltau": {"k": 8}}``). A saved method is
        reused when its parameters include these, else refitted.
    calibration_set : (name, fraction), optional
        In-domain set to calibrate on and the share of its configurations used. None:
        ``("validation", 0.5)`` with the run's ``val.extxyz`` added as a test set (no
        calibration when the run has no validation frames).
    in_domain : sequence of str, optional
        In-domain test sets (default: the calibration set); the others are out of
        domain for ROC-AUC / TPR / FPR.
    model_id : str
        Member whose outputs and errors the single-model methods use.
    refit : bool
        Refit even when valid methods are saved in the run.
    fpr : float
        In-domain false-positive rate (per configuration) of the fitted thresholds.
    thresholds : dict of str -> float, optional
        Thresholds given by the user (per result name); they replace the fitted ones.
    threads, seed
        Threads; seed of the methods and of the calibration split.
    title : str, optional
        Report title.
    progress : callable, optional
        Called with one line per step.
    client : distributed.Client, optional
        Fit the methods that need fitting on this Dask cluster (``--scheduler``).

    Returns
    -------
    dict
        The metrics of :func:`mlipuq.evaluation.evaluate` with extra keys
        ``"calibration"`` (per calibrated method), ``"thresholds"``, ``"test_sets"``,
        ``"run"``, ``"errors_from"``, ``"forward_seconds_per_atom"`` (as written to
        ``out_dir/metrics.json``).
    """
    run = run if isinstance(run, RunFolder) else RunFolder.open(run)
    check_member(run, model_id)
    methods = available_methods(run, methods)
    if not 0.0 < float(fpr) < 1.0:
        raise InputError(f"--fpr: expected a rate in (0, 1), got {fpr!r}")
    test_sets, calibration_set = _with_validation(run, test_sets, calibration_set)
    data = load_test_sets(test_sets, run.elements)
    names = list(dict.fromkeys(data.groups.tolist()))
    cal_name, fraction = _check_calibration(calibration_set, names)
    in_domain = _check_in_domain(in_domain, cal_name, names)
    user_thresholds = _check_thresholds(thresholds, methods, cal_name is not None)
    fitted = _fitted(run, methods, params or {}, model_id=model_id, refit=refit,
                     fpr=fpr, threads=threads, seed=seed, progress=progress, client=client)
    members = members_needed(run, methods, model_id)
    progress(f"predicting {len(data.frames)} test configurations "
             f"({len(data.config_index)} atoms) with {len(members)} model(s)")
    outputs, forward = model_outputs(run, data.frames, model_ids=members, threads=threads)

    is_cal = (np.zeros(len(data.frames), bool) if cal_name is None
              else split_configurations(data.groups, cal_name, fraction, seed))
    held = subset_data(data, ~is_cal)
    held_outputs = {m: o.subset(~is_cal) for m, o in outputs.items()}
    cal_fitted: dict[str, float] = {}
    if cal_name is None:
        evaluated = for_evaluation(fitted, None, None)
    else:
        cal_outputs = {m: o.subset(is_cal) for m, o in outputs.items()}
        cal_data = subset_data(data, is_cal)
        errors = np.linalg.norm(cal_data.ref_forces - cal_outputs[model_id].forces, axis=1)
        progress(f"calibrating on {fraction:.0%} of the configurations of {cal_name!r}")
        evaluated = for_evaluation(fitted, committee(cal_outputs, model_id), errors, fpr=fpr,
                                   source=f"{fraction:.0%} of {cal_name}")
        cal_results, _ = predict_methods(evaluated, cal_outputs, model_id=model_id)
        cal_fitted = fit_thresholds(cal_results, fpr)
    progress("uncertainty of every method")
    results, seconds = predict_methods(evaluated, held_outputs, model_id=model_id)
    for name, method in evaluated.items():  # committee methods: the other members' passes
        if method.min_members > 1:
            seconds[name] += sum(v for m, v in forward.items() if m != model_id)
    base = held_outputs[model_id]
    force_errors = np.linalg.norm(held.ref_forces - base.forces, axis=1)
    energy_errors = np.abs(held.ref_energies - base.energies)
    threshold_info = _threshold_info(results, cal_fitted, user_thresholds, fpr, cal_name,
                                     int(is_cal.sum()))
    metrics = _evaluate_all(results, evaluated, held, held_outputs, force_errors,
                            energy_errors, in_domain, seconds, forward[model_id],
                            {n: t["value"] for n, t in threshold_info.items()})
    metrics["calibration"] = (calibration_summaries(
        evaluated, results, force_errors, held.atom_groups(), calibration_set=cal_name,
        fraction=fraction, seed=seed) if cal_name is not None else {})
    metrics["thresholds"] = threshold_info
    metrics["run"] = _run_info(run, model_id, fitted)
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


def _check_thresholds(thresholds, methods, calibrating: bool) -> dict[str, float]:
    from mlipuq.registry import method_class

    out = {}
    known = []
    for name in methods:  # the results a method gives: itself, calibrated, derived
        cls = method_class(name)
        known += [name, *([name + CALIBRATED_SUFFIX] if cls.calibrates and calibrating else []),
                  *cls.derived_names]
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


def _fitted(run, methods, params, *, model_id, refit, fpr, threads, seed, progress,
            client=None):
    """Saved methods where valid (unless ``refit``), the rest fitted, calibrated, saved."""
    unknown = sorted(set(params) - set(methods))
    if unknown:
        raise InputError(f"--param: given for methods not evaluated: {unknown}")
    saved, reasons = ({}, {m: "--refit" for m in methods}) if refit else load_methods(
        run, methods, model_id=model_id)
    for name, wanted in params.items():  # other parameters asked for: refit
        method = saved.get(name)
        if method is not None:
            have = method.get_params(deep=False)
            if any(_param(have.get(k)) != _param(v) for k, v in wanted.items()):
                del saved[name]
                reasons[name] = "other parameters asked for"
    missing = [m for m in methods if m not in saved]
    if saved:
        progress(f"using saved {', '.join(saved)} from {run.path}")
    if missing:
        why = "; ".join(f"{m}: {reasons.get(m, 'not fitted')}" for m in missing)
        members = members_needed(run, missing, model_id)
        frames = run.train_frames()
        progress(f"fitting {', '.join(missing)} on {len(frames)} training configurations "
                 f"({sum(len(a) for a in frames)} atoms, {len(members)} model(s)) [{why}]")
        train, _ = model_outputs(run, frames, model_ids=members, threads=threads)
        saved.update(fit_methods(
            run, model_id=model_id, methods=missing, train_outputs=train,
            params={m: params[m] for m in missing if m in params}, fpr=fpr,
            threads=threads, seed=seed, client=client))
    return {m: saved[m] for m in methods}


def _param(value):
    return list(value) if isinstance(value, tuple) else value


def _evaluate_all(results, evaluated, data, outputs, force_errors, energy_errors, in_domain,
                  seconds, forward, thresholds):
    """evaluate() per kind of error: the model's, or the committee mean's."""
    from mlipuq.evaluation import evaluate

    source = next((n for n, r in results.items() if r.atol is not None), None)
    atol = None if source is None else float(results[source].atol)
    is_ood = None
    if in_domain and not set(data.groups.tolist()) <= in_domain:
        is_ood = ~np.isin(data.groups, sorted(in_domain))
    common = {"config_index": data.config_index, "groups": data.groups, "atol": atol,
              "is_ood": is_ood, "timings": seconds, "forward_seconds_per_atom": forward}
    thresholds = {n: t for n, t in thresholds.items() if t is not None}
    errors_from = {n: (evaluated[n].errors_from if n in evaluated else "model")
                   for n in results}
    forces = np.stack([o.forces for o in outputs.values()])
    energies = np.stack([o.energies for o in outputs.values()])
    errors = {
        "model": (force_errors, energy_errors),
        "committee mean": (np.linalg.norm(data.ref_forces - forces.mean(axis=0), axis=1),
                           np.abs(data.ref_energies - energies.mean(axis=0))),
    }
    metrics = None
    for kind, (f_err, e_err) in errors.items():
        group = {n: r for n, r in results.items() if errors_from[n] == kind}
        if not group:
            continue
        part = evaluate(group, force_errors=f_err, energy_errors=e_err,
                        thresholds=thresholds, **common)
        if metrics is None:
            metrics = part
        else:
            metrics["methods"].update(part["methods"])
    metrics["methods"] = {n: metrics["methods"][n] for n in results if n in metrics["methods"]}
    metrics["errors_from"] = {n: errors_from[n] for n in metrics["methods"]}
    metrics["atol_from"] = source
    return metrics


def _run_info(run: RunFolder, model_id: str, methods: Mapping[str, UQMethod]) -> dict:
    from mlipuq.method import _json_params

    info = {
        "path": str(run.path),
        "backend": run.backend,
        "model_id": model_id,
        "model_ids": run.model_ids,
        "elements": run.elements,
        "preset": run.meta.get("preset"),
        "epochs": run.meta.get("epochs"),
        "n_train_atoms": int(run.atom_table.n_atoms),
        "methods": {name: {"params": _json_params(m.get_params(deep=False)),
                           "errors_from": m.errors_from}
                    for name, m in methods.items()},
    }
    return info


def _write(metrics, out_dir, results, force_errors, energy_errors, data, title) -> Path:
    from mlipuq.report import write_report

    return write_report(
        metrics, out_dir, results=results, force_errors=force_errors,
        energy_errors=energy_errors, config_index=data.config_index, groups=data.groups,
        title=title or "mlipuq evaluation",
    )


def say(message: str, *, start: float | None = None, stream=None) -> None:
    """One progress message: logged at INFO on the ``mlipuq`` logger (:mod:`mlipuq.log`,
    which stamps the time since the command started; ``start`` is then unused).

    With ``stream``, printed there instead as ``mlipuq: [12.3 s] message`` (elapsed
    since ``start``, a :func:`time.perf_counter` value), as before logging existed.
    """
    if stream is None:
        from mlipuq.log import logger

        logger.info(message)
        return
    stamp = "" if start is None else f"[{time.perf_counter() - start:6.1f} s] "
    print(f"mlipuq: {stamp}{message}", file=stream or sys.stdout, flush=True)
