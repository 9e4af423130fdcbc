"""The small interface every model backend implements.

A backend turns structures into the arrays the UQ methods consume
(:class:`ModelOutputs`). Any model can be used through plain arrays by building a
:class:`ModelOutputs` directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    from mlipuq.run_folder import RunFolder


@dataclass(frozen=True, kw_only=True)
class ModelOutputs:
    """One model's predictions for C configurations (N atoms), in atom-table order.

    This is the input ``X`` of every UQ method's ``fit`` and ``predict``
    (:class:`mlipuq.method.UQMethod`): a method reads the fields it needs and raises
    :class:`~mlipuq.exceptions.InputError` naming the missing one otherwise.

    Attributes
    ----------
    species : ndarray of str, shape (N,)
        Chemical symbol of each atom.
    config_index : ndarray of int, shape (N,)
        Configuration of each atom, 0..C-1, non-decreasing.
    descriptors : ndarray of float, shape (N, D), optional
        Per-atom invariant latent features (the input of the linear readout for
        NequIP; B-projections for ACE).
    energies : ndarray, shape (C,), optional
        Total energies in eV.
    forces : ndarray, shape (N, 3), optional
        Forces in eV/Å.
    committee_energies : ndarray, shape (M, C), optional
        Energies (eV) of every member of a committee (the ensemble method).
    committee_forces : ndarray, shape (M, N, 3), optional
        Forces (eV/Å) of every member of a committee.
    """

    species: np.ndarray
    config_index: np.ndarray
    descriptors: np.ndarray | None = None
    energies: np.ndarray | None = None
    forces: np.ndarray | None = None
    committee_energies: np.ndarray | None = None
    committee_forces: np.ndarray | None = None

    @property
    def n_atoms(self) -> int:
        """Number of atoms N."""
        return len(self.species)

    @property
    def n_configs(self) -> int:
        """Number of configurations C."""
        return int(self.config_index[-1]) + 1 if len(self.config_index) else 0

    def require(self, *fields: str, method: str = "this method") -> None:
        """Raise :class:`InputError` naming the first of ``fields`` that is None."""
        for name in fields:
            if getattr(self, name) is None:
                raise InputError(f"{method}: the model outputs have no {name}")

    def with_committee(self, members: Sequence[ModelOutputs]) -> ModelOutputs:
        """A copy carrying every member's energies and forces (for the ensemble).

        Parameters
        ----------
        members : sequence of ModelOutputs
            M >= 1 members' outputs on the same configurations (same atom order).
        """
        for number, other in enumerate(members):
            if other.n_atoms != self.n_atoms or other.forces is None or other.energies is None:
                raise InputError(f"committee member {number}: expected energies and forces "
                                 f"for the same {self.n_atoms} atoms")
        return replace(self, committee_energies=np.stack([m.energies for m in members]),
                       committee_forces=np.stack([m.forces for m in members]))

    def subset(self, configs: np.ndarray) -> ModelOutputs:
        """The outputs of the configurations where ``configs`` (bool, (C,)) is True,
        renumbered 0..C'-1 in their order."""
        configs = np.asarray(configs, dtype=bool)
        atoms, index = kept_atoms(configs, self.config_index)

        def per_atom(a, axis=0):
            return None if a is None else np.take(a, np.flatnonzero(atoms), axis=axis)

        def per_config(a, axis=0):
            return None if a is None else np.take(a, np.flatnonzero(configs), axis=axis)

        return ModelOutputs(
            species=self.species[atoms], config_index=index,
            descriptors=per_atom(self.descriptors), energies=per_config(self.energies),
            forces=per_atom(self.forces),
            committee_energies=per_config(self.committee_energies, axis=1),
            committee_forces=per_atom(self.committee_forces, axis=1),
        )


