"""Cost of LTAU and D-optimality in the ASE calculator, against one forward pass
(NequIP, or Allegro with ``--backend allegro``).

For two systems, a 15-atom molecule (acac from ``../shared/data/acac`` if present,
else a 13-atom EMT copper cluster) and a 108-atom periodic fcc copper cell (EMT),
this script

1. trains one small model of the backend (``train`` of ``--backend``, preset
   ``small`` by default, a few epochs: the timing does not depend on the weights)
   with error logging,
2. fits LTAU (descriptors of every training atom, k=5, index by size) and
   D-optimality (one MaxVol active set per element) on its run,
3. times calculator calls on slightly displaced copies of a test structure:
   NequIP's own ``NequIPCalculator`` (baseline), the backend's UQ calculator
   without estimators, with LTAU, with D-optimality, and ``predict`` of each method
   alone on the same descriptors. Calls are interleaved (one of each per
   repetition) so load drift on a shared machine hits all alike; figures are
   medians.
4. optionally (``--compile``) repeats the calculator timings with the model
   compiled by AOTInductor (target ``mlipuq_ase``; minutes per model on a CPU).

The overhead of LTAU is reported three ways: ``t_hook / t_uq``, the time spent in
the calculator's ``save_extra_outputs`` hook (descriptors -> LTAU -> results; the
exact extra work, measured inside the LTAU calculator's own calls) over a call
without estimators; ``t_predict / t_uq`` (``LTAUEstimator.predict`` alone); and
``(t_ltau - t_uq) / t_uq``, the difference of two whole-call timings, which on a
loaded machine is dominated by noise. The same three for D-optimality
(``doptimality_*``). Goal: <= 5 %.

For Allegro the descriptors are made inside the forward pass by forward hooks
(:mod:`mlipuq.backends.nequip.allegro`); the seconds spent in those hooks are timed
too (``descriptor_hooks``) and added to the UQ step (``*_step_over_forward``: hooks +
``save_extra_outputs``, over a call without estimators, which has no hooks).

Usage::

    python benchmarks/nequip_calculator.py                 # eager, ~2-5 min
    python benchmarks/nequip_calculator.py --compile       # + AOTInductor models
    python benchmarks/nequip_calculator.py --quick         # seconds, smoke test
    python benchmarks/nequip_calculator.py --backend allegro

All work uses 1 thread (torch and FAISS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ACAC_DIR = HERE.parent.parent / "shared" / "data" / "acac"


# ---------------------------------------------------------------------- systems
def molecule_system(n_train: int, seed: int) -> tuple[list, object, str]:
    """(training frames, test structure, description) of the ~15-atom molecule."""
    from mlipuq.io import read_structures

    train_file, test_file = ACAC_DIR / "train_300K.xyz", ACAC_DIR / "test_MD_300K.xyz"
    if train_file.is_file() and test_file.is_file():
        frames = read_structures(train_file, require_forces=True)[:n_train]
        test = read_structures(test_file, require_forces=False)[0]
        return frames, test, f"acac C5H8O2 (15 atoms), {len(frames)} training frames"
    from ase.cluster import Icosahedron

    from mlipuq.emt_data import md_frames

    cluster = Icosahedron("Cu", noshells=2, latticeconstant=3.61)
    cluster.center(vacuum=6.0)
    frames = md_frames(cluster, temperature_K=300.0, n_frames=n_train + 1,
                       config_type="cluster", seed=seed, interval=5, equilibration=40)
    return frames[:-1], frames[-1], f"EMT Cu13 cluster, {n_train} training frames"


def periodic_system(n_train: int, seed: int) -> tuple[list, object, str]:
    """(training frames, test structure, description) of the 108-atom Cu cell."""
    from mlipuq.emt_data import bulk_copper, md_frames

    frames = md_frames(bulk_copper(3), temperature_K=300.0, n_frames=n_train + 1,
                       config_type="bulk_300K", seed=seed, interval=5, equilibration=40)
    return frames[:-1], frames[-1], f"EMT fcc Cu 3x3x3 (108 atoms, periodic), {n_train} frames"


# ---------------------------------------------------------------------- setup
def train_and_fit(name: str, frames: list, workdir: Path, *, preset: str, epochs: int,
                  k: int, backend: str = "nequip") -> tuple[Path, object, object, dict]:
    """Train one model on ``frames``, fit LTAU and D-optimality on its run; return
    (model, ltau, doptimality, info)."""
    from ase.io import write

    from mlipuq.backends.registry import get
    from mlipuq.doptimality import DOptimalityEstimator
    from mlipuq.ltau import LTAUEstimator

    data = workdir / f"{name}_train.extxyz"
    write(data, frames, format="extxyz")
    started = time.perf_counter()
    run = get(backend).train(data, workdir / f"{name}_run", preset=preset, epochs=epochs,
                             n_models=1, threads=1, package=False, progress=False,
                             overwrite=True)
    trained = time.perf_counter() - started
    model_path = run.model_path("model_0")
    outputs = get(backend)(model_path, threads=1).outputs(run.train_frames())
    ltau = LTAUEstimator(k=k, n_threads=1).fit_arrays(
        run.store, outputs.descriptors, outputs.species
    )
    doptimality = DOptimalityEstimator().fit_arrays(outputs.descriptors, outputs.species)
    info = {
        "n_train_atoms": int(outputs.descriptors.shape[0]),
        "n_features": int(outputs.descriptors.shape[1]),
        "index": dict(ltau.index_kinds_),
        "train_seconds": round(trained, 1),
    }
    return model_path, ltau, doptimality, info


# ---------------------------------------------------------------------- timing
def time_calls(
    calculators: dict, atoms, *, n_repeat: int, n_warmup: int, seed: int, ltau=None,
    doptimality=None,
) -> dict[str, list[float]]:
    """Seconds per call of each calculator (interleaved) and of each method's predict."""
    from ase.calculators.calculator import all_changes

    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {name: [] for name in calculators}
    alone = {name: method for name, method in (("ltau", ltau), ("doptimality", doptimality))
             if method is not None}
    for name in alone:
        times[f"{name}_predict"] = []
    hook_times = {name[3:]: _time_hook(calc) for name, calc in calculators.items()
                  if name.startswith("uq_")}
    descriptor_times = _time_descriptor_hooks(calculators["uq_ltau"])
    symbols = np.asarray(atoms.get_chemical_symbols())
    for step in range(n_warmup + n_repeat):
        displaced = atoms.copy()
        displaced.calc = None
        displaced.positions += rng.normal(scale=0.01, size=displaced.positions.shape)
        descriptors = None
        for name, calc in calculators.items():
            started = time.perf_counter()
            calc.calculate(displaced, ["energy", "forces"], all_changes)
            elapsed = time.perf_counter() - started
            if step >= n_warmup:
                times[name].append(elapsed)
            descriptors = calc.results.get("descriptors", descriptors)
        for name, method in alone.items():
            if descriptors is None:
                continue
            started = time.perf_counter()
            method.predict_arrays(descriptors, symbols)
            if step >= n_warmup:
                times[f"{name}_predict"].append(time.perf_counter() - started)
    for name, spent in hook_times.items():
        times[f"{name}_hook"] = spent[n_warmup:]
    if descriptor_times is not None:
        times["descriptor_hooks"] = descriptor_times[n_warmup:]
    return {name: values for name, values in times.items() if values}


