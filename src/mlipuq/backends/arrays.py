"""Predictions of any model, stored as plain arrays: the ``"arrays"`` backend (no torch).

Run the model wherever it lives (MACE, a DFT-trained ACE, a collaborator's code),
keep its energies, forces and per-atom descriptors for every structure mlipuq will
ask about (training, validation and test frames), and hand them over as arrays.
:class:`ArraysBackend` answers :meth:`~ArraysBackend.outputs` by looking each frame
up: a frame is the same structure when its atomic numbers and pbc are equal and its
positions and cell agree within ``atol`` (Å). A frame it was not given is one
:class:`~mlipuq.exceptions.InputError` naming it.

:func:`write_run` makes a run folder of such members, with the error trajectories
LTAU needs, so the whole pipeline (``fit_methods``, ``evaluate_run``, the report,
``mlipuq fit`` / ``evaluate``) runs on it::

    from mlipuq.backends.arrays import ArraysBackend, write_run

    everything = train + val + test                      # lists of ase.Atoms
    members = {
        f"model_{m}": ArraysBackend(everything, energies=E[m], forces=F[m],
                                    descriptors=X[m])
        for m in range(M)
    }
    run = write_run("run", train, val, members,
                    error_trajectories={f"model_{m}": errors[m] for m in range(M)})

Layout of such a run folder (besides ``run.json`` with ``"backend": "arrays"``,
``train.extxyz``, ``val.extxyz`` and ``atom_table.npz``)::

    models/model_0.npz      one member's stored predictions (ArraysBackend.save)
    trajectories/           TrajectoryStore of the training errors per logged epoch
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.training_data import as_frames, check_labelled, create_run

if TYPE_CHECKING:
    from mlipuq.run_folder import RunFolder

FILE_FORMAT = "mlipuq-arrays"
FILE_VERSION = 1
MODEL_SUFFIX = ".npz"
DEFAULT_ATOL = 1e-5
"""Å: positions and cell within this (max over components) are the same structure."""

_FIELDS = ("energies", "forces", "descriptors")
_MODEL_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def _composition_key(numbers: np.ndarray, pbc: np.ndarray) -> bytes:
    return np.asarray(numbers, np.int64).tobytes() + np.asarray(pbc, bool).tobytes()


class ArraysBackend:
    """Stored predictions of some model, looked up by structure (backend ``"arrays"``).

    Implements :class:`mlipuq.backends.base.Backend` with plain numpy: no torch, no
    model code. The predictions are whatever the model gave; mlipuq never checks
    them against the structures.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        The C structures the predictions are for (N atoms in total), in the order of
        the arrays below. Only numbers, positions, cell and pbc are used.
    energies : array_like, shape (C,), optional
        Predicted total energies in eV.
    forces : array_like, shape (N, 3), optional
        Predicted forces in eV/Å, rows configuration by configuration in atom order.
    descriptors : array_like, shape (N, D), optional
        Per-atom descriptors (any invariant features; dtype kept).
    atol : float
        Å; a frame matches a stored structure when their atomic numbers and pbc are
        equal and positions and cell agree within ``atol`` (componentwise).
    source : str
        How the predictions are named in messages (the file they were read from).

    Attributes
    ----------
    n_configs : int
        C.
    elements : list of str
        Chemical symbols of the stored structures (sorted).

    Examples
    --------
    >>> from ase.build import bulk
    >>> frames = [bulk("Cu", cubic=True)]
    >>> backend = ArraysBackend(frames, energies=[-1.0], forces=np.zeros((4, 3)))
    >>> backend.outputs(frames).energies
    array([-1.])
    """

    name = "arrays"

    def __init__(
        self,
        frames: Sequence[Atoms],
        *,
        energies: np.ndarray | None = None,
        forces: np.ndarray | None = None,
        descriptors: np.ndarray | None = None,
        atol: float = DEFAULT_ATOL,
        source: str = "arrays",
    ) -> None:
        frames = as_frames(frames, "frames")
        if not frames:
            raise InputError("frames: expected at least one configuration, got none")
        sizes = np.array([len(atoms) for atoms in frames], dtype=np.int64)
        self._set(
            numbers=np.concatenate([atoms.numbers for atoms in frames]).astype(np.int64),
            positions=np.concatenate([atoms.positions for atoms in frames]).astype(np.float64),
            cells=np.stack([np.asarray(atoms.cell[:], dtype=np.float64) for atoms in frames]),
            pbc=np.stack([np.asarray(atoms.pbc, dtype=bool) for atoms in frames]),
            sizes=sizes,
            arrays={"energies": energies, "forces": forces, "descriptors": descriptors},
            atol=atol,
            source=source,
        )

    def _set(self, *, numbers, positions, cells, pbc, sizes, arrays, atol, source) -> None:
        if isinstance(atol, bool) or not np.isscalar(atol) or not (
                np.isfinite(atol) and atol > 0):
            raise InputError(f"atol: expected a positive distance in Å, got {atol!r}")
        self.atol = float(atol)
        self.source = str(source)
        n_configs, n_atoms = len(sizes), int(sizes.sum())
        self.numbers_, self.positions_, self.cells_, self.pbc_ = numbers, positions, cells, pbc
        self.sizes_ = sizes
        self.offsets_ = np.concatenate([[0], np.cumsum(sizes)])
        expected = {"energies": (n_configs,), "forces": (n_atoms, 3), "descriptors": (n_atoms,)}
        self.arrays_: dict[str, np.ndarray] = {}
        for field, value in arrays.items():
            if value is None:
                continue
            value = np.asarray(value)
            shape = expected[field]
            if value.shape[:len(shape)] != shape or value.ndim != (
                    2 if field != "energies" else 1):
                wanted = {"energies": f"({n_configs},)", "forces": f"({n_atoms}, 3)",
                          "descriptors": f"({n_atoms}, D)"}[field]
                raise InputError(f"{field}: expected shape {wanted} for the {n_configs} "
                                 f"configurations ({n_atoms} atoms), got {value.shape}")
            if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)):
                raise InputError(f"{field}: expected finite numbers ({self.source})")
            dtype = value.dtype if field == "descriptors" else np.float64
            self.arrays_[field] = np.ascontiguousarray(value, dtype=dtype)
        if not self.arrays_:
            raise InputError("predictions: give at least one of energies, forces, descriptors")
        self._index()

    # ------------------------------------------------------------------ lookup
    def _exact_key(self, composition: bytes, positions: np.ndarray, cell: np.ndarray) -> str:
        grid = np.concatenate([positions.ravel(), cell.ravel()]) / self.atol
        digest = hashlib.sha1(composition)
        digest.update(np.round(grid).astype(np.int64).tobytes())
        return digest.hexdigest()

    def _index(self) -> None:
        """Content hash -> configuration, and configurations by composition."""
        self._exact: dict[str, int] = {}
        buckets: dict[bytes, list[int]] = {}
        for config in range(len(self.sizes_)):
            rows = slice(self.offsets_[config], self.offsets_[config + 1])
            composition = _composition_key(self.numbers_[rows], self.pbc_[config])
            key = self._exact_key(composition, self.positions_[rows], self.cells_[config])
            self._exact.setdefault(key, config)
            buckets.setdefault(composition, []).append(config)
        self._buckets = {key: np.array(configs) for key, configs in buckets.items()}
        self._stacks: dict[bytes, np.ndarray] = {}

    def _stack(self, composition: bytes) -> np.ndarray:
        """Positions and cell of a bucket's configurations, (B, n + 3, 3)."""
        if composition not in self._stacks:
            self._stacks[composition] = np.stack([
                np.concatenate([self.positions_[self.offsets_[c]:self.offsets_[c + 1]],
                                self.cells_[c]])
                for c in self._buckets[composition]])
        return self._stacks[composition]

    def find(self, atoms: Atoms) -> int | None:
        """Stored configuration number of ``atoms`` (None when it was not given)."""
        composition = _composition_key(atoms.numbers, atoms.pbc)
        positions = np.asarray(atoms.positions, dtype=np.float64)
        cell = np.asarray(atoms.cell[:], dtype=np.float64)
        hit = self._exact.get(self._exact_key(composition, positions, cell))
        if hit is not None:
            return hit
        if composition not in self._buckets:  # rounding put it across a grid line:
            return None
        query = np.concatenate([positions, cell])  # compare within atol directly
        deviation = np.abs(self._stack(composition) - query).max(axis=(1, 2))
        best = int(np.argmin(deviation))
        return int(self._buckets[composition][best]) if deviation[best] <= self.atol else None

    # ------------------------------------------------------------------ Backend
    @property
    def n_configs(self) -> int:
        """Number of stored configurations C."""
        return len(self.sizes_)

    @property
    def elements(self) -> list[str]:
        """Chemical symbols of the stored structures, sorted."""
        from ase.data import chemical_symbols

        return sorted(chemical_symbols[z] for z in np.unique(self.numbers_))

    @property
    def known_species(self) -> list[str]:
        """Chemical symbols of the stored structures (the model knows at least these)."""
        return self.elements

    def outputs(self, frames: Sequence[Atoms], *, batch_size: int | None = None
                ) -> ModelOutputs:
        """The stored predictions of ``frames``, in atom-table order.

        Parameters
        ----------
        frames : sequence of ase.Atoms
            C' configurations (N' atoms), each one of the stored structures.
        batch_size : int, optional
            Ignored (nothing is computed).

        Returns
        -------
        ModelOutputs
            ``species`` (N',), ``config_index`` (N',) and the stored ``energies`` (C',)
            eV, ``forces`` (N', 3) eV/Å, ``descriptors`` (N', D) (None when not stored).

        Raises
        ------
        InputError
            A frame with an element the predictions have no atom of, or a frame that
            is not one of the stored structures (the message names the first one).
        """
        frames = as_frames(frames, "frames")
        if not frames:
            raise InputError("frames: expected at least one configuration, got none")
        known = set(self.known_species)
        configs = np.empty(len(frames), dtype=np.int64)
        for number, atoms in enumerate(frames):
            unknown = sorted(set(atoms.get_chemical_symbols()) - known)
            if unknown:
                raise InputError(
                    f"frames: configuration {number} has element(s) {unknown} that the "
                    f"stored predictions ({self.source}) have no atom of (they have "
                    f"{self.elements})")
            found = self.find(atoms)
            if found is None:
                raise InputError(
                    f"frames: configuration {number} ({atoms.get_chemical_formula()}, "
                    f"{len(atoms)} atoms) has no stored prediction in {self.source} (the "
                    f"arrays backend answers only for its {self.n_configs} structures, "
                    f"matched within {self.atol:g} Å)")
            configs[number] = found
        rows = np.concatenate([np.arange(self.offsets_[c], self.offsets_[c + 1])
                               for c in configs])
        sizes = self.sizes_[configs]
        stored = {field: (values[configs] if field == "energies" else values[rows])
                  for field, values in self.arrays_.items()}
        return ModelOutputs(
            species=np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str)
                                    for a in frames]),
            config_index=np.repeat(np.arange(len(frames), dtype=np.int64), sizes),
            **stored,
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the structures and predictions to ``path`` (.npz, atomic, no pickle)."""
        from mlipuq.io import save_npz

        path = Path(path)
        save_npz(path, format=np.array(FILE_FORMAT), format_version=np.array(FILE_VERSION),
                 numbers=self.numbers_, positions=self.positions_, cells=self.cells_,
                 pbc=self.pbc_, sizes=self.sizes_, atol=np.array(self.atol), **self.arrays_)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ArraysBackend:
        """Read a file written by :meth:`save`.

        Raises
        ------
        InputError
            Missing or unreadable file, another format, inconsistent arrays.
        """
        from mlipuq.io import load_npz

        data = load_npz(path)
        if str(data.get("format", "")) != FILE_FORMAT:
            raise InputError(f"{path}: not mlipuq stored predictions (no format "
                             f"{FILE_FORMAT!r})")
        if int(data["format_version"]) != FILE_VERSION:
            raise InputError(f"{path}: stored-predictions format_version "
                             f"{int(data['format_version'])} is not supported (this mlipuq "
                             f"reads {FILE_VERSION})")
        missing = [k for k in ("numbers", "positions", "cells", "pbc", "sizes", "atol")
                   if k not in data]
        if missing:
            raise InputError(f"{path}: stored predictions without {missing}")
        sizes = data["sizes"].astype(np.int64)
        if (data["numbers"].shape != (int(sizes.sum()),)
                or data["positions"].shape != (int(sizes.sum()), 3)
                or data["cells"].shape != (len(sizes), 3, 3) or data["pbc"].shape != (
                    len(sizes), 3)):
            raise InputError(f"{path}: structure arrays do not agree with 'sizes'")
        backend = cls.__new__(cls)
        try:
            backend._set(numbers=data["numbers"].astype(np.int64),
                         positions=data["positions"].astype(np.float64),
                         cells=data["cells"].astype(np.float64), pbc=data["pbc"].astype(bool),
                         sizes=sizes, arrays={k: data.get(k) for k in _FIELDS},
                         atol=float(data["atol"]), source=str(path))
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        return backend

    # ------------------------------------------------------------------ run folders
    @classmethod
    def model_path(cls, run: RunFolder, model_id: str) -> Path:
        """``RUN/models/<model_id>.npz``.

        Raises
        ------
        InputError
            The file is missing.
        """
        path = run.models_dir / f"{run.model_dir(model_id).name}{MODEL_SUFFIX}"
        if not path.is_file():
            raise InputError(f"{path}: no stored predictions for {model_id!r}")
        return path

    @classmethod
    def from_run(
        cls,
        run: RunFolder,
        model_id: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        threads: int | None = 1,
    ) -> ArraysBackend:
        """Member ``model_id`` of ``run`` (``device``, ``batch_size``, ``threads`` unused)."""
        return cls.load(cls.model_path(run, model_id))


def write_run(
    path: str | os.PathLike,
    train_frames: Sequence[Atoms],
    val_frames: Sequence[Atoms] | None,
    members: Mapping[str, ArraysBackend],
    *,
    error_trajectories: Mapping[str, np.ndarray] | None = None,
    seeds: Mapping[str, int] | None = None,
    meta: Mapping | None = None,
    overwrite: bool = False,
) -> RunFolder:
    """Write a run folder of stored predictions that every mlipuq step can use.

    Parameters
    ----------
    path : path-like
        The run folder (new or empty; replaced with ``overwrite``).
    train_frames : sequence of ase.Atoms
        The training set with reference energies (eV) and forces (eV/Å); its order is
        the atom-table order (N_train atoms) of ``error_trajectories``.
    val_frames : sequence of ase.Atoms or None
        Labelled validation frames, never trained on (they calibrate LTAU and fit the
        methods' thresholds); None or empty: none.
    members : mapping of str -> ArraysBackend
        Model id (e.g. ``"model_0"``) -> its predictions, covering at least every
        training and validation frame (and later every test frame). Two or more
        members make the ensemble available.
    error_trajectories : mapping of str -> array_like, shape (E, N_train), optional
        Per model id: force-error norms |F_ref - F_pred| in eV/Å of every training
        atom after each of E logged epochs (oldest first): what LTAU is fitted on.
        Without them LTAU cannot be fitted (the other methods can).
    seeds : mapping of str -> int, optional
        Training seed of each member (recorded in ``run.json`` and the store).
    meta : mapping, optional
        More ``run.json`` fields (e.g. ``{"model": "MACE-MP small"}``).
    overwrite : bool
        Replace an existing run folder.

    Returns
    -------
    RunFolder
        With ``backend == "arrays"``.

    Raises
    ------
    InputError
        Unlabelled frames, a bad model id, a member without a prediction for a
        training or validation frame, trajectories of the wrong width or of a model
        that is not a member.
    """
    from mlipuq.trajectory_store import TrajectoryStore

    train = check_labelled(train_frames, "train_frames")
    val = [] if val_frames is None or len(val_frames) == 0 else check_labelled(
        val_frames, "val_frames")
    members = dict(members)
    if not members:
        raise InputError("members: expected at least one model id -> ArraysBackend, got none")
    for model_id, member in members.items():
        if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
            raise InputError(f"members: model id {model_id!r} is not a valid name (letters, "
                             "digits, '._-', not starting with '.' or '-')")
        if not isinstance(member, ArraysBackend):
            raise InputError(f"members[{model_id!r}]: expected an ArraysBackend, got "
                             f"{type(member).__name__}")
        for name, frames in (("train_frames", train), ("val_frames", val)):
            if frames:
                try:
                    member.outputs(frames)
                except InputError as exc:
                    raise InputError(f"members[{model_id!r}] on {name}: {exc}") from None
    trajectories = {}
    n_train = sum(len(atoms) for atoms in train)
    for model_id, errors in (error_trajectories or {}).items():
        if model_id not in members:
            raise InputError(f"error_trajectories: {model_id!r} is not a member (members: "
                             f"{list(members)})")
        errors = np.asarray(errors, dtype=np.float64)
        if errors.ndim != 2 or errors.shape[1] != n_train or len(errors) == 0:
            raise InputError(f"error_trajectories[{model_id!r}]: expected shape (E >= 1, "
                             f"{n_train}) for the training atoms, got {errors.shape}")
        trajectories[model_id] = errors
    seeds = dict(seeds or {})
    if seeds and sorted(seeds) != sorted(members):
        raise InputError(f"seeds: expected one per member {list(members)}, got {list(seeds)}")
    fields = {
        "model_ids": list(members),
        "n_models": len(members),
        "seeds": [int(seeds[m]) for m in members] if seeds else [],
        "epochs": max((len(e) for e in trajectories.values()), default=None),
        "val_fraction": None,
        **dict(meta or {}),
    }
    folder = create_run(path, train, val, backend=ArraysBackend.name, meta=fields,
                        overwrite=overwrite)
    for model_id, member in members.items():
        member.save(folder.models_dir / f"{model_id}{MODEL_SUFFIX}")
    if trajectories:
        store = TrajectoryStore.create(folder.store_path, folder.atom_table)
        for model_id, errors in trajectories.items():
            writer = store.writer(model_id, seed=seeds.get(model_id),
                                  info={"source": "mlipuq.backends.arrays.write_run"})
            for row in errors:
                writer.append(row)
    return folder
