"""Overhead of LTAU error logging during NequIP or Allegro training (and, if present, of
the UQ calculator at inference).

Training half: seconds per epoch of the same ``nequip-train`` run (same data, seed,
preset, 1 thread) without error logging, with ``in_batch`` logging and with
``epoch_end`` logging (EMA weights). Epoch time = wall time between consecutive
``on_train_epoch_start`` hooks (training + validation + logging), median over the
epochs after the first. The second figure, robust to load drift, is measured
inside each run: seconds spent in the callback's own hooks divided by the rest of
the epoch time. Runs are interleaved (none, in_batch, epoch_end, none, ...)
``--repeats`` times so that load drift on a shared machine hits all modes alike;
the figure per mode is the median over repeats.

Usage::

    python benchmarks/nequip_overhead.py --frames 200 --epochs 6 --repeats 2
    python benchmarks/nequip_overhead.py --quick          # a few seconds of training
    python benchmarks/nequip_overhead.py --backend allegro --frames 200 --epochs 6

``--backend allegro`` trains the Allegro preset of the same name
(:data:`mlipuq.backends.nequip.config.ALLEGRO_PRESETS`) with the same callback.

The calculator half lives in ``benchmarks/nequip_calculator.py`` (``bench_calculator``)
and is called after the training half when that file exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ACAC = HERE.parent.parent / "shared" / "data" / "acac" / "train_300K.xyz"
MODES = ("none", "in_batch", "epoch_end")


def _training_data(directory: Path, n_frames: int, *, quick: bool) -> tuple[Path, Path, str]:
    """(train file, val file, description): acac if available, else EMT copper."""
    from ase.io import write

    from mlipuq.backends.nequip.training import read_training_set, split_train_val

    if ACAC.is_file() and not quick:
        frames = read_training_set(ACAC)[:n_frames]
        name = f"acac train_300K, first {len(frames)} frames (15 atoms)"
    else:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from nequip_support import make_emt_copper_frames

        frames = make_emt_copper_frames(n_frames, seed=0, repeat=(2, 2, 2))
        name = f"EMT Cu MD, {n_frames} frames (32 atoms)"
    train_idx, val_idx = split_train_val(len(frames), val_fraction=0.1, seed=0)
    train, val = directory / "train.extxyz", directory / "val.extxyz"
    write(train, [frames[i] for i in train_idx], format="extxyz")
    write(val, [frames[i] for i in val_idx], format="extxyz")
    return train, val, f"{name}; {len(train_idx)} training frames"


def _run_once(mode: str, repeat: int, *, directory: Path, train: Path, val: Path,
              preset: str, epochs: int, r_max: float, elements: list[str],
              energies: dict[str, float], backend: str = "nequip") -> list[float]:
    from mlipuq.backends.nequip import config as cfg
    from mlipuq.backends.nequip.training import run_nequip_train

    tag = f"{mode}_{repeat}"
    config = cfg.preset_config(
        preset, elements=elements, train_file=train, val_file=val,
        isolated_energies=energies, epochs=epochs, seed=0, r_max=r_max,
        architecture=backend,
    )
    times = directory / f"times_{tag}.json"
    callbacks = [{"_target_": cfg.PROGRESS_TARGET, "label": tag, "times_file": str(times),
                  "quiet": True}]
    spent = directory / f"spent_{tag}.json"
    if mode != "none":
        spec = cfg.error_callback_spec(
            store_path=directory / f"store_{tag}", model_id="m", mode=mode, weights="ema",
            batch_size=16, seed=0, threads=1,
        )
        spec["timing_file"] = str(spent)
        callbacks.insert(0, spec)
    cfg.add_callbacks(config, callbacks)
    path = cfg.write_yaml(directory / f"{tag}.yaml", config)
    run_nequip_train(path, directory / f"out_{tag}", threads=1, progress=False)
    stamps = json.loads(times.read_text())
    durations = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    inside = json.loads(spent.read_text()) if spent.is_file() else [0.0] * len(durations)
    return durations, inside


def bench_training(*, frames: int = 200, epochs: int = 6, repeats: int = 2,
                   preset: str = "small", quick: bool = False,
                   backend: str = "nequip") -> dict:
    """Seconds per epoch for each logging mode and their ratios to no logging."""
    from mlipuq.backends.nequip.training import (
        check_elements,
        fit_isolated_energies,
        read_training_set,
    )

    with tempfile.TemporaryDirectory(prefix="mlipuq_bench_") as tmp:
        directory = Path(tmp)
        train, val, description = _training_data(directory, frames, quick=quick)
        train_frames = read_training_set(train)
        elements = check_elements(train_frames, str(train))
        energies = fit_isolated_energies(train_frames, elements)
        r_max = 4.0 if quick or not ACAC.is_file() else 5.0
        per_mode: dict[str, list[float]] = {mode: [] for mode in MODES}
        share: dict[str, list[float]] = {mode: [] for mode in MODES}
        for repeat in range(repeats):
            for mode in MODES:
                durations, inside = _run_once(
                    mode, repeat, directory=directory, train=train, val=val, preset=preset,
                    epochs=epochs, r_max=r_max, elements=elements, energies=energies,
                    backend=backend,
                )
                first = 1 if len(durations) > 1 else 0
                steady = durations[first:]
                per_mode[mode].append(statistics.median(steady))
                # logging time / training time without it, in the same run (drift-proof)
                share[mode].append(sum(inside[first:]) / (sum(steady) - sum(inside[first:])))
                print(f"  repeat {repeat} {mode:9s}: "
                      + " ".join(f"{d:.2f}" for d in durations) + " s/epoch; in callback "
                      + " ".join(f"{t:.3f}" for t in inside) + " s", flush=True)
    seconds = {mode: statistics.median(values) for mode, values in per_mode.items()}
    result = {
        "backend": backend,
        "data": description,
        "preset": preset,
        "epochs": epochs,
        "repeats": repeats,
        "seconds_per_epoch": seconds,
        "ratio_to_none": {mode: seconds[mode] / seconds["none"] for mode in MODES},
        "in_run_overhead": {mode: statistics.median(share[mode]) for mode in MODES},
    }
    print(f"training {backend} ({description}, preset {preset}, 1 thread):")
    for mode in MODES:
        print(f"  {mode:9s} {seconds[mode]:7.3f} s/epoch  wall ratio to none "
              f"{result['ratio_to_none'][mode]:.3f}  in-run overhead "
              f"(callback time / rest of epoch) {100 * result['in_run_overhead'][mode]:.2f} %")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--quick", action="store_true", help="tiny EMT copper run (smoke test)")
    parser.add_argument("--backend", default="nequip", choices=("nequip", "allegro"),
                        help="model trained (Allegro through NequIP for 'allegro')")
    parser.add_argument("--no-calculator", action="store_true",
                        help="skip the calculator half (benchmarks/nequip_calculator.py)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.quick:
        args.frames, args.epochs, args.repeats, args.preset = 20, 3, 1, "tiny"
    results = {"training": bench_training(frames=args.frames, epochs=args.epochs,
                                          repeats=args.repeats, preset=args.preset,
                                          quick=args.quick, backend=args.backend)}
    calculator = HERE / "nequip_calculator.py"
    if calculator.is_file() and not args.no_calculator:
        spec = importlib.util.spec_from_file_location("nequip_calculator", calculator)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "bench_calculator"):
            results["calculator"] = module.bench_calculator(backend=args.backend,
                                                            quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