def _time_descriptor_hooks(calc) -> list[float] | None:
    """For an Allegro calculator: re-register its descriptor hooks with timers; the
    seconds spent in them per call (None when the calculator has no such hooks)."""
    hooks = getattr(calc, "hooks_", None)
    if hooks is None:
        return None
    from mlipuq.backends.nequip.allegro import _find_readout

    readout, energy_sum = _find_readout(calc.model)
    hooks.remove()
    spent: list[float] = []

    def keep(module, args):
        started = time.perf_counter()
        hooks._keep_hidden(module, args)
        spent.append(time.perf_counter() - started)

    def write(module, args, data):
        started = time.perf_counter()
        out = hooks._write_descriptors(module, args, data)
        spent[-1] += time.perf_counter() - started
        return out

    hooks.handles = [readout.mlp_module.mlp[-1].register_forward_pre_hook(keep),
                     energy_sum.register_forward_hook(write)]
    return spent


def _time_hook(calc) -> list[float]:
    """Record the seconds spent in ``calc.save_extra_outputs`` (the whole UQ step)."""
    hook = calc.save_extra_outputs
    spent: list[float] = []

    def timed(out):
        started = time.perf_counter()
        hook(out)
        spent.append(time.perf_counter() - started)

    calc.save_extra_outputs = timed
    return spent


