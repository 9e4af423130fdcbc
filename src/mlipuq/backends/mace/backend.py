"""Energies, forces and invariant latent features of a MACE model in one forward pass.

The descriptors are the invariant (0e) node features of every interaction/product
layer, concatenated over the layers (:mod:`mlipuq.backends.mace.model`). Frames are
evaluated in batches; MACE concatenates the nodes of a batch in input order, so every
per-atom array follows the atom table. torch and mace are imported inside the methods.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    from mlipuq.run_folder import RunFolder


class MaceBackend:
    """A MACE model as an mlipuq backend (``"mace"``): energies, forces, descriptors.

    Implements :class:`mlipuq.backends.base.Backend`.

    Parameters
    ----------
    model_path : path
        ``X.pt`` (state_dict) with its ``X.json`` (hyper-parameters) beside it, as
        written by ``mlipuq train --backend mace``.
    device : str
        torch device.
    batch_size : int
        Frames per forward pass (per-atom results do not depend on it).
    threads : int or None
        torch threads while evaluating (restored afterwards); None: leave as is.

    Attributes
    ----------
    model_ : mace.modules.ScaleShiftMACE
        The loaded model (loaded on first use).
    hyper_ : dict
        Its hyper-parameters.
    columns_ : ndarray of int
        Invariant columns of MACE's ``node_feats`` (D of them).
    """

    name = "mace"

    def __init__(self, model_path: str | os.PathLike, *, device: str = "cpu",
                 batch_size: int = 16, threads: int | None = 1) -> None:
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self.threads = threads

    def _load(self) -> None:
        if getattr(self, "model_", None) is not None:
            return
        from mlipuq.backends.nequip.features import torch_threads

        from .model import invariant_columns, load_model

        with torch_threads(self.threads):
            self.model_, self.hyper_ = load_model(self.model_path, device=self.device)
        self.columns_ = invariant_columns(self.model_)

    @property
    def known_species(self) -> list[str]:
        """Chemical symbols the model accepts."""
        from ase.data import chemical_symbols

        self._load()
        return [chemical_symbols[int(z)] for z in self.hyper_["atomic_numbers"]]

    def forward_batch(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
        """One forward pass over ``frames``: energies (B,) eV float64, forces (n, 3)
        eV/Å float64, descriptors (n, D) float32, rows in frame order."""
        from .model import atomic_data, collate, forward, torch_dtype

        self._load()
        batch = collate(atomic_data(frames, self.hyper_["atomic_numbers"],
                                    float(self.hyper_["r_max"]),
                                    torch_dtype(self.hyper_["dtype"]))).to(self.device)
        out = forward(self.model_, batch)
        features = out["node_feats"].detach()[:, self.columns_]
        return (out["energy"].detach().double().cpu().numpy().reshape(-1),
                out["forces"].detach().double().cpu().numpy(),
                np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32))

    def outputs(self, frames: Sequence[Atoms], *, batch_size: int | None = None
                ) -> ModelOutputs:
        """Energies (C,) eV, forces (N, 3) eV/Å and descriptors (N, D) float32 of
        ``frames`` in atom-table order, with ``species`` and ``config_index``."""
        from mlipuq.backends.nequip.features import check_frames, torch_threads

        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        frames = check_frames(frames, self.known_species)
        parts = []
        with torch_threads(self.threads):
            for start in range(0, len(frames), batch_size):
                parts.append(self.forward_batch(frames[start:start + batch_size]))
        sizes = np.array([len(a) for a in frames], dtype=np.int64)
        return ModelOutputs(
            energies=np.concatenate([p[0] for p in parts]),
            forces=np.concatenate([p[1] for p in parts]),
            descriptors=np.concatenate([p[2] for p in parts]),
            species=np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str)
                                    for a in frames]),
            config_index=np.repeat(np.arange(len(frames), dtype=np.int64), sizes),
        )

    # ------------------------------------------------------------------ run folders
    @classmethod
    def model_path(cls, run: RunFolder, model_id: str) -> Path:
        """``RUN/models/<model_id>.pt`` (InputError when the member has not finished)."""
        from .training import weights_path

        path = weights_path(run, model_id)
        if not path.is_file():
            raise InputError(f"{run.path}: no trained MACE model for {model_id!r} "
                             f"({path.relative_to(run.path)} missing)")
        return path

    @classmethod
    def from_run(cls, run: RunFolder, model_id: str, *, device: str = "cpu",
                 batch_size: int = 16, threads: int | None = 1) -> MaceBackend:
        """Member ``model_id`` of ``run``, its model loaded now."""
        backend = cls(cls.model_path(run, model_id), device=device, batch_size=batch_size,
                      threads=threads)
        backend._load()
        return backend

    @classmethod
    def uq_calculator(cls, run: RunFolder, model_id: str, *,
                      estimators: dict[str, Any] | str | None = "auto", device: str = "cpu",
                      **kwargs: Any) -> Any:
        """:meth:`MaceUQCalculator.from_run
        <mlipuq.backends.mace.calculator.MaceUQCalculator.from_run>` for ``model_id``."""
        from .calculator import MaceUQCalculator

        return MaceUQCalculator.from_run(run.path, model_id=model_id, estimators=estimators,
                                         device=device, **kwargs)

    @classmethod
    def train(cls, train_file: str | os.PathLike, run_dir: str | os.PathLike,
              **options: Any) -> RunFolder:
        """:func:`~mlipuq.backends.mace.training.train_ensemble` (``mlipuq train``)."""
        from .training import train_ensemble

        return train_ensemble(train_file, run_dir, **options)