def kept_atoms(configs: np.ndarray, config_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of the configurations where ``configs`` (bool, (C,)) is True: their mask
    (N,) and their configuration index renumbered 0..C'-1 in order."""
    atoms = configs[config_index]
    return atoms, (np.cumsum(configs) - 1)[config_index[atoms]]


def committee(outputs_by_member: Mapping[str, ModelOutputs], model_id: str) -> ModelOutputs:
    """``model_id``'s outputs carrying the committee of every member in the mapping."""
    if model_id not in outputs_by_member:
        raise InputError(f"model outputs: no outputs of {model_id!r} "
                         f"(have {list(outputs_by_member)})")
    base = outputs_by_member[model_id]
    if len(outputs_by_member) < 2:
        return base
    return base.with_committee(list(outputs_by_member.values()))


@runtime_checkable
class Backend(Protocol):
    """What mlipuq needs from a model backend (registered by :attr:`name`).

    A backend is a class. Its *instances* are one loaded model (one member of a run):
    they predict energies, forces and descriptors of structures in one pass. Its
    *class methods* know where that model lives in a run folder, so nothing else in
    mlipuq does: :class:`~mlipuq.run_folder.RunFolder`, the pipeline and every CLI verb
    find the class with :func:`mlipuq.backends.registry.get` from ``run.json``'s
    ``"backend"`` field and call only what is listed here. Adding a backend is a new
    module plus a registry entry (:func:`mlipuq.backends.registry.register` or an entry
    point in the ``mlipuq.backends`` group).

    Attributes
    ----------
    name : str
        Registry key, also written as ``run.json["backend"]`` (class attribute).
    known_species : list of str
        Chemical symbols the loaded model accepts.

    Methods
    -------
    outputs(frames, *, batch_size=None) -> ModelOutputs
        Predictions for C configurations (N atoms) in atom-table order: ``species``,
        ``config_index`` and whatever the model gives of ``energies`` (C,) eV,
        ``forces`` (N, 3) eV/Å and ``descriptors`` (N, D). ``batch_size`` (frames per
        pass) may be ignored; None means the backend's default.
    from_run(run, model_id, *, device="cpu", batch_size=16, threads=1) -> Backend
        Class method: member ``model_id`` of ``run``, loaded and ready (the model is
        read here, so a later :meth:`outputs` times the predictions only).
    model_path(run, model_id) -> Path
        Class method: the file holding member ``model_id`` of ``run`` (InputError when
        the member has no model yet). Provenance hashes it, so it must change when the
        model does.

    Notes
    -----
    ``isinstance(obj, Backend)`` checks that the members above exist (not their
    signatures). Optional capabilities, looked up with ``getattr`` (absent: not offered, and the
    caller says so in one line):

    - ``uq_calculator(run, model_id, *, estimators="auto", device="cpu", **kwargs)``,
      class method: an ASE calculator of the member with the run's fitted estimators
      attached (:func:`mlipuq.backends.registry.calculator`, ``mlipuq simulate``);
    - ``train(train_file, run_dir, **options) -> RunFolder``, class method: train a run
      folder of this backend (``mlipuq train``, the demo);
    - ``train_reweighted(source_run, run_dir, **options) -> RunFolder``, class method:
      retrain a run with LTAU per-atom loss weights (``mlipuq train --reweight``).
    """

    name: ClassVar[str]

    @property
    def known_species(self) -> list[str]:
        """Chemical symbols the model accepts."""
        ...

    def outputs(self, frames: Sequence[Atoms], *, batch_size: int | None = None
                ) -> ModelOutputs:
        """Predict for ``frames`` (atom-table order)."""
        ...

    @classmethod
    def from_run(cls, run: RunFolder, model_id: str, *, device: str = "cpu",
                 batch_size: int = 16, threads: int | None = 1) -> Backend:
        """Member ``model_id`` of ``run``, loaded."""
        ...

    @classmethod
    def model_path(cls, run: RunFolder, model_id: str) -> Path:
        """The file of member ``model_id`` of ``run``."""
        ...