def calculators_for(model_path: Path, ltau, *, compiled: Path | None = None,
                    doptimality=None, backend: str = "nequip") -> dict:
    """The calculators to compare: NequIP's, ours without and with LTAU / D-optimality."""
    from nequip.integrations.ase import NequIPCalculator

    if backend == "allegro":
        from mlipuq.backends.nequip.allegro import AllegroUQCalculator as UQCalculator
    else:
        from mlipuq.backends.nequip.calculator import UQCalculator

    base = None
    if compiled is None:
        base = NequIPCalculator._from_saved_model(
            str(model_path), chemical_species_to_atom_type_map=True
        )
        make, source = UQCalculator.from_model, model_path
    else:
        make, source = UQCalculator.from_compiled, compiled
    calcs = {"nequip": base, "uq": make(source),
             "uq_ltau": make(source, estimators={"ltau": ltau}, keep_descriptors=True)}
    if doptimality is not None:
        calcs["uq_doptimality"] = make(source, estimators={"doptimality": doptimality})
    return {name: calc for name, calc in calcs.items() if calc is not None}


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    """Milliseconds (median and minimum) and overhead ratios from per-call seconds.

    The minimum is the least load-disturbed call (``timeit``'s advice); the median
    includes typical interference on a shared machine. Both are reported.
    """
    out: dict[str, float] = {}
    for stat, reduce in (("median", statistics.median), ("min", min)):
        values = {name: reduce(samples) for name, samples in times.items()}
        suffix = "" if stat == "median" else "_min"
        for name, value in values.items():
            out[f"{name}{suffix}_ms"] = round(1e3 * value, 3)
        out[f"ltau_overhead{suffix}"] = round(values["uq_ltau"] / values["uq"] - 1.0, 4)
        if "ltau_predict" in values:
            out[f"predict_over_forward{suffix}"] = round(values["ltau_predict"] / values["uq"], 4)
        if "ltau_hook" in values:
            out[f"hook_over_forward{suffix}"] = round(values["ltau_hook"] / values["uq"], 4)
        if "uq_doptimality" in values:
            out[f"doptimality_overhead{suffix}"] = round(
                values["uq_doptimality"] / values["uq"] - 1.0, 4)
            out[f"doptimality_predict_over_forward{suffix}"] = round(
                values["doptimality_predict"] / values["uq"], 4)
            out[f"doptimality_hook_over_forward{suffix}"] = round(
                values["doptimality_hook"] / values["uq"], 4)
        hooks = values.get("descriptor_hooks", 0.0)  # Allegro: descriptors in the pass
        for name in ("ltau", "doptimality"):
            if f"{name}_hook" in values:
                out[f"{name}_step_over_forward{suffix}"] = round(
                    (values[f"{name}_hook"] + hooks) / values["uq"], 4)
        if "nequip" in values:
            out[f"uq_over_nequip{suffix}"] = round(values["uq"] / values["nequip"], 4)
    return out


def bench_calculator(
    *,
    preset: str = "small",
    epochs: int = 3,
    n_repeat: int = 40,
    n_warmup: int = 5,
    k: int = 5,
    compile_models: bool = False,
    quick: bool = False,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    backend: str = "nequip",
) -> dict:
    """Run the benchmark; print a table and return the figures as a dict.

    Parameters
    ----------
    preset : str
        ``mlipuq train`` preset of the models (``tiny``, ``small``, ``paper``).
    epochs : int
        Training epochs (the timing does not depend on them; LTAU needs >= 1).
    n_repeat, n_warmup : int
        Timed and discarded calls per calculator.
    k : int
        LTAU neighbours.
    compile_models : bool
        Also time AOTInductor-compiled models (minutes of compilation each).
    quick : bool
        Tiny sizes (smoke test).
    workdir : path, optional
        Where to keep runs and compiled models (a temporary directory by default).
    seed : int
        Seed of the data and the displacements.
    backend : {"nequip", "allegro"}
        Model trained and timed.
    """
    import torch

    from mlipuq.backends.nequip.features import torch_threads

    warnings.filterwarnings("ignore")
    if quick:
        preset, epochs, n_repeat, n_warmup = "tiny", 1, 5, 1
    n_train = {"molecule": 30 if quick else 300, "periodic": 4 if quick else 40}
    temporary = (
        tempfile.TemporaryDirectory(prefix="mlipuq_bench_calc_") if workdir is None else None
    )
    root = Path(workdir if workdir is not None else temporary.name)
    root.mkdir(parents=True, exist_ok=True)
    results = {
        "backend": backend,
        "preset": preset,
        "k": k,
        "n_repeat": n_repeat,
        "threads": 1,
        "torch": torch.__version__,
        "systems": {},
    }
    try:
        with torch_threads(1):
            for name, make in (("molecule", molecule_system), ("periodic", periodic_system)):
                frames, test, description = make(n_train[name], seed)
                model_path, ltau, doptimality, info = train_and_fit(
                    name, frames, root, preset=preset, epochs=epochs, k=k, backend=backend
                )
                entry = {"description": description, "n_atoms": len(test), **info}
                medians = time_calls(
                    calculators_for(model_path, ltau, doptimality=doptimality,
                                    backend=backend),
                    test,
                    n_repeat=n_repeat,
                    n_warmup=n_warmup,
                    seed=seed,
                    ltau=ltau,
                    doptimality=doptimality,
                )
                entry["eager"] = summarise(medians)
                if compile_models:
                    from mlipuq.backends.nequip.compile import compile_model

                    started = time.perf_counter()
                    compiled = compile_model(model_path, root / f"{name}.nequip.pt2")
                    entry["compile_seconds"] = round(time.perf_counter() - started, 1)
                    medians = time_calls(
                        calculators_for(model_path, ltau, compiled=compiled,
                                        backend=backend),
                        test,
                        n_repeat=n_repeat,
                        n_warmup=n_warmup,
                        seed=seed,
                        ltau=ltau,
                    )
                    entry["compiled"] = summarise(medians)
                results["systems"][name] = entry
                print_entry(name, entry)
    finally:
        if temporary is not None:
            temporary.cleanup()
    return results


