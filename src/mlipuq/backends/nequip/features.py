"""Energies, forces and latent descriptors of a NequIP model in one forward pass.

The descriptors are NequIP's ``node_features``: the output of the last
message-passing layer, which is the input of the linear per-atom energy readout
(invariant scalars, dimension ``num_features``). They are what LTAU searches
neighbours in and what D-optimality builds its active sets from.

Frames are evaluated in batches; NequIP concatenates the nodes of a batch in input
order, so the rows of every per-atom array follow the atom table (configuration
by configuration, atoms in file order). Forces come from autograd, so the forward
pass runs with gradients enabled; every output is detached right after.

torch and nequip are imported inside the functions, never at module import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    from mlipuq.run_folder import RunFolder

MODEL_SUFFIXES = (".nequip.zip", ".ckpt")
"""File endings of the saved models :func:`load_model` reads (package, checkpoint)."""

PACKAGE_SUFFIX = ".nequip.zip"


# ---------------------------------------------------------------------- run-folder layout
def packaged_path(run: RunFolder, model_id: str) -> Path:
    """``RUN/models/<model_id>.nequip.zip``, the packaged model (may not exist)."""
    return run.models_dir / f"{run.model_dir(model_id).name}{PACKAGE_SUFFIX}"


def checkpoint_path(run: RunFolder, model_id: str, which: str = "best") -> Path:
    """``RUN/models/<model_id>/{best,last}.ckpt`` written by ``nequip-train`` (may not exist)."""
    if which not in ("best", "last"):
        raise InputError(f"which: expected 'best' or 'last', got {which!r}")
    return run.model_dir(model_id) / f"{which}.ckpt"


def run_model_path(run: RunFolder, model_id: str) -> Path:
    """The model of a member: packaged zip if present, else best, else last checkpoint.

    Raises
    ------
    InputError
        None of them exists (the member was not trained).
    """
    for candidate in (
        packaged_path(run, model_id),
        checkpoint_path(run, model_id, "best"),
        checkpoint_path(run, model_id, "last"),
    ):
        if candidate.is_file():
            return candidate
    raise InputError(
        f"{run.model_dir(model_id)}: no trained model for {model_id!r} (no packaged "
        "model, best.ckpt or last.ckpt)"
    )


@contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run the block with ``n_threads`` torch intra-op threads, then restore the old count.

    ``None`` leaves the setting alone. Nothing is changed process-wide beyond the block.
    """
    import torch

    if n_threads is None:
        yield
        return
    if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 1:
        raise InputError(f"threads: expected a positive integer or None, got {n_threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_model_path(model_path: str | os.PathLike) -> Path:
    """Return ``model_path`` as a Path after checking that it is a NequIP saved model."""
    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"model: {path} not found (expected a .nequip.zip package or .ckpt)")
    if not str(path).endswith(MODEL_SUFFIXES):
        raise InputError(
            f"model: {path} is not a NequIP saved model (expected a name ending in "
            f"{' or '.join(MODEL_SUFFIXES)})"
        )
    if path.suffix == ".ckpt":
        read_checkpoint(path)  # refuse foreign pickles and truncated files before NequIP
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``.

    Only tensors and plain containers are unpickled, so a file that is not a checkpoint
    written by training (arbitrary pickled objects) cannot run code; NequIP and
    Lightning checkpoints load this way.

    Raises
    ------
    InputError
        The file holds other objects, or is truncated or corrupt.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: not a plain checkpoint (it holds other pickled objects, refused "
            f"without running them: {str(exc).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: truncated or corrupt checkpoint ({str(exc)[:120]})") from None


