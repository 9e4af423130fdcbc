"""Active learning on EMT copper: uncertainty-driven selection vs random selection.

Start: NequIP models (``mlipuq train``, ``--models`` seeds) on bulk fcc copper at
300 K. Each round r = 1..R, with the active lineage's current models:

1. **simulate** (default ``--protocol stop``, the pacemaker / MLIP-3 active-learning
   MD): the uncertainty method (default D-optimality) is fitted on the training set;
   the threshold is ``--threshold-factor`` (default 1) x the Tukey fence of the
   training frames' own max-over-atoms uncertainty. ``--md-repeats`` (2) Langevin
   runs from each of four starts -- bulk heated to ``--hot`` K and bulk at 300 K
   (both from a training frame), a (111) slab and a 19-atom octahedron at 300 K
   (one rattle per round, repeats differ in the MD seed, a start that is itself above
   the threshold enters the pool once; ``--no-shared-start``: a rattle per repeat)
   -- each stopped at the first frame above the threshold
   (``mlipuq.simulation.run_simulation(stop_on=..., stop_threshold=...)``); with
   ``--heat-steps m`` the heated run's rule applies from step m on (``min_steps=``),
   so that it is stopped by hot, not by its first warm frames.
   ``--protocol window`` (MLIP-3 select / break): every frame above the threshold
   is a candidate, a run stops above ``--break-factor`` x the threshold.
   ``--protocol rank``: one fixed-length run per start, every frame a candidate.
2. **select** ``B`` configurations: the crossing frames (``--candidates above``:
   every frame above the threshold), budget shared over the MD starts
   (``select_configurations(groups=...)``; ``--pooled``: one budget) with MaxVol
   diversity on the model-free radial descriptor (``--maxvol-reference``: picks that
   extend the MaxVol active set of the current training set, pacemaker's D-optimal
   rule); if fewer than ``B`` qualify, the rest by the same rule among all frames.
   The **random** baseline draws ``B`` frames uniformly from every frame the same
   runs produced (seeded).
3. **label** with EMT and add to the respective training set;
4. **retrain** both from scratch with identical settings (preset, epochs, seeds),
   validated on one fixed set (``--val-split fixed``, default: the ``--val-fraction``
   split of the starting 300 K set, held out once), so that every labelled pick is
   trained on; ``--val-split resplit`` splits every training
   set anew, and a pick that lands in validation is never trained on.

Figures: component force MAE (eV/Å) on the hot-bulk, surface and nanoparticle test
sets (``mlipuq.emt_data.copper_datasets``, never trained on), averaged over the
``--models`` members of each training set, after every round; the ratio active /
random (< 1: active better) per set and for the mean of the three sets.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/active_learning.py --seed 0  # small preset, 60 epochs
    ... --seed 0 --heat-steps 15                 # run D of docs/benchmarks_active_learning.md
    ... --seed 0 --heat-steps 15 --maxvol-reference --pooled --candidates above  # run E
    ... --seed 0 --heat-steps 15 --energy-weight 0.1   # run G (fifth session)
    python benchmarks/active_learning.py --quick          # 1 round, tiny everything
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEST_SETS = ("hot", "surface", "nanoparticle")
BULK_STARTS = ("hot", "bulk300")
STOP_PROTOCOLS = ("stop", "window")  # MD runs end at a threshold crossing


def start_structures(seed: int, in_domain: bool = True):
    """(name, atoms) of the MD starts: three out of domain (bulk heated to ``--hot``,
    a (111) slab, a 19-atom octahedron) and, with ``in_domain``, bulk at the training
    temperature (frames the model already knows: a selection should not spend its
    budget there)."""
    from ase.build import fcc111
    from ase.cluster import Octahedron

    from mlipuq.emt_data import LATTICE_CONSTANT_A, bulk_copper

    rng = np.random.default_rng(seed)
    bulk = bulk_copper(2)
    bulk.positions += rng.normal(scale=0.05, size=bulk.positions.shape)
    slab = fcc111("Cu", size=(2, 2, 4), a=LATTICE_CONSTANT_A, vacuum=6.0, periodic=True)
    particle = Octahedron("Cu", length=3, cutoff=0, latticeconstant=LATTICE_CONSTANT_A)
    particle.center(vacuum=6.0)
    starts = [("hot", bulk), ("surface", slab), ("nanoparticle", particle)]
    if in_domain:
        room = bulk_copper(2)
        room.positions += rng.normal(scale=0.05, size=room.positions.shape)
        starts.append(("bulk300", room))
    return starts


def force_mae(run, frames) -> float:
    """Component force MAE (eV/Å) on ``frames``, averaged over the members of ``run``.

    Averaging over M models trained with different seeds on the same data takes
    the model-seed noise (as large as the active/random effect for one model) out
    of the comparison of two training sets.
    """
    from mlipuq.backends.nequip.features import NequIPBackend
    from mlipuq.io import reference_forces

    reference = np.concatenate([reference_forces(a) for a in frames])
    errors = []
    for model_id in run.model_ids:
        backend = NequIPBackend(run.model_path(model_id), threads=1, batch_size=16)
        errors.append(float(np.mean(np.abs(backend.outputs(frames).forces - reference))))
    return float(np.mean(errors))


def train(frames, directory: Path, args, val_file: Path | None = None):
    """Train ``--models`` members on ``frames`` in ``directory/run``; validation on
    ``val_file`` (``--val-split fixed``) or on a ``--val-fraction`` split of ``frames``."""
    from ase.io import write

    from mlipuq.backends.nequip.training import train_ensemble

    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "train.extxyz"
    write(data, frames, format="extxyz")
    return train_ensemble(
        data, directory / "run", preset=args.preset, epochs=args.epochs, n_models=args.models,
        seed=args.seed, val_fraction=args.val_fraction, val_file=val_file, threads=1,
        r_max=args.r_max, package=False, overwrite=True, progress=False,
        preset_overrides={"energy_weight": args.energy_weight},
    )


def fixed_validation(base: list, workdir: Path, args) -> tuple[list, Path | None]:
    """(frames every round trains on, validation file or None).

    ``--val-split fixed``: the ``--val-fraction`` split of the starting set is held
    out once (``workdir/val.extxyz``), every labelled pick is trained on and every
    training set of both lineages is validated (``best.ckpt``) on the same frames.
    ``--val-split resplit``: each training set is split anew, so a pick can land in
    validation and never be trained on.
    """
    if args.val_split == "resplit":
        return base, None
    from ase.io import write

    from mlipuq.backends.nequip.training import split_train_val

    train_idx, val_idx = split_train_val(len(base), val_fraction=args.val_fraction,
                                         seed=args.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    val_file = workdir / "val.extxyz"
    write(val_file, [base[i] for i in val_idx], format="extxyz")
    return [base[i] for i in train_idx], val_file


def candidate_pool(run, method: str, directory: Path, round_number: int, args):
    """MD with the run's UQ calculator from every start; returns (frames, estimator,
    threshold).

    ``--protocol rank``: one fixed-length MD per start; every frame is a candidate.
    ``--protocol stop`` (pacemaker / MLIP-3 active-learning MD): ``--md-repeats`` MD
    runs per start (other MD seeds and starts: another training frame / rattle), each
    stopped at the first frame whose uncertainty crosses the threshold; that frame is
    marked ``info["crossing"]``.
    ``--protocol window`` (MLIP-3's select / break thresholds, pacemaker's dump / halt):
    every frame above the threshold is marked, and a run stops at the first frame
    above ``--break-factor`` x the threshold. The pool (for the random baseline too)
    is every frame the runs produced.
    """
    from mlipuq.pipeline import fit_methods

    estimator = fit_methods(run, methods=[method], threads=1, save=False)[method]
    threshold = 0.0 if args.no_threshold else (
        args.threshold_factor * training_fence(run, method, estimator))
    stop = args.protocol in STOP_PROTOCOLS
    repeats = args.md_repeats if stop else 1
    pool = []
    starts = start_structures(args.seed + 100 * round_number, in_domain=not args.no_in_domain)
    for number, (name, atoms) in enumerate(starts):
        for repeat in range(repeats):
            shared = args.shared_start and name not in BULK_STARTS
            start_seed = args.seed + 100 * round_number + 10 * number + (0 if shared else repeat)
            start = _stop_protocol_start(name, atoms.copy(), run, start_seed) if stop else \
                atoms.copy()
            frames, log = _md_frames(name, start, run, method, estimator, threshold,
                                     directory / f"md_{name}_{repeat}.extxyz",
                                     args.seed + 10 * round_number + number + 1000 * repeat,
                                     round_number, args)
            if repeat > 0 and shared:  # a shared start is in the pool once
                frames = [f for f in frames if int(f.info["step"]) > 0]
            pool.extend(frames)
            if stop and shared and log is not None and log.stop_step == 0:
                break  # the shared start itself crossed: every repeat would stop there
    return pool, estimator, threshold


def _md_frames(name: str, atoms, run, method: str, estimator, threshold: float,
               log_path: Path, seed: int, round_number: int, args):
    """One MD run with the UQ calculator; (frames of the pool, SimulationLog or None).

    Step 0 (the start) is kept only if it is above the threshold. Frames carry
    ``info["origin"]`` and ``info["crossing"]`` (the crossing frame in the stop
    protocol, every frame above the threshold in the window protocol).
    """
    from mlipuq.backends.nequip.calculator import UQCalculator
    from mlipuq.io import read_structures
    from mlipuq.simulation import run_simulation

    stop = args.protocol in STOP_PROTOCOLS
    calc = UQCalculator.from_run(run.path, estimators={method: estimator}, threads=1)
    atoms.calc = calc
    stop_rule = dict(stop_on=f"{method}_uncertainty", stop_threshold=threshold,
                     min_steps=min(args.heat_steps, args.md_steps) if name == "hot" else 0)
    if args.protocol == "window":
        stop_rule.update(stop_mode="snapshot", break_threshold=args.break_factor * threshold)
    log = None
    try:
        log = run_simulation(
            atoms, calc, kind="md", steps=args.md_steps,
            temperature_K=args.hot if name == "hot" else args.temperature,
            timestep_fs=args.timestep, seed=seed, log_path=log_path,
            **(stop_rule if stop else {}),
        )
    except Exception as exc:  # a model blowing up: keep the frames written so far
        print(f"  round {round_number} {name}: MD stopped ({type(exc).__name__}: {exc})")
    above = set(log.snapshot_steps) if (stop and log is not None) else set()
    frames = [f for f in read_structures(log_path) if int(f.info["step"]) > 0 or 0 in above]
    for frame in frames:
        frame.info["origin"] = name
        frame.info["crossing"] = int(frame.info["step"]) in above
    return frames, log


def _stop_protocol_start(name: str, atoms, run, seed: int):
    """Start of one stopped MD run: bulk runs start from a (seeded) training frame, an
    equilibrated 300 K structure the model knows, so they stop when the dynamics
    leaves the training domain (a perfect lattice is itself out of domain for a model
    trained on thermal frames); the slab and particle get a seeded 0.05 Å rattle."""
    from ase import Atoms

    if name in BULK_STARTS:
        frames = [a for a in run.train_frames() if a.info.get("config_type") == "bulk_300K"]
        frame = frames[int(np.random.default_rng(seed).integers(len(frames)))]
        return Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell,
                     pbc=frame.pbc)
    atoms.rattle(0.05, seed=seed)
    return atoms


def training_fence(run, method: str, estimator) -> float:
    """Tukey fence (Q3 + 1.5 IQR) of the training frames' max-over-atoms uncertainty.

    Candidates above it are more uncertain than the training data themselves: the
    extrapolation threshold, chosen without looking at the candidates (as gamma > 1
    is for D-optimality).
    """
    from mlipuq.atom_table import config_max
    from mlipuq.pipeline import model_outputs
    from mlipuq.thresholds import tukey_fence

    frames = run.train_frames()
    outputs, _ = model_outputs(run, frames, model_ids=["model_0"], threads=1)
    out = outputs["model_0"]
    result = estimator.predict_arrays(out.descriptors, out.species)
    configs = np.repeat(np.arange(len(frames)), [len(a) for a in frames])
    return float(tukey_fence(config_max(np.asarray(result.atom_uncertainty), configs)))


def select_active(
    pool, method: str, budget: int, seed: int, reference=None, per_origin: bool = True,
    threshold: float = 0.0, crossing_only: bool = False,
) -> np.ndarray:
    """Configuration indices by max-over-atoms uncertainty with MaxVol diversity.

    ``reference`` (the current training frames, optional): MaxVol extends the
    training set's active set (greedy D-optimal extension) instead of choosing
    among the candidates alone. ``per_origin``: the budget is shared out over the
    MD runs (``groups=`` of ``select_configurations``), as active-learning MD
    collects the extrapolative frames of every trajectory.
    """
    from mlipuq.descriptors import radial_descriptor
    from mlipuq.selection import select_configurations

    key = f"{method}_uncertainty"
    uncertainty = np.array([float(np.max(a.arrays[key])) for a in pool])
    if crossing_only:  # stop protocol: the frames where an MD run crossed the threshold
        crossing = np.array([bool(a.info.get("crossing", False)) for a in pool])
        uncertainty_first = np.where(crossing, uncertainty, 0.0)
    else:
        uncertainty_first = uncertainty
    features = np.concatenate([radial_descriptor(a, elements=["Cu"]) for a in pool])
    config_index = np.concatenate([np.full(len(a), c) for c, a in enumerate(pool)])
    reference_features = None
    if reference is not None:
        reference_features = np.concatenate(
            [radial_descriptor(a, elements=["Cu"]) for a in reference]
        )
    options = dict(
        budget=budget, features=features, config_index=config_index, diversity="maxvol",
        seed=seed, reference_features=reference_features,
        upper_bound=1.0 if method == "ltau" else None,
        groups=[a.info["origin"] for a in pool] if per_origin else None,
    )
    picked = [int(i) for i in select_configurations(
        uncertainty_first, threshold=threshold, **options).indices]
    if len(picked) < budget:  # fewer candidates above the threshold: the same rule below it
        rest = uncertainty.copy()
        rest[picked] = 0.0  # only values > 0 are candidates
        options["budget"] = budget - len(picked)
        picked += [int(i) for i in select_configurations(rest, threshold=0.0,
                                                         **options).indices]
    return np.asarray(picked, dtype=np.int64)


def labelled_copies(pool, indices, tag: str) -> list:
    from mlipuq.emt_data import labelled

    out = []
    for i in indices:
        atoms = pool[int(i)]
        clean = atoms.__class__(
            numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
        )
        out.append(labelled(clean, f"{tag}_{atoms.info.get('origin', 'md')}"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=6, help="configurations per round B")
    parser.add_argument("--method", default="doptimality", choices=("ltau", "doptimality"))
    parser.add_argument("--train-frames", type=int, default=24)
    parser.add_argument("--test-frames", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--models", type=int, default=3,
                        help="models (seeds) per training set; errors are their mean")
    parser.add_argument("--protocol", choices=("rank", "stop", "window"), default="stop",
                        help="rank: every frame of fixed-length MD is a candidate; stop: MD "
                             "runs stop at the first threshold crossing (pacemaker-style); "
                             "window: every frame above the threshold is a candidate and a "
                             "run stops above --break-factor x threshold (MLIP-3 select/"
                             "break)")
    parser.add_argument("--break-factor", type=float, default=5.0,
                        help="window protocol: break threshold / selection threshold "
                             "(MLIP-3 2 -> 10, pacemaker 5 -> 25)")
    parser.add_argument("--threshold-factor", type=float, default=1.0,
                        help="threshold = this factor x the Tukey fence of the training "
                             "frames: 1 = more uncertain than any typical training frame")
    parser.add_argument("--heat-steps", type=int, default=0,
                        help="the heated bulk run's threshold applies from this MD step on "
                             "(run_simulation(min_steps=...)): time for the 300 K start to "
                             "heat up (15 = 30 fs: run D of the fourth session)")
    parser.add_argument("--md-repeats", type=int, default=2,
                        help="MD runs per start structure (protocol stop)")
    parser.add_argument("--no-threshold", action="store_true",
                        help="rank all candidates (default: only those above the Tukey fence "
                             "of the training frames' uncertainty)")
    parser.add_argument("--no-in-domain", action="store_true",
                        help="no MD at the training temperature in the candidate pool")
    parser.add_argument("--shared-start", action=argparse.BooleanOptionalAction, default=True,
                        help="slab / particle MD repeats start from one rattled structure, "
                             "in the pool once (--no-shared-start: a rattle per repeat)")
    parser.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=False,
                        help="one budget over the whole pool (default: shared out over the "
                             "MD starts, round-robin)")
    parser.add_argument("--candidates", choices=("above", "crossing"), default="crossing",
                        help="stop / window protocols: above = every MD frame above the "
                             "threshold (incl. a heated run's frames before --heat-steps); "
                             "crossing = only the frames at which a run crossed it")
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--r-max", type=float, default=4.5)
    parser.add_argument("--energy-weight", type=float, default=1.0,
                        help="loss weight of the per-atom energy MSE (force weight 1; "
                             "mlipuq train --energy-weight)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument(
        "--val-split", choices=("fixed", "resplit"), default="fixed",
        help="fixed: hold out --val-fraction of the starting set once, train on every "
        "pick (default); resplit: split every training set anew",
    )
    parser.add_argument("--md-steps", type=int, default=30)
    parser.add_argument("--timestep", type=float, default=2.0, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="slab/particle MD, K")
    parser.add_argument("--hot", type=float, default=1200.0, help="hot bulk MD and test, K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--maxvol-reference", action=argparse.BooleanOptionalAction, default=False,
        help="MaxVol extends the current training set's active set (pacemaker's D-optimal "
             "selection; default: MaxVol among the candidates alone)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", help="directory for the runs (default: temporary)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.budget, args.train_frames, args.test_frames = 1, 2, 10, 3
        args.epochs, args.md_steps, args.models, args.preset = 3, 8, 1, "tiny"
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from mlipuq.emt_data import CopperSizes, copper_datasets

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="mlipuq_al_"))
    start = time.perf_counter()
    sizes = CopperSizes(train=args.train_frames, test=args.test_frames, supercell=2,
                        interval=10, equilibration=100)
    data = copper_datasets(seed=args.seed, sizes=sizes, hot_temperature_K=args.hot)
    tests = {"hot": data[f"bulk_{int(args.hot)}K"], "surface": data["surface"],
             "nanoparticle": data["nanoparticle"]}
    base, val_file = fixed_validation(list(data["train"]), workdir, args)
    rng = np.random.default_rng(args.seed + 12345)

    run0 = train(base, workdir / "round0", args, val_file)
    errors0 = {name: force_mae(run0, frames) for name, frames in tests.items()}
    history = [{"round": 0, "n_train": len(base), "active": errors0, "random": errors0,
                "seconds": time.perf_counter() - start}]
    _report_round(history[-1])
    runs = {"active": run0, "random": run0}
    added = {"active": [], "random": []}
    picks = []
    for round_number in range(1, args.rounds + 1):
        directory = workdir / f"round{round_number}"
        directory.mkdir(parents=True, exist_ok=True)
        pool, _, threshold = candidate_pool(runs["active"], args.method, directory,
                                            round_number, args)
        crossing_only = args.protocol != "rank" and args.candidates == "crossing"
        n_above = {}
        for atoms in pool:
            above = float(np.max(atoms.arrays[f"{args.method}_uncertainty"])) > threshold
            if above and (atoms.info["crossing"] or not crossing_only):
                n_above[atoms.info["origin"]] = n_above.get(atoms.info["origin"], 0) + 1
        print(f"round {round_number}: threshold {threshold:.4f}; candidates above it per "
              f"MD start {n_above}", flush=True)
        active_idx = select_active(
            pool, args.method, args.budget, args.seed + round_number,
            reference=base + added["active"] if args.maxvol_reference else None,
            per_origin=not args.pooled, threshold=threshold, crossing_only=crossing_only,
        )
        random_idx = rng.choice(len(pool), size=args.budget, replace=False)
        picks.append({
            "pool": len(pool), "threshold": threshold, "above": n_above,
            "active": [f"{pool[i].info['origin']}@{int(pool[i].info.get('step', -1))}"
                       for i in active_idx],
            "random": [f"{pool[i].info['origin']}@{int(pool[i].info.get('step', -1))}"
                       for i in random_idx],
        })
        added["active"] += labelled_copies(pool, active_idx, f"al{round_number}")
        added["random"] += labelled_copies(pool, random_idx, f"rand{round_number}")
        record = {"round": round_number, "n_train": len(base) + len(added["active"]),
                  "picks": picks[-1]}
        for lineage in ("active", "random"):
            runs[lineage] = train(base + added[lineage], directory / lineage, args, val_file)
            record[lineage] = {name: force_mae(runs[lineage], f) for name, f in tests.items()}
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        _report_round(record)
    _report_table(history, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "history": history},
                                              indent=1))
    return 0


def _report_round(record: dict) -> None:
    picks = record.get("picks")
    if picks:
        print(f"round {record['round']}: pool {picks['pool']} frames; active picked "
              f"{picks['active']}; random picked {picks['random']}")
    print(f"round {record['round']} ({record['n_train']} training frames, "
          f"{record['seconds']:.0f} s): " + "; ".join(
              f"{n} active {record['active'][n]:.4f} random {record['random'][n]:.4f}"
              for n in TEST_SETS), flush=True)


def _report_table(history: list[dict], args) -> None:
    reference = ", MaxVol vs training set" if args.maxvol_reference else ""
    sharing = "one pooled budget" if args.pooled else "budget shared over the MD runs"
    print(f"\nforce MAE (eV/Å) on the test sets, mean of {args.models} models; method "
          f"{args.method}{reference}, {sharing}, budget {args.budget}/round, preset "
          f"{args.preset}, {args.epochs} epochs, energy weight {args.energy_weight:g}, validation "
          f"{args.val_split}, seed {args.seed}")
    print("round  n_train  " + "  ".join(f"{n:>12s} act/rand (ratio)" for n in TEST_SETS)
          + "   mean of the sets act/rand (ratio)")
    for record in history:
        cells = []
        for name in TEST_SETS:
            a, r = record["active"][name], record["random"][name]
            cells.append(f"{a:.4f}/{r:.4f} ({a / r:4.2f})")
        mean_a = np.mean([record["active"][n] for n in TEST_SETS])
        mean_r = np.mean([record["random"][n] for n in TEST_SETS])
        print(f"{record['round']:5d}  {record['n_train']:7d}  " + "  ".join(
            f"{c:>29s}" for c in cells) + f"   {mean_a:.4f}/{mean_r:.4f} ({mean_a / mean_r:4.2f})")
    wins = sum(
        record["active"][n] < record["random"][n] for record in history[1:] for n in TEST_SETS
    )
    print(f"active < random in {wins} of {len(history[1:]) * len(TEST_SETS)} (round, set) cells")


if __name__ == "__main__":
    sys.exit(main())
