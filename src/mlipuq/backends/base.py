"""The small interface every model backend implements.

A backend turns structures into the arrays the estimators consume. Any model can
be used through plain arrays by building a :class:`ModelOutputs` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from ase import Atoms


@dataclass(frozen=True)
class ModelOutputs:
    """One model's predictions for a list of configurations, in atom-table order.

    Attributes
    ----------
    energies : ndarray, shape (C,)
        Total energies in eV.
    forces : ndarray, shape (N, 3)
        Forces in eV/Å.
    descriptors : ndarray of float32, shape (N, D)
        Per-atom invariant latent features (the input of the linear readout for
        NequIP; B-projections for ACE).
    species : ndarray of str, shape (N,)
    config_index : ndarray of int, shape (N,)
    """

    energies: np.ndarray
    forces: np.ndarray
    descriptors: np.ndarray
    species: np.ndarray
    config_index: np.ndarray


class Backend(Protocol):
    """What mlipuq needs from a model: energies, forces and descriptors in one pass."""

    def outputs(self, frames: Sequence[Atoms], *, batch_size: int = 16) -> ModelOutputs:
        """Predict for ``frames`` (atom-table order)."""
        ...
