"""Out-of-domain UQ benchmark: distance-aware LTAU against the paper's plain mean.

For one system (acac or tungsten) and one trained NequIP ensemble, runs
:func:`mlipuq.pipeline.evaluate_run` (the code under ``mlipuq evaluate``) twice on the
same run folder: LTAU with ``transfer="mean"`` (the paper, the former default) and
with ``transfer="distance"`` (the default). Everything else is identical: the
calibration split, the thresholds (in-domain FPR 5 % per configuration), the
ensemble and D-optimality. Prints the goal table of the out-of-domain issue:

- ROC-AUC of each out-of-domain set against the held-out in-domain configurations,
  calibrated LTAU (both transfers) next to the 3-model ensemble;
- ECE of the calibrated LTAU on the held-out in-domain atoms and on every
  out-of-domain set with forces, before (s = 1) and after calibration;
- atom-level Spearman of LTAU per set, both transfers;
- cost of the UQ step relative to one forward pass.

Systems (data in ``../shared/data``):

- ``acac``: train ``train_300K``; in domain ``test_MD_300K`` (calibrated on a seeded 50 %
  of its configurations); out of domain ``test_MD_600K`` (forces), ``test_H_transfer``,
  ``test_dihedral`` (energies only).
- ``tungsten``: train elastic + sphere minus a seeded validation split
  (``--val-fraction``, 0.3 when trained here: the only in-domain data not trained on);
  in domain the validation frames (calibrated on 50 % of them); out of domain
  non-elastic, period-defect, cluster-cluster.

Usage (from the repository root)::

    python benchmarks/acac.py --epochs 40 --models 3 --preset small --out /tmp/acac
    python benchmarks/ood_uq.py acac --reuse /tmp/acac/run --out /tmp/ood_acac
    python benchmarks/ood_uq.py tungsten --epochs 60 --out /tmp/ood_w   # trains, then evaluates

(``--reuse`` takes an existing run folder; without it the run is trained first.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acac import DEFAULT_DATA, data_dir, fmt, note, train_or_reuse  # noqa: E402

SYSTEMS = {
    "acac": {
        "folder": "acac",
        "tests": {"test_MD_300K": "test_MD_300K.xyz", "test_MD_600K": "test_MD_600K.xyz",
                  "test_H_transfer": "test_H_transfer.xyz", "test_dihedral": "test_dihedral.xyz"},
        "calibration": ("test_MD_300K", 0.5),
        "in_domain": ["test_MD_300K"],
    },
    "tungsten": {
        "folder": "w_uqace",
        "tests": {"non-elastic": "non-elastic.xyz", "period-defect": "period-defect.xyz",
                  "cluster-cluster": "cluster-cluster.xyz"},
        "calibration": ("validation", 0.5),
        "in_domain": ["validation"],
    },
}
TRANSFERS = ("mean", "distance")


def _train(system: str):
    """The training function of the system's own benchmark script."""
    if system == "acac":
        from acac import train
    else:
        from w_methods import train
    return train


def evaluate_both(run, sets: dict, spec: dict, args, out: Path, start: float) -> dict:
    """evaluate_run with each LTAU transfer on the same run, split and seed."""
    from mlipuq.pipeline import evaluate_run

    metrics = {}
    for transfer in TRANSFERS:
        t0 = time.perf_counter()
        metrics[transfer] = evaluate_run(
            run,
            sets,
            out_dir=out / f"report_{transfer}",
            calibration_set=spec["calibration"],
            in_domain=spec["in_domain"],
            params={"ltau": {"transfer": transfer}},
            threads=args.threads,
            seed=args.seed,
            title=f"mlipuq OOD benchmark: {args.system}, LTAU {transfer}",
            progress=lambda message: note(message, start),
        )
        note(f"evaluated with transfer={transfer} in {time.perf_counter() - t0:.0f} s", start)
    return metrics


def _get(metrics: dict, method: str, group: str, key: str):
    return metrics["methods"].get(method, {}).get("metrics", {}).get(group, {}).get(key)


