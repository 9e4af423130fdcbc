"""``mlipuq train``: train an ensemble with error-trajectory logging (NequIP by default).

The backend that trains is looked up in :mod:`mlipuq.backends.registry`
(``--backend``; its optional ``train`` / ``train_reweighted`` class methods), so a
plug-in backend that can train gets this verb unchanged. The options below are
NequIP's; another backend receives them as keyword arguments.
"""

from __future__ import annotations

import argparse

from mlipuq.cli._parser import add_run_option, add_threads_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb."""
    parser = subparsers.add_parser(
        "train",
        help="train NequIP models and log per-atom error trajectories",
        description=(
            "Train M NequIP models (seeds SEED..SEED+M-1, one nequip-train process each) on "
            "an extxyz training set and write a run folder with configs, checkpoints, "
            "packaged models, metrics and the per-epoch force-error trajectories of every "
            "training atom."
        ),
    )
    parser.add_argument(
        "train_file", nargs="?",
        help="extxyz training set with energies and forces (not with --reweight)",
    )
    add_run_option(parser, "run folder to create")
    parser.add_argument(
        "--backend", default="nequip",
        help="model backend that trains; --reweight uses the source run's",
    )
    parser.add_argument(
        "--potential", action="append", default=None, metavar="FILE",
        help="your own trained potential, one per ensemble member (repeat the option; "
        "e.g. pacemaker B-basis .yaml with --backend pace): the run folder is made "
        "from them without training",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--preset", default="small", choices=("tiny", "small", "paper"),
        help="model size (tiny 1x8, small 2x16, paper 3x32 layers x features)",
    )
    size.add_argument("--config", help="your own NequIP YAML instead of a preset")
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="epochs per model (default: 100; with --reweight: the source run's)",
    )
    parser.add_argument(
        "-M", "--models", type=int, default=None,
        help="ensemble size (default: 1; with --reweight: the source run's)",
    )
    parser.add_argument(
        "--seed", type=int, default=None,
        help="first seed; also seeds the train/validation split (default: 0; with "
        "--reweight: the source run's)",
    )
    parser.add_argument(
        "--reweight", choices=("easy", "hard"),
        help="retrain on the training set of --from RUN with LTAU per-atom force-loss "
        "weights: hard = exp(lam (1 - mu + sigma)), easy = exp(lam (mu + sigma)); the "
        "architecture, split and settings come from the source run",
    )
    parser.add_argument(
        "--from", dest="source_run", metavar="RUN",
        help="source run folder (with trajectories) for --reweight",
    )
    parser.add_argument(
        "--lam", type=float, default=None,
        help="re-weighting strength lambda > 0 (default: 4.5 hard, 2.0 easy)",
    )
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="fraction of frames held out for validation",
    )
    split.add_argument(
        "--val-file",
        help="fixed validation set (extxyz with energies and forces); every frame of "
        "train_file is then trained on",
    )
    parser.add_argument(
        "--isolated",
        help="extxyz of isolated atoms with energies (default: least-squares fit per "
        "element)",
    )
    parser.add_argument(
        "--log-mode", default="epoch_end", choices=("epoch_end", "in_batch"),
        help="epoch_end: extra pass over the training set after each epoch; "
        "in_batch: errors of the training forward pass itself",
    )
    parser.add_argument(
        "--weights", default="ema", choices=("ema", "raw"),
        help="weights of the epoch_end pass",
    )
    parser.add_argument("--every-n-epochs", type=int, default=1,
                        help="logging period of the error trajectories, in epochs")
    add_threads_option(parser, "threads per training process")
    parser.add_argument(
        "--processes", type=int, default=None,
        help="training processes per member (Lightning DDP on CPU, gloo; --threads is "
        "shared: threads // N per process; effective batch N x batch size; on --resume "
        "default: as recorded)",
    )
    parser.add_argument("--r-max", type=float, default=5.0, help="cutoff in Å (presets)")
    parser.add_argument(
        "--energy-weight", type=float, default=None,
        help="loss weight of the per-atom energy MSE (presets; default: 1.0; e.g. 0.1 for "
        "a force-dominated loss)",
    )
    parser.add_argument(
        "--force-weight", type=float, default=None,
        help="loss weight of the force-component MSE (presets; default: 1.0)",
    )
    parser.add_argument(
        "--no-package", action="store_true", help="skip nequip-package build (~10 s per model)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    mode.add_argument(
        "--resume", action="store_true",
        help="continue an existing run folder from the members' last.ckpt",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``mlipuq train``."""
    from mlipuq.exceptions import InputError

    if args.reweight is not None or args.source_run is not None or args.lam is not None:
        return _run_reweight(args)
    if args.train_file is None:
        raise InputError("train_file: expected an extxyz training set (or --reweight --from RUN)")
    if args.config is not None and _loss_overrides(args):
        raise InputError(
            f"--energy-weight / --force-weight: presets only; set the loss coeffs in "
            f"{args.config}"
        )
    from mlipuq.backends.registry import capability
    from mlipuq.log import progress_enabled

    if args.potential:
        return _run_import(args)
    train_ensemble = capability(args.backend, "train", "train models")
    folder = train_ensemble(
        args.train_file,
        args.run,
        preset=args.preset,
        config=args.config,
        epochs=100 if args.epochs is None else args.epochs,
        n_models=1 if args.models is None else args.models,
        seed=0 if args.seed is None else args.seed,
        val_fraction=args.val_fraction,
        val_file=args.val_file,
        isolated_energies=args.isolated,
        log_mode=args.log_mode,
        weights=args.weights,
        every_n_epochs=args.every_n_epochs,
        threads=args.threads,
        r_max=args.r_max,
        preset_overrides=_loss_overrides(args),
        package=not args.no_package,
        overwrite=args.overwrite,
        resume=args.resume,
        **({} if args.processes is None else {"processes": args.processes}),
        progress=progress_enabled(),
    )
    print(f"run folder: {folder.path} (models: {', '.join(folder.model_ids)})")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    """``mlipuq train --backend B --potential A [--potential B ...] train_file --run RUN``:
    a run folder of the user's trained models (the backend's optional ``import_models``)."""
    from mlipuq.backends.registry import capability
    from mlipuq.exceptions import InputError
    from mlipuq.log import progress_enabled

    if args.resume or args.config is not None or args.models not in (None, len(args.potential)):
        raise InputError("--potential: one member per file; do not give --resume, --config or "
                         "a different -M/--models")
    import_models = capability(args.backend, "import_models",
                               "use your own potentials (--potential)")
    folder = import_models(
        args.potential, args.train_file, args.run,
        seed=0 if args.seed is None else args.seed,
        val_fraction=args.val_fraction, val_file=args.val_file,
        isolated_energies=args.isolated, overwrite=args.overwrite,
        progress=progress_enabled(),
    )
    print(f"run folder: {folder.path} (models: {', '.join(folder.model_ids)}, from "
          f"{len(args.potential)} potential file(s), not trained)")
    return 0


