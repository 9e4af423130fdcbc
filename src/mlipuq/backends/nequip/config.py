"""NequIP training configurations (Hydra YAML) for mlipuq's size presets.

A config written here is an ordinary ``nequip-train`` config: it can be run by hand
with ``nequip-train -cp <dir> -cn <name>``. It trains on an explicit training file and
an explicit validation file (no random split inside NequIP), so the training atoms are
exactly the frames of the training file, in file order.

Presets (all with ``EMALightningModule``, ``EnergyForceLoss``, Adam):

========  ======  ========  =====  ==============  ========
preset    layers  features  l_max  radial width    dtype
========  ======  ========  =====  ==============  ========
tiny      1       8         1      16              float64
small     2       16        1      32              float32
paper     3       32        2      64              float32
========  ======  ========  =====  ==============  ========

Allegro presets (``architecture="allegro"``, ``allegro.model.AllegroModel``; the same
loss, optimiser, batch sizes and EMA; "readout" is the hidden width of the edge-energy
readout MLP, the size D of the Allegro backend's descriptors):

========  ======  =======  =======  =====  =========  =======  ========
preset    layers  scalars  tensors  l_max  MLP width  readout  dtype
========  ======  =======  =======  =====  =========  =======  ========
tiny      1       16       4        1      16         8        float64
small     2       32       8        1      32         16       float32
paper     2       64       16       2      64         32       float32
========  ======  =======  =======  =====  =========  =======  ========
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlipuq.exceptions import InputError

CALLBACK_TARGET = "mlipuq.backends.nequip.callback.ErrorTrajectoryCallback"
PROGRESS_TARGET = "mlipuq.backends.nequip.callback.EpochProgressCallback"

#: Loss weights of every preset: per-atom energy MSE ((eV/atom)^2) and force-component
#: MSE ((eV/Å)^2), NequIP's ``EnergyForceLoss`` coefficients. The same weights combine
#: the validation per-atom energy MAE and force MAE that select ``best.ckpt``.
LOSS_WEIGHTS: dict[str, float] = {"energy_weight": 1.0, "force_weight": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "num_layers": 1, "num_features": 8, "l_max": 1, "radial_mlp_width": 16,
        "model_dtype": "float64", "batch_size": 4, "lr": 0.01, "ema_decay": 0.99, **LOSS_WEIGHTS,
    },
    "small": {
        "num_layers": 2, "num_features": 16, "l_max": 1, "radial_mlp_width": 32,
        "model_dtype": "float32", "batch_size": 5, "lr": 0.01, "ema_decay": 0.99, **LOSS_WEIGHTS,
    },
    "paper": {
        "num_layers": 3, "num_features": 32, "l_max": 2, "radial_mlp_width": 64,
        "model_dtype": "float32", "batch_size": 5, "lr": 0.01, "ema_decay": 0.999, **LOSS_WEIGHTS,
    },
}

_ALLEGRO_COMMON = {"num_bessels": 8, "model_dtype": "float32", "lr": 0.01, **LOSS_WEIGHTS}

#: Allegro size presets (``architecture="allegro"``): same fields as :data:`PRESETS`
#: where they mean the same (batch size, learning rate, EMA, loss weights).
ALLEGRO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_ALLEGRO_COMMON, "num_layers": 1, "num_scalar_features": 16, "num_tensor_features": 4,
        "l_max": 1, "mlp_width": 16, "readout_width": 8, "model_dtype": "float64",
        "batch_size": 4, "ema_decay": 0.99,
    },
    "small": {
        **_ALLEGRO_COMMON, "num_layers": 2, "num_scalar_features": 32, "num_tensor_features": 8,
        "l_max": 1, "mlp_width": 32, "readout_width": 16, "batch_size": 5, "ema_decay": 0.99,
    },
    "paper": {
        **_ALLEGRO_COMMON, "num_layers": 2, "num_scalar_features": 64,
        "num_tensor_features": 16, "l_max": 2, "mlp_width": 64, "readout_width": 32,
        "batch_size": 5, "ema_decay": 0.999,
    },
}

#: Model architecture -> its presets (``preset_config(architecture=...)``).
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "nequip": PRESETS, "allegro": ALLEGRO_PRESETS,
}

#: Top-level sections every ``nequip-train`` config must have.
REQUIRED_SECTIONS = ("run", "data", "trainer", "training_module")


def preset_config(
    preset: str,
    *,
    elements: Sequence[str],
    train_file: str | os.PathLike,
    val_file: str | os.PathLike,
    isolated_energies: Mapping[str, float],
    epochs: int,
    seed: int,
    r_max: float = 5.0,
    overrides: Mapping[str, Any] | None = None,
    architecture: str = "nequip",
) -> dict:
    """The NequIP config (as a plain dict) of one ensemble member for a preset.

    Parameters
    ----------
    preset : {"tiny", "small", "paper"}
    elements : sequence of str
        Chemical symbols of the training set (sorted order is used as type order).
    train_file, val_file : path-like
        Training and validation extxyz files (absolute paths are written).
    isolated_energies : mapping str -> float
        Isolated-atom (reference) energy per element in eV: ``per_type_energy_shifts``.
    epochs : int
        ``trainer.max_epochs``.
    seed : int
        Model initialisation and data-loader seed.
    r_max : float
        Cutoff radius in Å.
    overrides : mapping, optional
        Preset fields to change (keys of :data:`PRESETS` entries), e.g.
        ``{"energy_weight": 0.1}`` for a force-dominated loss.
    architecture : {"nequip", "allegro"}
        ``nequip.model.NequIPGNNModel`` (:data:`PRESETS`) or ``allegro.model.AllegroModel``
        (:data:`ALLEGRO_PRESETS`); everything outside ``training_module.model`` is the same.

    Returns
    -------
    dict
        No callbacks for error logging yet: add them with :func:`add_callbacks`.
    """
    params = preset_params(preset, overrides, architecture)
    elements = sorted(elements)
    missing = [el for el in elements if el not in isolated_energies]
    if missing:
        raise InputError(f"isolated_energies: no energy for element(s) {missing}")
    energy_weight, force_weight = float(params["energy_weight"]), float(params["force_weight"])
    loader = {"_target_": "torch.utils.data.DataLoader", "batch_size": int(params["batch_size"])}
    train_loader = dict(loader, shuffle=True)
    return {
        "run": ["train"],
        "seed": int(seed),
        "cutoff_radius": float(r_max),
        "model_type_names": list(elements),
        "data": {
            "_target_": "nequip.data.datamodule.ASEDataModule",
            "seed": int(seed),
            "train_file_path": str(Path(train_file).resolve()),
            "val_file_path": str(Path(val_file).resolve()),
            "transforms": [
                {
                    "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                    "model_type_names": "${model_type_names}",
                    "chemical_species_to_atom_type_map": (
                        "${list_to_identity_dict:${model_type_names}}"
                    ),
                },
                {
                    "_target_": "nequip.data.transforms.NeighborListTransform",
                    "r_max": "${cutoff_radius}",
                },
            ],
            "train_dataloader": train_loader,
            "val_dataloader": loader,
            "stats_manager": {
                "_target_": "nequip.data.CommonDataStatisticsManager",
                "type_names": "${model_type_names}",
            },
        },
        "trainer": {
            "_target_": "lightning.Trainer",
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": int(epochs),
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "_target_": "lightning.pytorch.loggers.CSVLogger",
                "save_dir": "${hydra:runtime.output_dir}",
                "name": "csv",
                "version": 0,
            },
            "callbacks": [
                {
                    "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "monitor": "val0_epoch/weighted_sum",
                    "dirpath": "${hydra:runtime.output_dir}",
                    "filename": "best",
                    "save_top_k": 1,
                    "save_last": False,
                },
                {
                    "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "dirpath": "${hydra:runtime.output_dir}",
                    "filename": "latest",
                    "save_top_k": 1,
                    "save_last": True,
                },
            ],
        },
        "training_module": {
            "_target_": "nequip.train.EMALightningModule",
            "ema_decay": float(params["ema_decay"]),
            "loss": {
                "_target_": "nequip.train.EnergyForceLoss",
                "per_atom_energy": True,
                "coeffs": {"total_energy": energy_weight, "forces": force_weight},
            },
            "val_metrics": {
                "_target_": "nequip.train.EnergyForceMetrics",
                # per-atom energy (eV/atom) + forces (eV/Å) select "best.ckpt": with the
                # total energy (eV, grows with cell size) an untrained epoch-0 model whose
                # energies happen to be close won "best" for 32-atom cells
                "coeffs": {"per_atom_energy_mae": energy_weight,
                           "forces_mae": force_weight, "total_energy_mae": None},
            },
            "train_metrics": "${training_module.val_metrics}",
            "optimizer": {"_target_": "torch.optim.Adam", "lr": float(params["lr"])},
            "model": _allegro_model(params, seed, elements, isolated_energies)
            if architecture == "allegro" else {
                "_target_": "nequip.model.NequIPGNNModel",
                "seed": int(seed),
                "model_dtype": params["model_dtype"],
                "type_names": "${model_type_names}",
                "r_max": "${cutoff_radius}",
                "l_max": int(params["l_max"]),
                "parity": True,
                "num_layers": int(params["num_layers"]),
                "num_features": int(params["num_features"]),
                "radial_mlp_depth": 1,
                "radial_mlp_width": int(params["radial_mlp_width"]),
                "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
                "per_type_energy_scales": "${training_data_stats:forces_rms}",
                "per_type_energy_shifts": {el: float(isolated_energies[el]) for el in elements},
            },
        },
    }


def _allegro_model(params: Mapping[str, Any], seed: int, elements: Sequence[str],
                   isolated_energies: Mapping[str, float]) -> dict:
    """``training_module.model`` of an Allegro preset (``allegro.model.AllegroModel``)."""
    width = int(params["mlp_width"])
    return {
        "_target_": "allegro.model.AllegroModel",
        "seed": int(seed),
        "model_dtype": params["model_dtype"],
        "type_names": "${model_type_names}",
        "r_max": "${cutoff_radius}",
        "radial_chemical_embed": {
            "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
            "num_bessels": int(params["num_bessels"]),
            "bessel_trainable": False,
            "polynomial_cutoff_p": 6,
        },
        "radial_chemical_embed_dim": int(params["num_scalar_features"]),
        "scalar_embed_mlp_hidden_layers_depth": 1,
        "scalar_embed_mlp_hidden_layers_width": width,
        "scalar_embed_mlp_nonlinearity": "silu",
        "l_max": int(params["l_max"]),
        "parity": True,
        "num_layers": int(params["num_layers"]),
        "num_scalar_features": int(params["num_scalar_features"]),
        "num_tensor_features": int(params["num_tensor_features"]),
        "allegro_mlp_hidden_layers_depth": 1,
        "allegro_mlp_hidden_layers_width": width,
        "allegro_mlp_nonlinearity": "silu",
        "tp_path_channel_coupling": True,
        # one hidden layer: its activations, summed over each atom's edges, are the
        # descriptors of mlipuq.backends.nequip.allegro (the energy is linear in them)
        "readout_mlp_hidden_layers_depth": 1,
        "readout_mlp_hidden_layers_width": int(params["readout_width"]),
        "readout_mlp_nonlinearity": "silu",
        "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
        "per_type_energy_scales": "${training_data_stats:forces_rms}",
        "per_type_energy_shifts": {el: float(isolated_energies[el]) for el in elements},
    }


def preset_params(preset: str, overrides: Mapping[str, Any] | None = None,
                  architecture: str = "nequip") -> dict[str, Any]:
    """A preset's fields (:data:`PRESETS`, or :data:`ALLEGRO_PRESETS` for
    ``architecture="allegro"``) with ``overrides`` applied and checked.

    Raises :class:`~mlipuq.exceptions.InputError` for an unknown architecture, preset or
    field and for loss weights that are negative, not finite or a zero force weight.
    """
    if architecture not in ARCHITECTURES:
        raise InputError(
            f"architecture: expected one of {sorted(ARCHITECTURES)}, got {architecture!r}"
        )
    presets = ARCHITECTURES[architecture]
    if preset not in presets:
        raise InputError(f"preset: expected one of {sorted(presets)}, got {preset!r}")
    params = dict(presets[preset])
    for key, value in (overrides or {}).items():
        if key not in params:
            raise InputError(f"preset override: unknown field {key!r} (known: {sorted(params)})")
        params[key] = value
    _loss_weights(params)
    return params


def _loss_weights(params: Mapping[str, Any]) -> tuple[float, float]:
    """(energy_weight, force_weight) of a preset's fields: finite, energy >= 0, force > 0."""
    weights = []
    for key in ("energy_weight", "force_weight"):
        try:
            value = float(params[key])
        except (TypeError, ValueError):
            raise InputError(f"{key}: expected a number >= 0, got {params[key]!r}") from None
        if not math.isfinite(value) or value < 0.0:
            raise InputError(f"{key}: expected a finite number >= 0, got {params[key]!r}")
        weights.append(value)
    if weights[1] == 0.0:
        raise InputError("force_weight: expected > 0 (mlipuq logs and transfers force errors)")
    return weights[0], weights[1]