def print_entry(name: str, entry: dict) -> None:
    """One block of the table for a system."""
    print(f"\n[{name}] {entry['description']}; test structure {entry['n_atoms']} atoms")
    print(
        f"  LTAU: {entry['n_train_atoms']} training atoms, D={entry['n_features']}, "
        f"index {entry['index']}"
    )
    for mode in ("eager", "compiled"):
        if mode not in entry:
            continue
        row = entry[mode]
        for label, suffix in (("median", ""), ("min", "_min")):
            names = [
                key[: -len(f"{suffix}_ms")]
                for key in row
                if key.endswith(f"{suffix}_ms") and (suffix or not key.endswith("_min_ms"))
            ]
            parts = [f"{n} {row[f'{n}{suffix}_ms']:.3f} ms" for n in names]
            print(f"  {mode:8s} {label:6s} " + ", ".join(parts))
            ratio = row.get(f"uq_over_nequip{suffix}")
            print(
                f"  {'':15s} LTAU overhead (with/without - 1): "
                f"{100 * row[f'ltau_overhead{suffix}']:+.1f} %; predict / forward: "
                f"{100 * row[f'predict_over_forward{suffix}']:.1f} %; UQ hook / forward: "
                f"{100 * row[f'hook_over_forward{suffix}']:.1f} %"
                + (f"; UQCalculator / NequIPCalculator: {ratio:.3f}" if ratio else "")
            )
            if f"doptimality_overhead{suffix}" in row:
                print(
                    f"  {'':15s} D-optimality overhead (with/without - 1): "
                    f"{100 * row[f'doptimality_overhead{suffix}']:+.1f} %; predict / forward: "
                    f"{100 * row[f'doptimality_predict_over_forward{suffix}']:.1f} %; UQ hook "
                    f"/ forward: {100 * row[f'doptimality_hook_over_forward{suffix}']:.1f} %"
                )
            steps = [f"{name} {100 * row[f'{name}_step_over_forward{suffix}']:.1f} %"
                     for name in ("ltau", "doptimality")
                     if f"{name}_step_over_forward{suffix}" in row]
            if steps:
                print(f"  {'':15s} UQ step (descriptor hooks + method) / forward: "
                      + ", ".join(steps))
    if "compile_seconds" in entry:
        print(f"  compile time (AOTInductor, mlipuq_ase target): {entry['compile_seconds']} s")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-repeat", type=int, default=40)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time compiled models")
    parser.add_argument("--quick", action="store_true", help="tiny smoke test")
    parser.add_argument("--workdir", default=None, help="keep runs here")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--backend", default="nequip", choices=("nequip", "allegro"),
                        help="model trained and timed")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = bench_calculator(
        preset=args.preset,
        epochs=args.epochs,
        n_repeat=args.n_repeat,
        k=args.k,
        compile_models=args.compile,
        quick=args.quick,
        workdir=args.workdir,
        backend=args.backend,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
