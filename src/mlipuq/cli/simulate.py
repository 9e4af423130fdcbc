"""``mlipuq simulate``: MD or relaxation with per-step uncertainty logging and a stop rule.

Example::

    mlipuq simulate --run RUN --structure start.xyz --kind md --steps 100 \\
        --temperature 300 --stop-on ltau_uncertainty --out traj.extxyz

Without ``--stop-threshold`` the stop rule uses the threshold the estimator fitted on
in-domain held-out data (``mlipuq fit`` calibrates LTAU on the validation frames).

Writes ``traj.extxyz`` (every frame with its per-atom uncertainty arrays, OVITO-ready),
``traj.csv`` (one row per frame) and ``traj.summary.json`` (initial / final / max /
mean per uncertainty key); in snapshot mode also ``traj_snapshots.extxyz``. Progress
(and a progress bar on a terminal) goes to stderr; the summary table to stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlipuq.cli._parser import add_run_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate",
        help="run MD / a relaxation with a trained model, logging uncertainty every step",
        description=__doc__.split("\n\n")[0],
    )
    add_run_option(parser, "run folder written by 'mlipuq train'")
    parser.add_argument("--method", action="append", default=None, metavar="DIR",
                        help="a saved UQ method directory to attach besides the run's own "
                        "(e.g. D-optimality built from an ACE .asi; repeat the option)")
    parser.add_argument("--model-id", default="model_0", help="ensemble member to run")
    parser.add_argument("--structure", required=True, help="start structure (any ASE format)")
    parser.add_argument("--index", type=int, default=0, help="frame of --structure")
    parser.add_argument("--kind", choices=["md", "relax"], default="md",
                        help="molecular dynamics or a relaxation")
    parser.add_argument("--steps", type=int, default=100, help="MD steps / max relax steps")
    parser.add_argument("--temperature", type=float, default=300.0, help="MD temperature in K")
    parser.add_argument("--timestep", type=float, default=0.5, help="MD time step in fs")
    parser.add_argument("--thermostat", choices=["langevin", "nve"], default="langevin",
                        help="MD thermostat (nve: velocity Verlet)")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    parser.add_argument("--optimizer", choices=["bfgs", "fire"], default="bfgs",
                        help="relaxation optimizer")
    parser.add_argument("--fmax", type=float, default=0.05, help="relax convergence, eV/Å")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MD velocities "
                        "and thermostat")
    parser.add_argument("--stop-on", default=None,
                        help="uncertainty key of the stop rule, e.g. ltau_uncertainty")
    parser.add_argument("--stop-threshold", type=float, default=None,
                        help="threshold of the stop rule (default: the one the estimator "
                        "fitted on in-domain data)")
    parser.add_argument("--stop-mode", choices=["stop", "snapshot"], default="stop",
                        help="stop at the first frame above the threshold, or keep going "
                        "and save those frames")
    parser.add_argument("--break-threshold", type=float, default=None,
                        help="snapshot mode: also stop above this (> --stop-threshold), "
                             "MLIP-3's threshold-break / pacemaker's halt level")
    parser.add_argument("--min-steps", type=int, default=0,
                        help="the stop rule applies from this step on (time for a heated "
                             "run to reach its temperature; FLARE's min_steps_with_model)")
    parser.add_argument("--aggregate", choices=["max", "mean"], default=None,
                        help="per-frame aggregate over atoms for the stop rule and summary "
                        "(default: the one the fitted threshold was fitted on, else max)")
    parser.add_argument("--atoms", default=None,
                        help="comma-separated atom indices to aggregate over (default: all)")
    parser.add_argument("-o", "--out", required=True, help="trajectory extxyz to write")
    parser.add_argument("--table", default=None, help="per-frame CSV (default: <out>.csv)")
    parser.add_argument("--summary", default=None,
                        help="summary JSON (default: <out>.summary.json)")
    parser.set_defaults(func=run)


def make_calculator(args: argparse.Namespace) -> object:
    """The UQ calculator of ``--run`` (replaceable in tests)."""
    from mlipuq.cli.simulate import uq_calculator

    return uq_calculator(args.run, args.model_id, getattr(args, "method", None))


def uq_calculator(run_dir: str, model_id: str, methods: list[str] | str | None = None
                  ) -> object:
    """The calculator of member ``model_id`` with the run's own fitted methods plus the
    saved method directories ``methods`` (each attached under its method name)."""
    from mlipuq.backends.registry import calculator
    from mlipuq.exceptions import InputError
    from mlipuq.method import load_method
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import calculator_methods, method_dir

    run = RunFolder.open(run_dir)
    if not methods:
        return calculator(run, model_id)
    estimators = dict(calculator_methods(run, model_id))
    for directory in [methods] if isinstance(methods, str) else methods:
        method = load_method(directory)
        check_attached(run, method, model_id, directory)
        if method.name in estimators:
            raise InputError(f"--method {directory}: the run has its own {method.name!r} "
                             f"({method_dir(run, method.name)}); attach one or the other")
        estimators[method.name] = method
    return calculator(run, model_id, estimators=estimators)


def check_attached(run: object, method: object, model_id: str, directory: str) -> None:
    """A method saved with provenance must describe this run's ``model_id`` now (one
    without, e.g. D-optimality built from an ACE ``.asi``, is the user's responsibility)."""
    from mlipuq.exceptions import InputError
    from mlipuq.run_methods import provenance_reason

    if not getattr(method, "provenance_", None):
        return
    reason = provenance_reason(run, method, model_id)
    if reason is not None:
        raise InputError(f"--method {directory}: {reason} (this run, member {model_id!r})")