def check_nequip_config(config: Any, source: str) -> dict:
    """Raise :class:`InputError` unless ``config`` looks like a ``nequip-train`` config.

    Parameters
    ----------
    config : object
        Parsed YAML.
    source : str
        Name of the file, for messages.
    """
    if not isinstance(config, dict):
        raise InputError(
            f"{source}: not a NequIP config (expected a YAML mapping, got {type(config).__name__})"
        )
    missing = [key for key in REQUIRED_SECTIONS if key not in config]
    if missing:
        raise InputError(
            f"{source}: not a NequIP config (missing top-level section(s) {missing}; "
            f"a nequip-train config has {list(REQUIRED_SECTIONS)})"
        )
    module = config["training_module"]
    if not isinstance(module, dict) or "model" not in module:
        raise InputError(f"{source}: not a NequIP config (training_module has no 'model')")
    trainer = config["trainer"]
    if not isinstance(trainer, dict):
        raise InputError(f"{source}: not a NequIP config ('trainer' is not a mapping)")
    return config


def load_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file, raising :class:`InputError` naming it on failure."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable YAML file ({first})") from None


def write_yaml(path: str | os.PathLike, config: dict) -> Path:
    """Write a config as YAML (atomically) and return its path."""
    import yaml

    from mlipuq.io import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def user_config(
    config: dict,
    *,
    train_file: str | os.PathLike,
    val_file: str | os.PathLike,
    epochs: int | None,
    seed: int,
    source: str,
) -> dict:
    """Adapt a user's NequIP config for one ensemble member.

    Edits the loaded YAML (not Hydra overrides, so the saved ``configs/model_i.yaml``
    is exactly what ran): ``run`` becomes ``[train]``, the data module's training and
    validation files become ours (``data.train_file_path`` / ``data.val_file_path``;
    a ``split_dataset`` is removed), ``seed`` and ``training_module.model.seed`` get
    the member seed, ``trainer.max_epochs`` gets ``epochs`` if given. Everything else
    (model, loss, optimizer, the user's own callbacks) is kept.
    """
    import copy

    config = copy.deepcopy(check_nequip_config(config, source))
    data = config["data"]
    if not isinstance(data, dict) or "ASEDataModule" not in str(data.get("_target_", "")):
        raise InputError(
            f"{source}: data._target_ must be nequip.data.datamodule.ASEDataModule for "
            f"mlipuq train, got {data.get('_target_') if isinstance(data, dict) else data!r}"
        )
    for key in ("split_dataset", "test_file_path", "predict_file_path"):
        data.pop(key, None)
    data["train_file_path"] = str(Path(train_file).resolve())
    data["val_file_path"] = str(Path(val_file).resolve())
    data["seed"] = int(seed)
    config["run"] = ["train"]
    config["seed"] = int(seed)
    model = config["training_module"]["model"]
    if isinstance(model, dict) and "seed" in model:
        model["seed"] = int(seed)
    if epochs is not None:
        config["trainer"]["max_epochs"] = int(epochs)
    return config


