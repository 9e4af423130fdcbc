"""LTAU transfer variants: distance scope x beta, on one trained run (docs/ltau.md table).

For every variant, LTAU (k = 5, every logged epoch) is fitted on the run's training
set, calibrated on a seeded half of the in-domain set's configurations
(:meth:`mlipuq.ltau.LTAUEstimator.calibrate` with a fixed ``distance_power``), and
judged on the held-out half and on every other set: ECE, atom-level Spearman, and the
ROC-AUC of the configuration uncertainty (mean of 1 - p) against the held-out
in-domain configurations. Also prints the Brier score on the calibration atoms for
each beta of the default scope (what ``distance_power="auto"`` minimises).

Scopes: ``atom`` (z), ``max_atom_mean`` (max of z and the configuration mean),
``mean`` (configuration mean), ``rms`` (configuration RMS, the estimator's default
``distance_scope="configuration"``). ``mean`` and ``max_atom_mean`` exist only here.

Usage (from the repository root, runs of ``benchmarks/ood_uq.py``)::

    python benchmarks/ltau_transfer_grid.py /tmp/bench_acac/run test_MD_300K \\
        test_MD_300K=../shared/data/acac/test_MD_300K.xyz \\
        test_MD_600K=../shared/data/acac/test_MD_600K.xyz \\
        test_H_transfer=../shared/data/acac/test_H_transfer.xyz \\
        test_dihedral=../shared/data/acac/test_dihedral.xyz
    python benchmarks/ltau_transfer_grid.py /tmp/ood_w30/run validation \\
        non-elastic=../shared/data/w_uqace/non-elastic.xyz \\
        period-defect=../shared/data/w_uqace/period-defect.xyz \\
        cluster-cluster=../shared/data/w_uqace/cluster-cluster.xyz

The in-domain set ``validation`` means the run's own validation frames.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from collections.abc import Sequence

import numpy as np

SCOPES = ("atom", "max_atom_mean", "mean", "rms")
POWERS = (0.5, 1.0, 1.5, 2.0)


def stretch_for(scope: str, power: float):
    """A ``_stretch`` replacement: max(1, z~) ** power with z~ of ``scope``."""

    def stretch(normalised: np.ndarray, configs: np.ndarray | None) -> np.ndarray:
        z = np.where(np.isfinite(normalised), normalised, 1.0)
        configs = np.zeros(len(z), int) if configs is None else configs
        counts = np.bincount(configs)
        mean = (np.bincount(configs, z) / counts)[configs]
        rms = np.sqrt(np.bincount(configs, z**2) / counts)[configs]
        chosen = {"atom": z, "max_atom_mean": np.maximum(z, mean), "mean": mean,
                  "rms": rms}[scope]
        return np.maximum(chosen, 1.0) ** power

    return stretch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (mlipuq train)")
    parser.add_argument("in_domain", help="name of the in-domain set ('validation': the run's)")
    parser.add_argument("tests", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    from scipy.stats import spearmanr

    from mlipuq import metrics
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.pipeline import (
        load_test_sets,
        model_outputs,
        split_configurations,
        subset_data,
    )
    from mlipuq.run_folder import RunFolder

    run = RunFolder.open(args.run)
    sets = dict(item.split("=", 1) for item in args.tests)
    if args.in_domain == "validation":
        sets["validation"] = str(run.val_path)
    data = load_test_sets(sets, run.elements)
    train, _ = model_outputs(run, run.train_frames(), model_ids=["model_0"])
    outputs, _ = model_outputs(run, data.frames, model_ids=["model_0"])
    out = outputs["model_0"]
    is_cal = split_configurations(data.groups, args.in_domain, 0.5, args.seed)
    cal_out, held_out = out.subset(is_cal), out.subset(~is_cal)
    cal_data, held = subset_data(data, is_cal), subset_data(data, ~is_cal)
    cal_err = np.linalg.norm(cal_data.ref_forces - cal_out.forces, axis=1)
    err = np.linalg.norm(held.ref_forces - held_out.forces, axis=1)
    groups = held.atom_groups()
    base = LTAUEstimator(k=5, transfer="mean").fit_arrays(
        run.store, train["model_0"].descriptors, train["model_0"].species)
    variants = [("plain mean", None, 0.0)] + [
        (f"{scope}, {power:g}", scope, power) for scope in SCOPES for power in POWERS]
    for label, scope, power in variants:
        est = copy.copy(base)
        if scope is not None:
            est.transfer, est.distance_power = "distance", power
            est._stretch = stretch_for(scope, power)
        est.calibrate_arrays(cal_out.descriptors, cal_out.species, cal_err,
                      config_index=cal_out.config_index)
        result = est.predict_arrays(held_out.descriptors, held_out.species,
                             config_index=held_out.config_index)
        config_u = result.config_uncertainty
        reference = config_u[held.groups == args.in_domain]
        cells = [f"{label:20s} s={est.scale_:.3f}"]
        for name in dict.fromkeys(held.groups.tolist()):
            rows = (groups == name) & np.isfinite(err)
            text = f"{name}:"
            if rows.any():
                text += (f" ECE {metrics.ece(result.extras['p'][rows], err[rows], est.atol_):.3f}"
                         f" rho {spearmanr(result.atom_uncertainty[rows], err[rows])[0]:.3f}")
            if name != args.in_domain:
                scores = config_u[held.groups == name]
                labels = np.r_[np.zeros(len(reference)), np.ones(len(scores))]
                text += f" AUC {metrics.roc_auc(np.r_[reference, scores], labels.astype(bool)):.2f}"
            cells.append(text)
        print(" | ".join(cells), flush=True)
    auto = LTAUEstimator(k=5).fit_arrays(run.store, train["model_0"].descriptors,
                                  train["model_0"].species)
    auto.calibrate_arrays(cal_out.descriptors, cal_out.species, cal_err,
                   config_index=cal_out.config_index)
    brier = auto.calibration_["brier_by_distance_power"]
    print("Brier score by beta (rms scope):",
          ", ".join(f"{b}: {v:.4f}" for b, v in brier.items()),
          f"-> beta {auto.distance_power_:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
