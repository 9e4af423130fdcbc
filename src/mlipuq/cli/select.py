"""``mlipuq select``: pick uncertain configurations or atomic environments for labelling.

Example::

    mlipuq select --candidates traj.extxyz --uncertainty-key doptimality_uncertainty \\
        --level config --threshold 5 --budget 20 --diversity maxvol \\
        --out selected.extxyz --table why.csv

Per-atom uncertainties are read from the candidates' ``atoms.arrays`` (as written
by ``mlipuq simulate``), or computed with ``--run RUN`` (the run's UQ calculator).
Diversity and de-duplication use per-atom feature rows from ``--features-key`` (an
array in the file) or, by default, the model-free radial descriptor of
:mod:`mlipuq.descriptors`; ``--reference train.xyz`` makes MaxVol pick candidates
that extend the training set's active set.
"""

from __future__ import annotations

import argparse

from mlipuq.cli._parser import add_run_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``select`` sub-command."""
    parser = subparsers.add_parser(
        "select",
        help="select uncertain configurations / environments for DFT labelling",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--candidates", required=True, help="candidate structures (extxyz)")
    parser.add_argument("--uncertainty-key", required=True,
                        help="per-atom array, e.g. doptimality_uncertainty or ltau_uncertainty")
    parser.add_argument("--level", choices=["config", "atom"], default="config",
                        help="select whole configurations or cut-out atomic environments")
    parser.add_argument("--threshold", type=float, default=None,
                        help="select above this uncertainty (default: the threshold the "
                        "estimator fitted on in-domain data, read from the candidates' "
                        "info '<name>_threshold' as 'mlipuq simulate' writes it)")
    parser.add_argument("--budget", type=int, required=True, help="maximum number of picks")
    parser.add_argument("--aggregate", choices=["max", "mean"], default=None,
                        help="per-configuration aggregate of the atoms (config level; "
                        "default: the one the fitted threshold was fitted on, else max)")
    parser.add_argument("--radius", type=float, default=5.0,
                        help="environment cut radius in Å (atom level)")
    parser.add_argument("--diversity", choices=["none", "maxvol", "cluster"], default="maxvol",
                        help="diversity among the picks")
    parser.add_argument("--min-distance", type=float, default=None,
                        help="drop candidates closer than this in feature space")
    parser.add_argument("--features-key", default=None,
                        help="per-atom feature array in the files (default: radial descriptor)")
    parser.add_argument("--reference", default=None,
                        help="current training set (extxyz): MaxVol extends its active set")
    parser.add_argument("--elements", default=None,
                        help="known elements, comma-separated (default: from --reference)")
    parser.add_argument("--cutoff", type=float, default=5.0,
                        help="cutoff of the radial descriptor in Å")
    parser.add_argument("--per-group", default=None, metavar="INFO_KEY",
                        help="share the budget over the groups of this info key, e.g. the "
                             "MD run each frame came from (config level)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the k-means clustering (--diversity cluster)")
    add_run_option(parser, "compute the uncertainties with the calculator of this run "
                   "(run folder written by 'mlipuq train') instead of reading them from "
                   "the candidates", required=False)
    parser.add_argument("--method", action="append", default=None, metavar="DIR",
                        help="a saved UQ method directory to attach besides the run's own "
                        "(repeat the option)")
    parser.add_argument("--model-id", default="model_0", help="member of --run to use")
    parser.add_argument("-o", "--out", required=True,
                        help="selected structures (extxyz) to write")
    parser.add_argument("--table", default=None, help="reasons table (default: <out>.csv)")
    parser.set_defaults(func=run)


def make_calculator(args: argparse.Namespace) -> object:
    """The UQ calculator of ``--run`` (replaceable in tests)."""
    from mlipuq.cli.simulate import uq_calculator

    return uq_calculator(args.run, args.model_id, getattr(args, "method", None))


def _key(name: str) -> str:
    return name if name.endswith("_uncertainty") else f"{name}_uncertainty"


def _atom_uncertainty(frames: list, key: str, args: argparse.Namespace) -> object:
    import numpy as np

    from mlipuq.exceptions import InputError

    if args.run is not None:
        from mlipuq.log import logger, progress_bar

        logger.info(f"computing {key} with member {args.model_id} of {args.run}")
        calculator = make_calculator(args)
        values = []
        with progress_bar(frames, desc=key, unit="config") as bar:
            for number, atoms in enumerate(bar):
                work = atoms.copy()
                work.calc = calculator
                work.get_forces()
                if key not in calculator.results:
                    raise InputError(f"--uncertainty-key: the calculator gives no {key!r} "
                                     f"(configuration {number})")
                values.append(np.asarray(calculator.results[key], dtype=float))
        return np.concatenate(values)
    values = []
    for number, atoms in enumerate(frames):
        if key not in atoms.arrays:
            arrays = sorted(k for k in atoms.arrays if k.endswith("_uncertainty"))
            raise InputError(f"{args.candidates}: configuration {number} has no per-atom "
                             f"{key!r} (uncertainty arrays: {arrays}; or use --run)")
        values.append(np.asarray(atoms.arrays[key], dtype=float).reshape(len(atoms)))
    return np.concatenate(values)


def _features(frames: list, elements: list[str] | None, args: argparse.Namespace) -> object:
    import numpy as np

    from mlipuq.descriptors import descriptor_matrix
    from mlipuq.exceptions import InputError

    if args.features_key is None:
        return descriptor_matrix(frames, elements=elements, cutoff=args.cutoff)[0]
    rows = []
    for number, atoms in enumerate(frames):
        if args.features_key not in atoms.arrays:
            raise InputError(f"--features-key: configuration {number} has no array "
                             f"{args.features_key!r}")
        rows.append(np.asarray(atoms.arrays[args.features_key], dtype=float).reshape(len(atoms),
                                                                                      -1))
    return np.concatenate(rows)


def _group_labels(frames: list, key: str | None, args: argparse.Namespace) -> list | None:
    from mlipuq.exceptions import InputError

    if key is None:
        return None
    if args.level != "config":
        raise InputError("--per-group: only with --level config")
    for number, atoms in enumerate(frames):
        if key not in atoms.info:
            raise InputError(f"{args.candidates}: configuration {number} has no info key "
                             f"{key!r} (--per-group)")
    return [str(atoms.info[key]) for atoms in frames]


def _fitted_threshold(frames: list, key: str, args: argparse.Namespace) -> float:
    """The ``<name>_threshold`` every candidate carries in its info (one value)."""
    from mlipuq.exceptions import InputError

    name = key[: -len("_uncertainty")] if key.endswith("_uncertainty") else key
    info_key = f"{name}_threshold"
    values = {float(atoms.info[info_key]) for atoms in frames if info_key in atoms.info}
    if not values:
        raise InputError(f"--threshold: required: {args.candidates} carries no fitted "
                         f"{info_key!r} (calibrate the estimator, or give a number)")
    if len(values) > 1 or any(info_key not in atoms.info for atoms in frames):
        raise InputError(f"--threshold: required: the configurations of {args.candidates} "
                         f"disagree on {info_key!r} ({sorted(values)})")
    aggregates = {str(atoms.info.get(f"{info_key}_aggregate", "max")) for atoms in frames}
    if len(aggregates) > 1:
        raise InputError(f"--threshold: required: the configurations of {args.candidates} "
                         f"disagree on '{info_key}_aggregate' ({sorted(aggregates)})")
    fitted_on = aggregates.pop()
    if args.aggregate is not None and args.aggregate != fitted_on:
        raise InputError(f"--threshold: required with --aggregate {args.aggregate}: the "
                         f"fitted {info_key} is on the {fitted_on} over the atoms")
    if args.level == "atom" and fitted_on != "max":
        raise InputError(f"--threshold: required with --level atom: the fitted {info_key} is "
                         f"on the {fitted_on} over a configuration's atoms, not on one atom")
    args.aggregate = fitted_on
    return values.pop()


def run(args: argparse.Namespace) -> int:
    """Execute ``mlipuq select``."""
    from pathlib import Path

    import numpy as np

    from mlipuq.atom_table import AtomTable
    from mlipuq.exceptions import InputError
    from mlipuq.io import read_structures
    from mlipuq.selection import (
        check_threshold,
        select_configurations,
        select_environments,
        write_selection,
    )
    from mlipuq.simulation import upper_bound

    key = _key(args.uncertainty_key)
    frames = read_structures(args.candidates)
    given = args.threshold if args.threshold is not None else _fitted_threshold(frames, key, args)
    bound = upper_bound(key)
    threshold = check_threshold(given, upper_bound=bound)
    args.aggregate = args.aggregate or "max"
    reference = read_structures(args.reference) if args.reference else None
    elements = None
    if args.elements:
        elements = [s.strip() for s in args.elements.split(",") if s.strip()]
    elif reference is not None:
        elements = sorted({s for atoms in reference for s in atoms.get_chemical_symbols()})
    if elements is not None:
        for number, atoms in enumerate(frames):
            unknown = sorted(set(atoms.get_chemical_symbols()) - set(elements))
            if unknown:
                raise InputError(f"{args.candidates}: configuration {number} has element(s) "
                                 f"{unknown} not among the known elements {elements}")
    groups = _group_labels(frames, args.per_group, args)
    uncertainty = _atom_uncertainty(frames, key, args)
    diversity = None if args.diversity == "none" else args.diversity
    needs_features = diversity is not None or args.min_distance is not None
    features = _features(frames, elements, args) if needs_features else None
    reference_features = None
    if reference is not None and diversity == "maxvol":
        reference_features = _features(reference, elements, args)
    config_index = AtomTable.from_atoms(frames).config_index
    common = dict(threshold=threshold, budget=args.budget, diversity=diversity,
                  min_distance=args.min_distance, upper_bound=bound, seed=args.seed,
                  features=features, reference_features=reference_features)
    if args.level == "config":
        per_config = np.zeros(len(frames))
        if args.aggregate == "max":
            per_config = np.full(len(frames), -np.inf)
            np.maximum.at(per_config, config_index, uncertainty)
        else:
            np.add.at(per_config, config_index, uncertainty)
            per_config /= np.bincount(config_index, minlength=len(frames))
        selection = select_configurations(
            per_config, config_index=config_index if features is not None else None,
            groups=groups, **common
        )
    else:
        selection = select_environments(frames, uncertainty, config_index,
                                        radius_A=args.radius, **common)
    out = Path(args.out)
    table = Path(args.table) if args.table else out.with_suffix(".csv")
    write_selection(selection, out, frames=frames, table_path=table,
                    source=Path(args.candidates).name)
    n_above = len(selection.table)
    print(f"{n_above} of {len(frames) if args.level == 'config' else len(uncertainty)} "
          f"{'configurations' if args.level == 'config' else 'atoms'} above {threshold:g}; "
          f"selected {selection.n_selected} (budget {args.budget}) -> {out} (reasons {table})")
    return 0