def add_callbacks(config: dict, callbacks: Sequence[dict]) -> dict:
    """Append callback specs (``{"_target_": ..., ...}``) to ``trainer.callbacks``.

    Existing mlipuq callbacks (same ``_target_``) are replaced, so calling it twice
    is harmless.
    """
    trainer = config["trainer"]
    existing = list(trainer.get("callbacks") or [])
    targets = {spec["_target_"] for spec in callbacks}
    kept = [
        spec
        for spec in existing
        if not (isinstance(spec, dict) and spec.get("_target_") in targets)
    ]
    trainer["callbacks"] = kept + [dict(spec) for spec in callbacks]
    return config


def error_callback_spec(
    *,
    store_path: str | os.PathLike,
    model_id: str,
    mode: str = "epoch_end",
    weights: str = "ema",
    batch_size: int = 16,
    seed: int | None = None,
    every_n_epochs: int = 1,
    threads: int | None = None,
) -> dict:
    """The ``trainer.callbacks`` entry of :class:`~.callback.ErrorTrajectoryCallback`."""
    return {
        "_target_": CALLBACK_TARGET,
        "store_path": str(Path(store_path).resolve()),
        "model_id": model_id,
        "mode": mode,
        "weights": weights,
        "batch_size": int(batch_size),
        "seed": seed,
        "every_n_epochs": int(every_n_epochs),
        "threads": threads,
    }