def goal_tables(metrics: dict, spec: dict) -> tuple[str, dict]:
    """Markdown tables and the goal verdicts from the two evaluations."""
    new, old = metrics["distance"], metrics["mean"]
    table = new["test_sets"]
    inside = [n for n, t in table.items() if t["in_domain"]]
    outside = [n for n, t in table.items() if not t["in_domain"]]
    verdict = {"auc": True, "ece_in": True, "ece_out": True, "spearman": True, "cost": True}
    lines = [
        "| set | role | configs | force MAE model_0 (eV/Å, per component) | "
        "force MAE of the norm | energy MAE (meV/atom) |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in table.items():
        row = entry["model_0"]
        energy = row["energy_mae_per_atom"]
        lines.append(
            f"| {name} | {'in' if entry['in_domain'] else 'out'} | "
            f"{entry['n_configs']} | {fmt(row['force_mae_component'], '{:.4f}')} | "
            f"{fmt(row['force_mae_norm'], '{:.4f}')} | "
            f"{fmt(None if energy is None else 1e3 * energy, '{:.2f}')} |"
        )
    lines += [
        "",
        "ROC-AUC against the held-out in-domain configurations (TPR at the fitted "
        "threshold; in-domain FPR in the last row):",
        "",
        "| set | LTAU distance (calibrated) | LTAU mean (calibrated) | ensemble | "
        "D-optimality | k-NN distance z | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in outside:
        auc = {
            m: _get(new, m, name, "roc_auc")
            for m in ("ltau_calibrated", "ensemble", "doptimality", "knn_distance")
        }
        tpr = {m: _get(new, m, name, "tpr") for m in auc}
        plain = _get(old, "ltau_calibrated", name, "roc_auc")
        ltau, ens = auc["ltau_calibrated"], auc["ensemble"]
        ok = (
            ltau is not None
            and ens is not None
            and ltau >= ens - 0.02
            and (ens < 0.90 or ltau >= 0.90)
        )
        verdict["auc"] &= ok
        cells = [f"{fmt(auc[m], '{:.2f}')} ({fmt(tpr[m], '{:.0%}')})" for m in auc]
        lines.append(
            f"| {name} | {cells[0]} | {fmt(plain, '{:.2f}')} | {cells[1]} | "
            f"{cells[2]} | {cells[3]} | {'met' if ok else 'missed'} |"
        )
    fpr = {
        m: [_get(new, m, g, "fpr") for g in inside]
        for m in ("ltau_calibrated", "ensemble", "doptimality", "knn_distance")
    }
    lines.append(
        "| in-domain FPR | "
        + " | ".join(
            [
                fmt(fpr["ltau_calibrated"][0], "{:.0%}"),
                "",
                fmt(fpr["ensemble"][0], "{:.0%}"),
                fmt(fpr["doptimality"][0], "{:.0%}"),
                fmt(fpr["knn_distance"][0], "{:.0%}"),
                "",
            ]
        )
        + " |"
    )
    power = new["calibration"].get("distance_power")
    lines.append(f"\nbeta chosen by calibration (distance_power='auto'): {fmt(power, '{:g}')}")

    lines += [
        "",
        "ECE of LTAU (p = CDF at atol / s_j), held-out atoms; s fitted on the "
        "in-domain calibration split only:",
        "",
        "| set | role | distance s = 1 | distance calibrated | mean s = 1 | "
        "mean calibrated | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    cal_new, cal_old = new["calibration"], old["calibration"]
    for name, entry in table.items():
        if not entry["has_forces"]:
            continue
        after = cal_new["ece_after"].get(name)
        limit = 0.05 if entry["in_domain"] else 0.10
        ok = after is not None and after <= limit
        verdict["ece_in" if entry["in_domain"] else "ece_out"] &= ok
        lines.append(
            f"| {name} | {'in' if entry['in_domain'] else 'out'} | "
            f"{fmt(cal_new['ece_before'].get(name))} | {fmt(after)} | "
            f"{fmt(cal_old['ece_before'].get(name))} | "
            f"{fmt(cal_old['ece_after'].get(name))} | "
            f"{'met' if ok else 'missed'} (<= {limit}) |"
        )
    lines.append(
        f"\ns fitted: distance {cal_new['scale']:.3f}"
        f"{' (at bound)' if cal_new['at_bound'] else ''}, mean {cal_old['scale']:.3f}"
        f"{' (at bound)' if cal_old['at_bound'] else ''}; atol = "
        f"{cal_new['atol']:.4g} eV/Å (mean force-error norm of the final model on "
        "the training atoms)"
    )

    lines += [
        "",
        "Atom-level Spearman (calibrated LTAU uncertainty vs force error):",
        "",
        "| set | distance | mean (paper) | goal (>= mean - 0.02) |",
        "|---|---|---|---|",
    ]
    for name, entry in table.items():
        if not entry["has_forces"]:
            continue
        a = _get(new, "ltau_calibrated", name, "spearman_atom")
        b = _get(old, "ltau_calibrated", name, "spearman_atom")
        ok = a is not None and b is not None and a >= b - 0.02
        verdict["spearman"] &= ok
        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {'met' if ok else 'missed'} |")

    lines += [
        "",
        "Cost of the UQ step per atom, ratio to one forward pass of model_0 (same run):",
        "",
        "| method | distance run | mean run |",
        "|---|---|---|",
    ]
    for name in new["methods"]:
        a = new["methods"][name]["cost"]["relative_to_forward"]
        b = old["methods"].get(name, {}).get("cost", {}).get("relative_to_forward")
        lines.append(f"| {name} | {fmt(a, '{:.4f}')} | {fmt(b, '{:.4f}')} |")
        if name == "ltau_calibrated":
            verdict["cost"] &= a is not None and a <= 0.02
    lines += [
        "",
        "Goals: " + ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in verdict.items()),
    ]
    return "\n".join(lines), verdict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help=f"data directory (layout: docs/benchmarks.md) (default {DEFAULT_DATA})",
    )
    parser.add_argument("--reuse", default=None, help="existing run folder: skip training")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--r-max", type=float, default=5.0, help="cutoff in Å (tungsten)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.3,
        help="validation share of the tungsten training files (the in-domain "
        "held-out data; acac is calibrated on test_MD_300K)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--verbose", action="store_true", help="per-epoch training lines")
    args = parser.parse_args(argv)
    spec = SYSTEMS[args.system]
    args.out = args.out or f"/tmp/mlipuq_ood_{args.system}"
    args.train_subset = None  # acac.train reads it
    folder = data_dir(args.data, spec["folder"], list(spec["tests"].values()))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from mlipuq.io import read_structures, write_json

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run, _ = train_or_reuse(args, folder, start, _train(args.system))
    sets = {name: read_structures(folder / file) for name, file in spec["tests"].items()}
    metrics = evaluate_both(run, sets, spec, args, out, start)
    text, verdict = goal_tables(metrics, spec)
    command = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    text = f"`{command}`\n\n{text}"
    print(text)
    (out / "summary.md").write_text(text + "\n")
    write_json(out / "summary.json", {"verdict": verdict, "metrics": metrics})
    note(f"summary {out / 'summary.md'}; reports {out}/report_*", start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
