"""MACE models for mlipuq: build from hyper-parameters, save and load safely, features.

A member of a MACE run is two files (never a pickle)::

    models/model_0.json   hyper-parameters (format "mlipuq-mace-model"): what
                          mace.modules.ScaleShiftMACE is built from
    models/model_0.pt     its state_dict, read with torch.load(weights_only=True)

:func:`export_mace_model` writes MACE's own format (a whole pickled module, what
``MACECalculator(model_paths=...)`` and ``mace_run_train --foundation_model`` read) as
an extra file on request.

Descriptors
-----------
The per-atom descriptors are the **invariant (0e) node features of every
interaction/product layer, concatenated over the layers** (D = channels x layers):
MACE's readout of layer ``i`` is applied to layer ``i``'s node features, and an
equivariant linear map to a scalar only sees their 0e part, so these columns are
exactly what the readouts consume (linear readouts of the first layers, the MLP readout
of the last). They come from the same forward pass as energy and forces
(``out["node_feats"]``), and equal ``MACECalculator.get_descriptors(invariants_only=True)``.

Importing :mod:`mace` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the process
environment (every later ``torch.load`` without an explicit ``weights_only`` then
unpickles); :func:`import_mace` restores the variable, so importing this backend leaves
torch's safe default in place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError

MODEL_FORMAT = "mlipuq-mace-model"
MODEL_FORMAT_VERSION = 1
MACE_MISSING = ("mace-torch is not installed: pip install 'mlipuq[mace]' (in its own "
                "virtual environment: it pins e3nn 0.4.4, see docs/mace.md)")
HEAD = "Default"
ENERGY_KEY = "mlipuq_energy"
FORCES_KEY = "mlipuq_forces"
_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def _keep_environment() -> Iterator[None]:
    """Restore ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` afterwards; hide e3nn's and
    TorchScript's import-time warnings (they are about MACE's code, not the user's)."""
    import warnings

    previous = os.environ.get(_ENV)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
            warnings.filterwarnings("ignore", message=".*TorchScript type system")
            warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated")
            yield
    finally:
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous


def import_mace() -> SimpleNamespace:
    """The mace modules this backend uses (``modules``, ``data``, ``tools``,
    ``torch_geometric``, ``MACECalculator``), imported with the environment kept.

    Raises
    ------
    InputError
        mace-torch is not installed (the message says how to install it).
    """
    with _keep_environment():
        try:
            import mace.calculators.mace as calculators
            from mace import data, modules, tools
            from mace.tools import torch_geometric, torch_tools
        except ImportError as error:
            raise InputError(f"{MACE_MISSING} ({error})") from None
    return SimpleNamespace(modules=modules, data=data, tools=tools,
                           torch_geometric=torch_geometric, torch_tools=torch_tools,
                           MACECalculator=calculators.MACECalculator)


def mace_available() -> bool:
    """True when mace-torch imports."""
    try:
        import_mace()
    except InputError:
        return False
    return True


# ---------------------------------------------------------------------- hyper-parameters
def torch_dtype(name: str) -> Any:
    import torch

    if name not in ("float32", "float64"):
        raise InputError(f"dtype: expected 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


def build_model(hyper: dict) -> Any:
    """A ``mace.modules.ScaleShiftMACE`` from the hyper-parameters of a model json.

    Parameters
    ----------
    hyper : dict
        Fields written by :func:`model_hyperparameters`: ``r_max`` (Å),
        ``atomic_numbers``, ``atomic_energies`` (eV, same order), ``num_channels``,
        ``max_L``, ``num_interactions``, ``correlation``, ``max_ell``, ``num_bessel``,
        ``num_polynomial_cutoff``, ``radial_mlp``, ``mlp_irreps``,
        ``avg_num_neighbors``, ``atomic_inter_scale`` (eV), ``atomic_inter_shift`` (eV),
        ``dtype``, ``seed``.

    Returns
    -------
    mace.modules.ScaleShiftMACE
        In the json's dtype, weights initialised from ``seed``.
    """
    import torch

    mace = import_mace()
    try:
        dtype = torch_dtype(hyper["dtype"])
        channels, max_l = int(hyper["num_channels"]), int(hyper["max_L"])
        hidden = " + ".join(f"{channels}x{ell}{'e' if ell % 2 == 0 else 'o'}"
                            for ell in range(max_l + 1))
        from e3nn import o3

        # the initial weights follow the seed; the caller's global RNG state is restored
        with (_keep_environment(), mace.torch_tools.default_dtype(dtype),
              torch.random.fork_rng(devices=[])):
            torch.manual_seed(int(hyper["seed"]))
            model = mace.modules.ScaleShiftMACE(
                r_max=float(hyper["r_max"]),
                num_bessel=int(hyper["num_bessel"]),
                num_polynomial_cutoff=int(hyper["num_polynomial_cutoff"]),
                max_ell=int(hyper["max_ell"]),
                interaction_cls=mace.modules.interaction_classes[
                    "RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=mace.modules.interaction_classes[
                    "RealAgnosticInteractionBlock"],
                num_interactions=int(hyper["num_interactions"]),
                num_elements=len(hyper["atomic_numbers"]),
                hidden_irreps=o3.Irreps(hidden),
                MLP_irreps=o3.Irreps(str(hyper["mlp_irreps"])),
                atomic_energies=np.asarray(hyper["atomic_energies"], dtype=float),
                avg_num_neighbors=float(hyper["avg_num_neighbors"]),
                atomic_numbers=[int(z) for z in hyper["atomic_numbers"]],
                correlation=int(hyper["correlation"]),
                gate=mace.modules.gate_dict["silu"],
                radial_MLP=[int(w) for w in hyper["radial_mlp"]],
                atomic_inter_scale=float(hyper["atomic_inter_scale"]),
                atomic_inter_shift=float(hyper["atomic_inter_shift"]),
                heads=[HEAD],
            )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"MACE model hyper-parameters: invalid or missing field ({error})"
                         ) from None
    return model.to(dtype)


def model_files(stem: Path) -> tuple[Path, Path]:
    """(``stem.json``, ``stem.pt``): hyper-parameters and weights of one model."""
    return stem.with_suffix(".json"), stem.with_suffix(".pt")


def save_model(model: Any, hyper: dict, stem: str | os.PathLike) -> Path:
    """Write ``stem.json`` (hyper-parameters) and ``stem.pt`` (state_dict), each
    atomically; the weights last, so a complete ``.pt`` always has its json."""
    import torch

    from mlipuq.io import atomic_path, write_json

    json_path, weights_path = model_files(Path(stem))
    write_json(json_path, {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                           **hyper})
    with atomic_path(weights_path, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return weights_path


def read_weights(path: str | os.PathLike) -> dict:
    """A file of tensors read with ``torch.load(weights_only=True)`` (InputError if
    it holds anything else or is truncated)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: not a plain weights file (it holds other pickled objects,"
                         f" refused without running them: {str(exc).splitlines()[0][:120]})"
                         ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: truncated or corrupt weights file ({str(exc)[:120]})"
                         ) from None


def load_model(weights_path: str | os.PathLike, *, device: str = "cpu") -> tuple[Any, dict]:
    """The model of ``X.pt`` built from ``X.json``, weights loaded, in eval mode.

    Returns
    -------
    model : mace.modules.ScaleShiftMACE
    hyper : dict
        The json's fields.
    """
    from mlipuq.io import read_header

    weights_path = Path(weights_path)
    json_path, _ = model_files(weights_path)
    if not weights_path.is_file():
        raise InputError(f"model: {weights_path} not found")
    hyper = read_header(json_path, what="MACE model", format_name=MODEL_FORMAT,
                        format_version=MODEL_FORMAT_VERSION)
    model = build_model(hyper)
    try:
        model.load_state_dict(read_weights(weights_path))
    except RuntimeError as exc:
        raise InputError(f"{weights_path}: weights do not fit {json_path.name} "
                         f"({str(exc).splitlines()[0][:160]})") from None
    model.eval()
    return model.to(device), hyper


def export_mace_model(weights_path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write MACE's own model file (``torch.save`` of the whole module) for
    ``MACECalculator(model_paths=target)`` and MACE's command-line tools.

    The file is a pickle: whoever loads it runs code from it. mlipuq never reads it.
    """
    import torch

    from mlipuq.io import atomic_path

    model, _ = load_model(weights_path)
    with atomic_path(Path(target), suffix=".model") as tmp:
        torch.save(model, tmp)
    return Path(target)


# ---------------------------------------------------------------------- features
def invariant_columns(model: Any) -> np.ndarray:
    """Columns of ``out["node_feats"]`` that are invariant (0e), layer after layer.

    ``node_feats`` is the concatenation of every product layer's output (irreps
    ``products[i].linear.irreps_out``); the 0e slices of each, in order, are returned.
    """
    from e3nn import o3

    columns, offset = [], 0
    for product in model.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        for (_mul, ir), part in zip(irreps, irreps.slices(), strict=True):
            if ir.l == 0 and ir.p == 1:
                columns.append(np.arange(part.start, part.stop) + offset)
        offset += irreps.dim
    return np.concatenate(columns).astype(np.int64)


def labelled_copy(atoms: Atoms) -> Atoms:
    """Bare copy of ``atoms`` with its reference energy and forces under mlipuq's keys
    (none when it has no labels)."""
    from mlipuq.io import reference_energy, reference_forces

    copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                 pbc=atoms.pbc)
    energy, forces = reference_energy(atoms), reference_forces(atoms)
    if energy is not None:
        copy.info[ENERGY_KEY] = float(energy)
    if forces is not None:
        copy.arrays[FORCES_KEY] = np.asarray(forces, dtype=float)
    return copy


def atomic_data(frames: Sequence[Atoms], atomic_numbers: Sequence[int], r_max: float,
                dtype: Any) -> list:
    """MACE ``AtomicData`` graphs of ``frames`` (reference labels attached when present)."""
    mace = import_mace()
    keys = mace.data.KeySpecification(info_keys={"energy": ENERGY_KEY},
                                      arrays_keys={"forces": FORCES_KEY})
    table = mace.tools.AtomicNumberTable([int(z) for z in atomic_numbers])
    out = []
    with mace.torch_tools.default_dtype(dtype):
        for atoms in frames:
            config = mace.data.config_from_atoms(labelled_copy(atoms), key_specification=keys,
                                                 head_name=HEAD)
            out.append(mace.data.AtomicData.from_config(config, z_table=table, cutoff=r_max,
                                                        heads=[HEAD]))
    return out


def collate(graphs: Sequence[Any]) -> Any:
    """One ``torch_geometric`` batch of MACE graphs (nodes in the given order)."""
    return import_mace().torch_geometric.Batch.from_data_list(list(graphs))


def forward(model: Any, batch: Any, *, training: bool = False) -> dict:
    """``model(batch)`` with forces (autograd); ``training`` keeps the graph for a loss."""
    return model(batch.to_dict(), training=training, compute_force=True)
