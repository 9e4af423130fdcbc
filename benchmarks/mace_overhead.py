"""Overhead of LTAU error logging during MACE training, and of the UQ step at inference.

Runs in the MACE virtual environment (``.venv-mace``, see docs/mace.md).

Training half: one MACE member (preset, EMT copper bulk frames, 1 thread) is set up
with :func:`mlipuq.backends.mace.training.train_ensemble` (1 epoch), then epochs of
its training loop are timed in three modes, interleaved (none, in_batch, epoch_end,
none, ...) so that load drift on a shared machine hits all alike:

``none``
    MACE steps only (the error scatter replaced by a no-op; nothing written).
``in_batch``
    the same steps, the per-atom errors of each step's forward pass put in place, the
    epoch written to the trajectory store.
``epoch_end``
    the steps plus one pass over the training frames with the EMA weights, written.

Overhead = median(mode) / median(none) - 1 over ``--epochs`` epochs per mode. The
second figure, robust to load drift, is measured inside each epoch: seconds spent in
mlipuq's logging (the error scatter, the ``epoch_end`` pass, the store write) divided
by the rest of the epoch (``logging_share``).

Inference half: a ``--cells``^3 fcc copper supercell (4 atoms per cell; 3 -> 108
atoms), rattled. Forward pass = :meth:`MaceBackend.forward_batch` (energy, forces by
autograd and descriptors of one configuration); UQ step = ``estimator.predict`` of
LTAU and D-optimality fitted on the run (:func:`mlipuq.run_methods.fit_methods`) on
that pass's outputs. Medians over ``--repeats`` calls.

Usage::

    OMP_NUM_THREADS=1 .venv-mace/bin/python benchmarks/mace_overhead.py
    OMP_NUM_THREADS=1 .venv-mace/bin/python benchmarks/mace_overhead.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def bench_training(root: Path, *, preset: str, frames: int, epochs: int) -> dict:
    import numpy as np
    from ase.io import write

    from mlipuq.backends.mace.training import _Member, preset_params, train_ensemble
    from mlipuq.emt_data import CopperSizes, copper_datasets

    sets = copper_datasets(seed=0, sizes=CopperSizes(train=frames, test=2))
    write(root / "train.extxyz", sets["train"], format="extxyz")
    run = train_ensemble(root / "train.extxyz", root / "run", preset=preset, epochs=1,
                         seed=0, threads=1, r_max=4.0, progress=False)
    import torch
    from torch_ema import ExponentialMovingAverage

    from mlipuq.backends.mace.model import build_model, import_mace

    params = preset_params(preset)
    member = _Member(run, run.store, params, eval_batch_size=16, progress=False)
    model = build_model(member.hyper(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"], amsgrad=True)
    ema = ExponentialMovingAverage(model.parameters(), decay=params["ema_decay"])
    loss_fn = import_mace().modules.WeightedEnergyForcesLoss(
        energy_weight=params["energy_weight"], forces_weight=params["force_weight"])
    writer = run.store.writer("bench", seed=0)
    scatter = member._scatter
    own = [0.0]  # seconds spent in mlipuq's logging within the current epoch

    def timed_scatter(*args):
        tick = time.perf_counter()
        scatter(*args)
        own[0] += time.perf_counter() - tick

    times: dict[str, list[float]] = {"none": [], "in_batch": [], "epoch_end": []}
    shares: dict[str, list[float]] = {"in_batch": [], "epoch_end": []}
    for epoch in range(epochs * 3):
        mode = ("none", "in_batch", "epoch_end")[epoch % 3]
        member._scatter = timed_scatter if mode == "in_batch" else (lambda *a: None)
        own[0] = 0.0
        start = time.perf_counter()
        errors, energy, _ = member._epoch(model, optimizer, ema, loss_fn, 0, epoch)
        tick = time.perf_counter()
        if mode == "epoch_end":
            with ema.average_parameters():
                errors, energy = member.errors(model, member.train_graphs)
        if mode != "none":
            writer.append(errors, epoch=epoch, energy_errors=energy)
        end = time.perf_counter()
        times[mode].append(end - start)
        if mode != "none":
            logging = own[0] + (end - tick)
            shares[mode].append(logging / (end - start - logging))
    base = statistics.median(times["none"])
    return {
        "preset": preset, "train_frames": len(member.train_graphs),
        "atoms": int(np.sum(member.sizes)),
        "seconds_per_epoch": {m: statistics.median(t) for m, t in times.items()},
        "overhead": {m: statistics.median(times[m]) / base - 1 for m in ("in_batch",
                                                                          "epoch_end")},
        "logging_share": {m: statistics.median(v) for m, v in shares.items()},
        "run": str(run.path),
    }


def bench_inference(run_path: str, *, cells: int, repeats: int) -> dict:
    from ase.build import bulk

    from mlipuq.backends import registry
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import fit_methods

    run = RunFolder.open(run_path)
    fitted = fit_methods(run, methods=["ltau", "doptimality"], calibrate=False, save=False)
    backend = registry.load(run, "model_0")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(cells)
    atoms.rattle(0.05, seed=1)
    import numpy as np

    from mlipuq.backends.base import ModelOutputs

    forward, predict = [], {name: [] for name in fitted}
    for _ in range(repeats):
        start = time.perf_counter()
        energies, forces, descriptors = backend.forward_batch([atoms])
        forward.append(time.perf_counter() - start)
        outputs = ModelOutputs(species=np.asarray(atoms.numbers),
                               config_index=np.zeros(len(atoms), dtype=np.int64),
                               descriptors=descriptors, energies=energies, forces=forces)
        for name, estimator in fitted.items():
            start = time.perf_counter()
            estimator.predict(outputs)
            predict[name].append(time.perf_counter() - start)
    base = statistics.median(forward)
    return {"atoms": len(atoms), "forward_seconds": base,
            "uq_seconds": {n: statistics.median(t) for n, t in predict.items()},
            "uq_over_forward": {n: statistics.median(t) / base for n, t in predict.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per mode")
    parser.add_argument("--cells", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny preset, few frames")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.quick:
        args.preset, args.frames, args.epochs, args.repeats = "tiny", 12, 2, 5
    with tempfile.TemporaryDirectory() as tmp:
        training = bench_training(Path(tmp), preset=args.preset, frames=args.frames,
                                  epochs=args.epochs)
        inference = bench_inference(training.pop("run"), cells=args.cells,
                                    repeats=args.repeats)
    print(json.dumps({"training": training, "inference": inference}, indent=2))


if __name__ == "__main__":
    main()
