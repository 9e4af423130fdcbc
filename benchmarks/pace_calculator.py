"""Cost of the UQ step in the pacemaker calculator, against one PyACECalculator evaluation.

1. EMT copper: a 32-atom bulk training set at 300 K (:func:`mlipuq.emt_data.md_frames`),
   a linear ACE run (``PaceBackend.train``: basis ``--preset small`` (66 functions,
   the demo's) or ``paper`` (328), ``--r-max`` 4 Å, 3 bootstrap members, 40 CG epochs
   with error trajectories);
2. every single-model method fitted on it (``fit_methods``: D-optimality, clustered
   D-optimality, LLPR, LTAU);
3. on slightly displaced copies of a 108-atom (3x3x3) and a 256-atom (4x4x4) Cu
   cell, interleaved calls of pyace's own ``PyACECalculator`` (the baseline: one
   evaluation, which computes the B-projections too) and of ``PaceUQCalculator``
   with one method attached each; the UQ step (``add_uncertainty``: projections ->
   method -> results) is timed inside those calls. Figures are medians (and
   minima, the least disturbed call) over the repetitions.

Reported per method: ``uq_step / pyace`` (goal <= 5 %) and the whole-call ratio
``calc / pyace - 1``. Single thread. On a shared machine the timings are noisy: the
ratios are measured in the same run, interleaved, so load drift hits all alike.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/pace_calculator.py [--repeat 40] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/pace_calculator.py --preset paper --r-max 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

METHODS = ("doptimality", "clustered_doptimality", "llpr", "ltau")


def build_run(workdir: Path, *, n_train: int, epochs: int, seed: int, preset: str,
              r_max: float):
    """Training data, linear ACE run and fitted methods; returns the RunFolder."""
    from ase.io import write

    from mlipuq.backends.pace import PaceBackend
    from mlipuq.emt_data import bulk_copper, md_frames
    from mlipuq.run_methods import fit_methods

    frames = md_frames(bulk_copper(2), temperature_K=300.0, n_frames=n_train,
                       config_type="bulk_300K", seed=seed, interval=5, equilibration=40)
    train = workdir / "train.extxyz"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unhashable information")
        write(train, frames, format="extxyz")
    run = PaceBackend.train(train, workdir / "run", preset=preset, epochs=epochs, n_models=3,
                            seed=seed, r_max=r_max, overwrite=True, progress=False)
    fit_methods(run, methods=list(METHODS), seed=seed)
    return run


def _timed_hook(calc) -> list[float]:
    """Wrap ``calc.add_uncertainty`` to record its seconds per call."""
    times: list[float] = []
    inner = calc.add_uncertainty

    def hook(numbers, descriptors):
        started = time.perf_counter()
        inner(numbers, descriptors)
        times.append(time.perf_counter() - started)

    calc.add_uncertainty = hook
    return times


def time_system(run, atoms, *, n_repeat: int, n_warmup: int, seed: int) -> dict:
    """Milliseconds per call and UQ-step ratios for one structure."""
    from ase.calculators.calculator import all_changes
    from pyace.asecalc import PyACECalculator

    from mlipuq.backends.pace import PaceBackend
    from mlipuq.run_methods import load_run_method

    model = str(PaceBackend.model_path(run, "model_0"))
    calcs = {"pyace": PyACECalculator(model)}
    hooks = {}
    for name in METHODS:
        method = load_run_method(run, name, model_id="model_0")
        calcs[name] = PaceBackend.uq_calculator(run, "model_0", estimators={name: method})
        hooks[name] = _timed_hook(calcs[name])
    times: dict[str, list[float]] = {name: [] for name in calcs}
    rng = np.random.default_rng(seed)
    for step in range(n_warmup + n_repeat):
        displaced = atoms.copy()
        displaced.positions += rng.normal(scale=0.01, size=displaced.positions.shape)
        for name, calc in calcs.items():
            started = time.perf_counter()
            calc.calculate(displaced, ["energy", "forces"], all_changes)
            if step >= n_warmup:
                times[name].append(time.perf_counter() - started)
    out: dict = {"n_atoms": len(atoms)}
    for stat, reduce in (("median", statistics.median), ("min", min)):
        base = reduce(times["pyace"])
        out[f"pyace_{stat}_ms"] = round(1e3 * base, 3)
        for name in METHODS:
            step_time = reduce(hooks[name][n_warmup:])
            out[f"{name}_uq_step_{stat}_ms"] = round(1e3 * step_time, 3)
            out[f"{name}_uq_step_over_pyace_{stat}"] = round(step_time / base, 4)
            out[f"{name}_call_overhead_{stat}"] = round(reduce(times[name]) / base - 1, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--train", type=int, default=40, help="training frames (32 atoms)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "paper"),
                        help="basis size (small: 66 functions, paper: 328)")
    parser.add_argument("--r-max", type=float, default=4.0, help="cutoff in Å")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from mlipuq.emt_data import bulk_copper

    results: dict = {"preset": args.preset, "r_max": args.r_max}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = build_run(Path(tmp), n_train=args.train, epochs=args.epochs, seed=args.seed,
                        preset=args.preset, r_max=args.r_max)
        results["setup_s"] = round(time.perf_counter() - started, 1)
        for size in (3, 4):
            atoms = bulk_copper(size)
            atoms.rattle(0.05, seed=args.seed)
            results[f"cu_{len(atoms)}"] = time_system(run, atoms, n_repeat=args.repeat,
                                                      n_warmup=args.warmup, seed=args.seed)
    print(f"basis preset {args.preset}, r_max {args.r_max} Å (setup {results['setup_s']} s)")
    for system, row in results.items():
        if not isinstance(row, dict):
            continue
        print(f"{system}: PyACECalculator {row['pyace_median_ms']:.2f} ms (min "
              f"{row['pyace_min_ms']:.2f})")
        for name in METHODS:
            print(f"  {name:22s} UQ step {row[f'{name}_uq_step_median_ms']:.3f} ms = "
                  f"{100 * row[f'{name}_uq_step_over_pyace_median']:.2f} % of one evaluation "
                  f"(min {100 * row[f'{name}_uq_step_over_pyace_min']:.2f} %); whole call "
                  f"{100 * row[f'{name}_call_overhead_median']:+.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