def load_model(model_path: str | os.PathLike, *, device: str = "cpu") -> Any:
    """Load a NequIP model (package or checkpoint) in eval mode on ``device``.

    Parameters
    ----------
    model_path : path
        ``.nequip.zip`` (from ``nequip-package build``) or a Lightning ``.ckpt``.
    device : str
        torch device, e.g. ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    nequip.nn.GraphModel
        The model, with ``.metadata`` (``r_max``, ``type_names``, ...).
    """
    path = check_model_path(model_path)
    from nequip.model.saved_models.load_utils import load_saved_model
    from nequip.utils.global_state import set_global_state

    set_global_state()
    try:
        model = load_saved_model(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model: {path} could not be loaded by NequIP ({first_line})") from None
    model.eval()
    return model.to(device)


def type_names(model: Any) -> list[str]:
    """Atom type names of a loaded NequIP model (its metadata), in type order."""
    return str(model.metadata["type_names"]).split(" ")


def model_transforms(metadata: dict, type_map: dict[str, str] | None = None) -> list:
    """NequIP's inference transforms: species -> type mapping and the neighbour list.

    Parameters
    ----------
    metadata : dict
        ``model.metadata`` (needs ``r_max`` and ``type_names``).
    type_map : dict of str -> str, optional
        Chemical symbol -> model type name; identity on the type names by default.
    """
    from nequip.integrations.utils import basic_transforms

    names = str(metadata["type_names"]).split(" ")
    mapping = {name: name for name in names} if type_map is None else dict(type_map)
    return basic_transforms(metadata, float(metadata["r_max"]), names, mapping)


def check_frames(frames: Sequence[Atoms], known_species: Sequence[str]) -> list[Atoms]:
    """Validate the frames once: non-empty list of non-empty Atoms with known elements."""
    if isinstance(frames, Atoms):
        frames = [frames]
    frames = list(frames)
    if not frames:
        raise InputError("frames: expected at least one configuration, got none")
    known = set(known_species)
    for number, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            raise InputError(
                f"frames: configuration {number} is a {type(atoms).__name__}, expected ase.Atoms"
            )
        if len(atoms) == 0:
            raise InputError(f"frames: configuration {number} has no atoms")
        unknown = sorted(set(atoms.get_chemical_symbols()) - known)
        if unknown:
            raise InputError(
                f"frames: configuration {number} has element(s) {unknown} that the model "
                f"does not know (model types: {sorted(known)})"
            )
    return frames


def bare_atoms(atoms: Atoms) -> Atoms:
    """Copy with only numbers, positions, cell and pbc (drops reference labels).

    Reference energies/forces in ``atoms`` would otherwise become data keys that must
    agree across a batch; the model overwrites them anyway.
    """
    return Atoms(
        numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
    )


def _batch(frames: Sequence[Atoms], transforms: list, device: str) -> dict:
    from nequip.data import AtomicDataDict, from_ase

    graphs = []
    for atoms in frames:
        data = from_ase(bare_atoms(atoms))
        for transform in transforms:
            data = transform(data)
        graphs.append(data)
    return AtomicDataDict.to_(AtomicDataDict.batched_from_list(graphs), device)


def forward_batch(model: Any, frames: Sequence[Atoms], transforms: list, *, device: str = "cpu"):
    """One forward pass over ``frames`` batched together.

    Returns
    -------
    energies : ndarray of float64, shape (B,)
        Total energies in eV.
    forces : ndarray of float64, shape (n, 3)
        Forces in eV/Å, rows in frame order.
    descriptors : ndarray of float32, shape (n, D)
        ``node_features``, rows in frame order.
    """
    from nequip.data import AtomicDataDict

    # No torch.no_grad(): NequIP computes forces by autograd w.r.t. positions.
    out = model(_batch(frames, transforms, device))
    n_atoms = sum(len(atoms) for atoms in frames)
    energies = out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().cpu().numpy().reshape(-1)
    forces = out[AtomicDataDict.FORCE_KEY].detach().cpu().numpy()
    features = out[AtomicDataDict.NODE_FEATURES_KEY].detach().cpu().numpy()
    if energies.shape != (len(frames),) or forces.shape[0] != n_atoms:
        raise RuntimeError(
            f"NequIP returned {energies.shape[0]} energies / {forces.shape[0]} force rows "
            f"for {len(frames)} frames of {n_atoms} atoms"
        )
    return (
        energies.astype(np.float64),
        forces.astype(np.float64),
        np.ascontiguousarray(features, dtype=np.float32),
    )


class NequIPBackend:
    """A NequIP model as an mlipuq backend (``"nequip"``): energies, forces, descriptors.

    Implements :class:`mlipuq.backends.base.Backend`; :meth:`from_run` loads a member
    of a run folder written by ``mlipuq train``.

    Parameters
    ----------
    model_path : path
        Packaged model (``.nequip.zip``) or checkpoint (``.ckpt``).
    device : str
        torch device.
    batch_size : int
        Frames per forward pass (per-atom results do not depend on it).
    threads : int or None
        torch threads while evaluating (restored afterwards); None: leave as is.
    type_map : dict of str -> str, optional
        Chemical symbol -> model type name (identity by default).

    Attributes
    ----------
    model_ : nequip GraphModel
        The loaded model (loaded on first use).
    type_names_ : list of str
        Model type names.
    n_features_ : int
        Descriptor size D (``num_features`` of the last layer), known after the first call.

    Examples
    --------
    >>> backend = NequIPBackend("run/models/model_0.nequip.zip")  # doctest: +SKIP
    >>> out = backend.outputs(ase.io.read("test.xyz", ":"))      # doctest: +SKIP
    >>> out.descriptors.shape                                     # doctest: +SKIP
    (N, 32)
    """

    name = "nequip"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        threads: int | None = 1,
        type_map: dict[str, str] | None = None,
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.type_map = type_map

    def _load(self) -> None:
        if getattr(self, "model_", None) is not None:
            return
        with torch_threads(self.threads):
            self.model_ = load_model(self.model_path, device=self.device)
        self.type_names_ = type_names(self.model_)
        self.transforms_ = model_transforms(self.model_.metadata, self.type_map)

    @property
    def known_species(self) -> list[str]:
        """Chemical symbols the model accepts."""
        self._load()
        return list(self.type_map) if self.type_map is not None else list(self.type_names_)

    def outputs(self, frames: Sequence[Atoms], *, batch_size: int | None = None) -> ModelOutputs:
        """Energies, forces and descriptors of ``frames``, in atom-table order.

        Parameters
        ----------
        frames : sequence of ase.Atoms
            Configurations (C of them, N atoms in total).
        batch_size : int, optional
            Frames per forward pass (default ``self.batch_size``).

        Returns
        -------
        ModelOutputs
            energies (C,) eV, forces (N, 3) eV/Å, descriptors (N, D) float32,
            species (N,), config_index (N,).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self._load()
        frames = check_frames(frames, self.known_species)
        energies, forces, features = [], [], []
        with torch_threads(self.threads):
            for start in range(0, len(frames), batch_size):
                e, f, x = forward_batch(
                    self.model_, frames[start:start + batch_size], self.transforms_,
                    device=self.device,
                )
                energies.append(e)
                forces.append(f)
                features.append(x)
        sizes = np.array([len(atoms) for atoms in frames], dtype=np.int64)
        descriptors = np.concatenate(features)
        self.n_features_ = int(descriptors.shape[1])
        return ModelOutputs(
            energies=np.concatenate(energies),
            forces=np.concatenate(forces),
            descriptors=descriptors,
            species=np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str)
                                    for a in frames]),
            config_index=np.repeat(np.arange(len(frames), dtype=np.int64), sizes),
        )


    # ------------------------------------------------------------------ run folders
    @classmethod
    def model_path(cls, run: RunFolder, model_id: str) -> Path:
        """Member ``model_id``'s model: packaged zip, else best, else last checkpoint."""
        return run_model_path(run, model_id)

    @classmethod
    def from_run(
        cls,
        run: RunFolder,
        model_id: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        threads: int | None = 1,
    ) -> NequIPBackend:
        """Member ``model_id`` of ``run``, its model loaded now (see :meth:`model_path`)."""
        backend = cls(cls.model_path(run, model_id), device=device, batch_size=batch_size,
                      threads=threads)
        backend._load()
        return backend

    @classmethod
    def uq_calculator(
        cls,
        run: RunFolder,
        model_id: str,
        *,
        estimators: dict[str, Any] | str | None = "auto",
        device: str = "cpu",
        **kwargs: Any,
    ) -> Any:
        """``from_run`` of :meth:`calculator_class` for member ``model_id``
        (``estimators="auto"``: the run's fitted methods one forward pass can drive)."""
        return cls.calculator_class().from_run(run.path, model_id=model_id,
                                               estimators=estimators, device=device, **kwargs)

    @classmethod
    def calculator_class(cls) -> type:
        """The ASE calculator class of this backend's models
        (:class:`~mlipuq.backends.nequip.calculator.UQCalculator`)."""
        from mlipuq.backends.nequip.calculator import UQCalculator

        return UQCalculator

    @classmethod
    def train(cls, train_file: str | os.PathLike, run_dir: str | os.PathLike,
              **options: Any) -> RunFolder:
        """:func:`~mlipuq.backends.nequip.training.train_ensemble` (``mlipuq train``)."""
        from mlipuq.backends.nequip.training import train_ensemble

        return train_ensemble(train_file, run_dir, **options)

    @classmethod
    def train_reweighted(cls, source_run: str | os.PathLike, run_dir: str | os.PathLike,
                         **options: Any) -> RunFolder:
        """:func:`~mlipuq.backends.nequip.training.train_reweighted` (``--reweight``)."""
        from mlipuq.backends.nequip.training import train_reweighted

        return train_reweighted(source_run, run_dir, **options)


def predict_features(
    model_path: str | os.PathLike,
    frames: Sequence[Atoms],
    *,
    device: str = "cpu",
    batch_size: int = 16,
    threads: int | None = 1,
) -> ModelOutputs:
    """Shortcut: ``NequIPBackend(model_path, ...).outputs(frames)``.

    Returns
    -------
    ModelOutputs
        energies (C,) eV, forces (N, 3) eV/Å, descriptors (N, D) float32 (the model's
        ``node_features``), species (N,), config_index (N,), in atom-table order.
    """
    backend = NequIPBackend(model_path, device=device, batch_size=batch_size, threads=threads)
    return backend.outputs(frames)