def _loss_overrides(args: argparse.Namespace) -> dict[str, float]:
    """Preset overrides of ``--energy-weight`` / ``--force-weight`` (only those given)."""
    given = {"energy_weight": args.energy_weight, "force_weight": args.force_weight}
    return {key: value for key, value in given.items() if value is not None}


def _run_reweight(args: argparse.Namespace) -> int:
    """``mlipuq train --reweight {easy,hard} --from RUN --run NEW [--lam L]``."""
    from mlipuq.exceptions import InputError

    if args.reweight is None or args.source_run is None:
        raise InputError("--reweight and --from: both are needed to retrain with loss weights")
    if (args.train_file is not None or args.config is not None or args.resume
            or args.val_file is not None):
        raise InputError(
            "--reweight: the training set, config and split come from --from RUN; "
            "do not give train_file, --config, --val-file or --resume"
        )
    if _loss_overrides(args):
        raise InputError(
            "--reweight: the loss weights come from --from RUN; do not give --energy-weight "
            "or --force-weight"
        )
    if args.lam is not None and not args.lam > 0:
        raise InputError(f"--lam: expected a number > 0, got {args.lam}")
    from mlipuq.backends.registry import capability
    from mlipuq.log import progress_enabled
    from mlipuq.run_folder import RunFolder

    backend = RunFolder.open(args.source_run).backend
    train_reweighted = capability(backend, "train_reweighted",
                                  "retrain with LTAU loss weights")
    folder = train_reweighted(
        args.source_run,
        args.run,
        scheme=args.reweight,
        lam=args.lam,
        epochs=args.epochs,
        n_models=args.models,
        seed=args.seed,
        threads=args.threads,
        every_n_epochs=args.every_n_epochs,
        package=not args.no_package,
        overwrite=args.overwrite,
        progress=progress_enabled(),
    )
    info = folder.meta["reweight"]
    print(
        f"run folder: {folder.path} (models: {', '.join(folder.model_ids)}; {info['scheme']} "
        f"re-weighting, lambda {info['lam']:g}, atol {info['atol']:.4g} eV/Å, weights "
        f"{info['weight_min']:.3g}..{info['weight_max']:.3g})"
    )
    return 0