def _check_elements(atoms: object, args: argparse.Namespace) -> None:
    """Elements of the start structure must be the run's (one line, not a model error)."""
    from pathlib import Path

    from mlipuq.exceptions import InputError
    from mlipuq.run_folder import RunFolder

    if not Path(args.run, "run.json").is_file():
        return  # not a run folder: the calculator says so
    known = RunFolder.open(args.run).elements
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(known))
    if unknown:
        raise InputError(f"{args.structure}: element(s) {', '.join(unknown)} not in the run's "
                         f"training set (trained on {', '.join(known)})")


def run(args: argparse.Namespace) -> int:
    """Execute ``mlipuq simulate``."""
    from mlipuq.exceptions import InputError
    from mlipuq.io import read_structures, write_json
    from mlipuq.log import logger
    from mlipuq.simulation import (
        check_break_threshold,
        check_min_steps,
        check_start_structure,
        check_stop_threshold,
        run_simulation,
        summarise,
    )

    if args.steps < 0:
        raise InputError(f"--steps: expected >= 0, got {args.steps}")
    if args.stop_on is not None or args.stop_threshold is not None:
        check_stop_threshold(args.stop_on, args.stop_threshold)
    check_break_threshold(args.stop_on, args.stop_threshold, args.break_threshold,
                          args.stop_mode)
    check_min_steps(args.stop_on, args.min_steps, args.steps)
    frames = read_structures(args.structure)
    if not -len(frames) <= args.index < len(frames):
        raise InputError(f"--index: {args.index} out of range for {len(frames)} frames")
    _check_elements(frames[args.index], args)
    check_start_structure(frames[args.index], name=str(args.structure))
    mask = None
    if args.atoms:
        try:
            mask = [int(x) for x in args.atoms.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--atoms: expected comma-separated integers, got {args.atoms!r}")\
                from None
    out = Path(args.out)
    table = Path(args.table) if args.table else out.with_suffix(".csv")
    summary_path = Path(args.summary) if args.summary else out.with_suffix(".summary.json")
    calculator = make_calculator(args)
    what = (f"{args.steps} MD steps at {args.temperature:g} K" if args.kind == "md"
            else f"a relaxation (at most {args.steps} steps, fmax {args.fmax:g} eV/Å)")
    logger.info(f"running {what} with member {args.model_id} of {args.run}")
    log = run_simulation(
        frames[args.index], calculator, kind=args.kind, steps=args.steps,
        temperature_K=args.temperature, timestep_fs=args.timestep, thermostat=args.thermostat,
        friction_per_fs=args.friction, optimizer=args.optimizer, fmax=args.fmax,
        seed=args.seed, log_path=out, table_path=table, stop_on=args.stop_on,
        stop_threshold=args.stop_threshold, stop_mode=args.stop_mode,
        break_threshold=args.break_threshold, min_steps=args.min_steps,
        aggregate=args.aggregate, atoms_mask=mask,
    )
    summary = summarise(log)
    write_json(summary_path, summary)
    logger.info(f"{log.n_frames} frames simulated")
    print(f"{log.n_frames} frames -> {out} (table {table}, summary {summary_path})")
    if log.stopped:
        level = log.break_threshold if log.break_threshold is not None else log.stop_threshold
        print(f"stopped at step {log.stop_step}: {log.stop_on} ({log.aggregate}) > {level:g}")
    if log.snapshot_steps and args.stop_mode == "snapshot":
        print(f"{len(log.snapshot_steps)} snapshot frame(s) -> {log.snapshot_path}")
    for key, stats in summary["uncertainty"].items():
        print(f"{key} ({log.aggregate}): initial {stats['initial']:.4g}  final "
              f"{stats['final']:.4g}  max {stats['max']:.4g}  mean {stats['mean']:.4g}")
    return 0