def progress_callback_spec(*, label: str) -> dict:
    """The ``trainer.callbacks`` entry of :class:`~.callback.EpochProgressCallback`."""
    return {"_target_": PROGRESS_TARGET, "label": label}


#: ``trainer.strategy`` written by :func:`set_processes` (Lightning's DDP; NequIP's
#: documented choice without train-time compilation).
DDP_STRATEGY = {"_target_": "lightning.pytorch.strategies.DDPStrategy",
                "process_group_backend": "gloo"}


def set_processes(config: dict, processes: int) -> dict:
    """Train on ``processes`` CPU processes (Lightning DDP over gloo), or on one.

    ``processes > 1``: ``trainer`` gets ``accelerator: cpu``, ``devices: processes``,
    ``num_nodes: 1`` and :data:`DDP_STRATEGY`; each rank trains on its
    ``DistributedSampler`` shard, so the effective batch is ``processes`` times the
    loader's ``batch_size``. ``processes == 1``: a strategy set here before is removed
    (``devices: 1``); any other trainer setting (a user's own strategy) is kept.
    """
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise InputError(f"processes: expected a positive integer, got {processes!r}")
    trainer = config["trainer"]
    if processes == 1:
        if trainer.get("strategy") == DDP_STRATEGY:
            del trainer["strategy"]
            trainer["devices"] = 1
        return config
    trainer.update(accelerator="cpu", devices=int(processes), num_nodes=1,
                   strategy=dict(DDP_STRATEGY))
    return config


def config_processes(config: dict) -> int:
    """Number of training processes of a config written by :func:`set_processes` (else 1)."""
    trainer = config.get("trainer") or {}
    if trainer.get("strategy") == DDP_STRATEGY:
        return int(trainer.get("devices", 1))
    return 1
