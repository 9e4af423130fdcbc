"""Real-data benchmark on acetylacetone (acac): NequIP ensemble, four UQ methods.

Trains an ensemble of NequIP models on ``acac/train_300K.xyz`` with per-epoch error
trajectories (:func:`mlipuq.backends.nequip.training.train_ensemble`, isolated-atom
energies from ``acac/isolated_atoms.xyz``), then evaluates every method with
:func:`mlipuq.pipeline.evaluate_run` (the code under ``mlipuq evaluate``) on
test_MD_300K (in domain), test_MD_600K (forces) and test_H_transfer, test_dihedral
(energies only). LTAU's scale factor s is fitted on half of the test_MD_300K
configurations (seeded split) and judged on the other half.

Prints, and writes to ``OUT/summary.md`` / ``OUT/summary.json``: force MAE per set,
LTAU's ECE before / after calibration, Spearman correlations (atom and
configuration level), detection rates, ROC-AUC and the cost per atom of every
method as a ratio to one forward pass measured in the same run.

Usage (from the repository root)::

    python benchmarks/acac.py [DATA] --epochs 60 --models 3 --preset small \
        --threads 1 --out /tmp/mlipuq_bench_acac
    python benchmarks/acac.py --reuse /tmp/mlipuq_bench_acac/run --out /tmp/acac_eval

``DATA`` defaults to ``../shared/data`` relative to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
TRAIN = "train_300K.xyz"
ISOLATED = "isolated_atoms.xyz"
TESTS = {
    "test_MD_300K": "test_MD_300K.xyz",
    "test_MD_600K": "test_MD_600K.xyz",
    "test_H_transfer": "test_H_transfer.xyz",
    "test_dihedral": "test_dihedral.xyz",
}
IN_DOMAIN = "test_MD_300K"


# ---------------------------------------------------------------------- helpers (shared)
def data_dir(path: str | os.PathLike | None, sub: str, files: Sequence[str]) -> Path:
    """``path/sub`` holding ``files``; exits with a clear message when absent."""
    root = Path(path) if path is not None else DEFAULT_DATA
    folder = root / sub
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        sys.exit(
            f"data: {folder} lacks {', '.join(missing)} (give the data directory, laid out "
            f"as in docs/benchmarks.md, as the first argument; default {DEFAULT_DATA})"
        )
    return folder


def subsample(frames: list, n_max: int | None, seed: int) -> list:
    """At most ``n_max`` frames, a seeded random subset kept in file order."""
    if n_max is None or len(frames) <= n_max:
        return frames
    keep = np.sort(np.random.default_rng(seed).choice(len(frames), n_max, replace=False))
    return [frames[i] for i in keep]


def note(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)


def write_subset(frames: list, path: Path) -> Path:
    """Write frames (with their single-point energies/forces) as extxyz."""
    import warnings

    from ase.io import write

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unhashable information")
        write(path, frames, format="extxyz")
    return path


def force_energy_mae(run, sets: Mapping[str, list], *, threads: int) -> dict:
    """Force MAE per component (eV/Å) and energy MAE per atom (meV/atom) per set.

    For ``model_0`` and for the ensemble mean of all members (one forward pass each).
    """
    from mlipuq.io import reference_energy, reference_forces
    from mlipuq.pipeline import model_outputs

    out = {}
    for name, frames in sets.items():
        outputs, _ = model_outputs(run, frames, threads=threads)
        forces = np.stack([o.forces for o in outputs.values()])
        energies = np.stack([o.energies for o in outputs.values()])
        ref_e = np.array(
            [reference_energy(a) if reference_energy(a) is not None else np.nan for a in frames],
            float,
        )
        n = np.array([len(a) for a in frames], float)
        row = {}
        refs = [reference_forces(a) for a in frames]
        has_f = all(
            r is not None and np.shape(r) == (len(a), 3) for r, a in zip(refs, frames, strict=True)
        )
        for label, f, e in (
            ("model_0", forces[0], energies[0]),
            ("ensemble_mean", forces.mean(0), energies.mean(0)),
        ):
            row[f"force_mae_{label}"] = (
                float(np.mean(np.abs(np.concatenate(refs) - f))) if has_f else None
            )
            row[f"energy_mae_meV_per_atom_{label}"] = float(np.nanmean(np.abs(ref_e - e) / n) * 1e3)
        out[name] = row
    return out


def fmt(value, spec: str = "{:.3f}") -> str:
    return "–" if value is None else spec.format(value)


def metric_table(metrics: dict, key: str, sets: Sequence[str], spec: str = "{:.3f}") -> str:
    """Markdown table: methods x sets of ``metrics["methods"][m]["metrics"][set][key]``."""
    lines = ["| method | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name, entry in metrics["methods"].items():
        cells = [fmt(entry["metrics"].get(s, {}).get(key), spec) for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(metrics: dict) -> str:
    lines = ["| method | s / atom | x forward pass | threshold |", "|---|---|---|---|"]
    for name, entry in metrics["methods"].items():
        cost = entry["cost"]
        lines.append(
            f"| {name} | {fmt(cost['seconds_per_atom'], '{:.2e}')} | "
            f"{fmt(cost['relative_to_forward'], '{:.3f}')} | "
            f"{fmt(entry['threshold'], '{:.3g}')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- stages
def train_or_reuse(args, folder: Path, start: float, train_fn):
    """The run folder given by ``--reuse``, else a freshly trained one; (run, seconds)."""
    from mlipuq.run_folder import RunFolder

    if args.reuse:
        run = RunFolder.open(args.reuse)
        note(f"reusing run {run.path}", start)
        return run, None
    run, train_seconds = train_fn(args, folder, start)
    note(f"trained in {train_seconds:.0f} s: {run.path}", start)
    return run, train_seconds


def train(args, folder: Path, start: float):
    from mlipuq.backends.nequip.training import train_ensemble

    train_file = folder / TRAIN
    if args.train_subset is not None:
        from mlipuq.io import read_structures

        frames = subsample(
            read_structures(train_file, require_forces=True), args.train_subset, args.seed
        )
        train_file = write_subset(frames, Path(args.out) / "train_subset.extxyz")
    note(
        f"training {args.models} model(s), preset {args.preset}, {args.epochs} epochs, "
        f"{args.threads} thread(s) on {train_file}",
        start,
    )
    t0 = time.perf_counter()
    run = train_ensemble(
        train_file,
        Path(args.out) / "run",
        preset=args.preset,
        epochs=args.epochs,
        n_models=args.models,
        seed=args.seed,
        val_fraction=0.1,
        isolated_energies=folder / ISOLATED,
        threads=args.threads,
        package=False,
        overwrite=True,
        progress=args.verbose,
    )
    return run, time.perf_counter() - t0


def fit_windowed_ltau(run, start: int, *, threads: int, seed: int) -> None:
    """Fit LTAU on epochs ``start..`` of the trajectories and save it into the run.

    The other methods are (re)fitted and saved too, so that ``evaluate_run(refit=False)``
    uses this LTAU and fresh estimators for the rest.
    """
    from mlipuq.ltau import LTAUEstimator
    from mlipuq.pipeline import fit_methods, model_outputs, save_methods

    train, _ = model_outputs(run, run.train_frames(), threads=threads)
    estimators = fit_methods(run, train_outputs=train, threads=threads, seed=seed, save=False)
    base = train["model_0"]
    estimators["ltau"] = LTAUEstimator(k=5, n_threads=threads, window=(start, None)).fit_arrays(
        run.store, base.descriptors, base.species
    )
    save_methods(run, estimators, model_id="model_0")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help=f"data directory (layout: docs/benchmarks.md) (default {DEFAULT_DATA})",
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/mlipuq_bench_acac")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", default=None, help="existing run folder: skip training")
    parser.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on this many seeded configurations (smoke runs)",
    )
    parser.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="at most this many configurations per test set (smoke runs)",
    )
    parser.add_argument(
        "--ltau-window",
        type=int,
        default=None,
        metavar="START",
        help="LTAU uses logged epochs START.. only (negative: the last "
        "-START epochs); default all epochs",
    )
    parser.add_argument("--verbose", action="store_true", help="per-epoch training lines")
    args = parser.parse_args(argv)

    folder = data_dir(args.data, "acac", [TRAIN, ISOLATED, *TESTS.values()])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from mlipuq.io import read_structures, write_json
    from mlipuq.pipeline import evaluate_run

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run, train_seconds = train_or_reuse(args, folder, start, train)

    sets = {
        name: subsample(read_structures(folder / file), args.test_subset, args.seed)
        for name, file in TESTS.items()
    }
    t0 = time.perf_counter()
    if args.ltau_window is not None:
        note(f"fitting LTAU on the epoch window ({args.ltau_window}, None)", start)
        fit_windowed_ltau(run, args.ltau_window, threads=args.threads, seed=args.seed)
    metrics = evaluate_run(
        run,
        sets,
        out_dir=out / "report",
        calibration_set=(IN_DOMAIN, 0.5),
        in_domain=[IN_DOMAIN],
        threads=args.threads,
        seed=args.seed,
        refit=args.ltau_window is None,  # else the windowed LTAU saved above is used
        title="mlipuq benchmark: acac (NequIP ensemble)",
        progress=lambda message: note(message, start),
    )
    eval_seconds = time.perf_counter() - t0
    note("force / energy MAE per set", start)
    mae = force_energy_mae(run, sets, threads=args.threads)

    settings = {
        "preset": run.meta.get("preset"),
        "epochs": run.meta.get("epochs"),
        "n_models": len(run.model_ids),
        "seed": args.seed,
        "threads": args.threads,
        "n_train_atoms": int(run.atom_table.n_atoms),
        "ltau_window": args.ltau_window,
        "test_configs": {name: len(frames) for name, frames in sets.items()},
        "train_seconds": train_seconds,
        "evaluate_seconds": eval_seconds,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    text = summary(metrics, mae, settings)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    write_json(out / "summary.json", {"settings": settings, "mae": mae, "metrics": metrics})
    note(f"report {metrics['report']}; summary {out / 'summary.md'}", start)
    return 0


def summary(metrics: dict, mae: dict, settings: dict) -> str:
    sets = list(TESTS)
    cal = metrics["calibration"]
    lines = [
        "Settings: " + json.dumps(settings),
        f"\nLTAU atol (training MAE of the final model, force-error norm) = "
        f"{metrics['run']['ltau']['atol']:.4f} eV/Å; k = {metrics['run']['ltau']['k']}",
        "\n| set | force MAE model_0 (eV/Å) | force MAE ens. mean | E MAE model_0 (meV/atom) "
        "| E MAE ens. mean |",
        "|---|---|---|---|---|",
    ]
    for name in sets:
        row = mae[name]
        lines.append(
            f"| {name} | {fmt(row['force_mae_model_0'], '{:.4f}')} | "
            f"{fmt(row['force_mae_ensemble_mean'], '{:.4f}')} | "
            f"{fmt(row['energy_mae_meV_per_atom_model_0'], '{:.2f}')} | "
            f"{fmt(row['energy_mae_meV_per_atom_ensemble_mean'], '{:.2f}')} |"
        )
    lines += [
        f"\nLTAU calibration: s = {cal['scale']:.3f} fitted on {cal['n_calibration_atoms']} "
        f"atoms of {cal['calibration_set']} ({cal['fraction']:.0%} of configurations, seed "
        f"{cal['seed']}); ECE on the held-out {cal['n_held_out_atoms']} atoms of it and on all "
        "of every other set. Per-set s: fitted on half of that set, ECE on the other half.",
        "\n| set | ECE s=1 | ECE s=fitted | s per set | ECE (s per set) |",
        "|---|---|---|---|---|",
    ]
    for name in cal["ece_before"]:
        lines.append(
            f"| {name} | {fmt(cal['ece_before'][name])} | "
            f"{fmt(cal['ece_after'][name])} | "
            f"{fmt(cal['group_scales'].get(name), '{:.2f}')} | "
            f"{fmt(cal['group_ece_after'].get(name))} |"
        )
    for title, key in (
        ("Spearman, atom level (force error)", "spearman_atom"),
        ("Spearman, configuration level (max force error)", "spearman_config_force"),
        ("Spearman, configuration level (energy error)", "spearman_config_energy"),
        ("Detection rate, configurations", "detection_rate_config"),
        ("Detection rate, atoms", "detection_rate_atom"),
    ):
        lines += [f"\n{title}:\n", metric_table(metrics, key, ["all", *sets])]
    lines += [
        "\nROC-AUC (configuration uncertainty; in domain = test_MD_300K, all other sets "
        "out of domain):\n",
        metric_table(metrics, "roc_auc", ["all"]),
    ]
    lines += [
        "\nCost of the UQ step per test atom (ensemble: + the other members' forward "
        "passes), ratio to one forward pass of model_0 measured in the same run:\n",
        cost_table(metrics),
        f"\nforward pass: {metrics['forward_seconds_per_atom']} s/atom",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
