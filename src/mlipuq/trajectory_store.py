"""On-disk store of per-atom error trajectories (LTAU step 1), crash-safe and streamable.

Layout of a store directory (format rationale: ``docs/trajectory_store.md``)::

    store/
      store.json                  format, version, atom-table fingerprint, N, C, error kind, units
      atom_table.npz              the AtomTable every per-atom array is indexed by
      models/<model_id>/
        meta.json                 model id, seed, free-form info
        epoch_000012.npy          float32, shape (N,) or (N, 3): errors after epoch 12
        energy_epoch_000012.npy   optional float64, shape (C,): per-configuration energy errors

Every file is written to a temporary file beside its target and renamed into place
(``os.replace``), so a reader sees either a complete epoch file or none. The list of
logged epochs is the list of completed ``epoch_*.npy`` files: there is no mutable
manifest that a crash could corrupt. Temporary files (names starting with ``.``) are
ignored by readers and removed by the next writer of that model.

Windows
-------
A *window* ``(start, size)`` selects epochs by **position** in the sorted list of
logged epochs of one model (not by epoch number): ``start`` is 0-based (negative
counts from the end, as in Python), ``size=None`` means "to the end". ``None`` selects
every logged epoch. A window that reaches past the logged epochs is an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlipuq.atom_table import AtomTable
from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path, read_header, read_json, write_json
from mlipuq.validation import check_array

FORMAT_NAME = "mlipuq.trajectory_store"
FORMAT_VERSION = 1
ERROR_KINDS = ("force_norm", "force_components")
ERROR_UNIT = "eV/Å"
ENERGY_UNIT = "eV"

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.npy$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

Window = tuple[int, int | None]


def window_slice(n_epochs: int, window: Window | None) -> slice:
    """Positions selected by an epoch window, as a slice of the logged-epoch list.

    Parameters
    ----------
    n_epochs : int
        Number of logged epochs E.
    window : (start, size) or None
        ``start`` 0-based position (negative counts from the end), ``size`` number of
        epochs (None: to the end). None selects all epochs.

    Returns
    -------
    slice

    Examples
    --------
    >>> window_slice(10, (2, 3))
    slice(2, 5, None)
    >>> window_slice(10, (-4, None))
    slice(6, 10, None)
    """
    if window is None:
        return slice(0, n_epochs)
    try:
        start, size = window
    except (TypeError, ValueError):
        raise InputError(f"window: expected (start, size), got {window!r}") from None
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool):
        raise InputError(f"window: start must be an integer, got {start!r}")
    first = int(start) + n_epochs if start < 0 else int(start)
    if not 0 <= first < n_epochs:
        raise InputError(f"window: start {start} is outside the {n_epochs} logged epoch(s)")
    if size is None:
        return slice(first, n_epochs)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise InputError(f"window: size must be a positive integer or None, got {size!r}")
    if first + int(size) > n_epochs:
        raise InputError(
            f"window: ({start}, {size}) needs {first + int(size)} logged epochs, "
            f"only {n_epochs} are logged"
        )
    return slice(first, first + int(size))


def check_trajectories(
    errors: np.ndarray | list[np.ndarray], window: Window | None = None
) -> list[np.ndarray]:
    """Validate in-memory error trajectories and apply an epoch window.

    Parameters
    ----------
    errors : ndarray of shape (E, N) or list of them (one per model, E may differ)
        Per-atom force-error norms in eV/Å.
    window : (start, size), optional
        Epoch window applied to each trajectory (see :func:`window_slice`).

    Returns
    -------
    list of ndarray, each (E_m', N)
    """
    arrays = [errors] if isinstance(errors, np.ndarray) else list(errors)
    if not arrays:
        raise InputError("errors: no error trajectories given")
    arrays = [check_array(a, "errors", ndim=2, dtype=None, nonnegative=True) for a in arrays]
    n_atoms = arrays[0].shape[1]
    for array in arrays[1:]:
        if array.shape[1] != n_atoms:
            raise InputError(f"errors: trajectories have {array.shape[1]} and {n_atoms} atoms")
    return [a[window_slice(len(a), window)] for a in arrays]


class TrajectoryStore:
    """A directory holding the per-atom error trajectories of one or more models.

    Use :meth:`create` (new or existing store for an atom table) or :meth:`open`
    (existing store); write with :meth:`writer`, read with :meth:`read`,
    :meth:`iter_epochs` (one epoch at a time) or :meth:`iter_atom_chunks` (all epochs
    of a block of atoms). Errors are float32 in eV/Å.

    Attributes
    ----------
    path : Path
        The store directory.
    atom_table : AtomTable
        Order of the N training atoms.
    n_atoms : int
        N.
    error_kind : str
        ``"force_norm"`` (|F_ref - F_pred|_2 per atom, shape (N,)) or
        ``"force_components"`` (signed F_pred - F_ref per component, shape (N, 3)).

    Examples
    --------
    >>> import tempfile
    >>> table = AtomTable.from_sizes([2, 1], ["H", "H", "O"])
    >>> store = TrajectoryStore.create(tempfile.mkdtemp() + "/s", table)
    >>> writer = store.writer("m0", seed=1)
    >>> writer.append(np.array([0.1, 0.2, 0.3]))
    0
    >>> store.read("m0").shape
    (1, 3)
    """

    def __init__(self, path: Path, atom_table: AtomTable, error_kind: str, meta: dict) -> None:
        self.path = path
        self.atom_table = atom_table
        self.error_kind = error_kind
        self.meta = meta

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        atom_table: AtomTable,
        *,
        error_kind: str = "force_norm",
        exist_ok: bool = True,
    ) -> TrajectoryStore:
        """Create a store for ``atom_table`` (or open it if it exists and matches).

        Raises
        ------
        InputError
            Unknown ``error_kind``; the path exists but is not a store, or is a store
            for another atom table or error kind; it exists and ``exist_ok`` is False.
        """
        from mlipuq import __version__

        if error_kind not in ERROR_KINDS:
            raise InputError(f"error_kind: expected one of {ERROR_KINDS}, got {error_kind!r}")
        path = Path(path)
        if (path / "store.json").exists():
            if not exist_ok:
                raise InputError(f"{path}: a trajectory store already exists there")
            store = cls.open(path)
            if store.meta["atom_table_fingerprint"] != atom_table.fingerprint():
                raise InputError(
                    f"{path}: store was made for atom table {store.meta['atom_table_fingerprint']}"
                    f" ({store.n_atoms} atoms), got atom table {atom_table.fingerprint()}"
                    f" ({atom_table.n_atoms} atoms)"
                )
            if store.error_kind != error_kind:
                raise InputError(
                    f"{path}: store holds {store.error_kind!r} errors, asked for {error_kind!r}"
                )
            return store
        if path.exists() and not _is_empty_or_unfinished_store(path):
            raise InputError(f"{path}: exists and is not an mlipuq trajectory store")
        (path / "models").mkdir(parents=True, exist_ok=True)
        atom_table.save(path / "atom_table.npz")
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "atom_table_fingerprint": atom_table.fingerprint(),
            "n_atoms": atom_table.n_atoms,
            "n_configs": atom_table.n_configs,
            "error_kind": error_kind,
            "units": {"errors": ERROR_UNIT, "energy_errors": ENERGY_UNIT},
            "created_by": f"mlipuq {__version__}",
        }
        write_json(path / "store.json", meta)  # written last: marks the store complete
        return cls(path, atom_table, error_kind, meta)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TrajectoryStore:
        """Open an existing store.

        Raises
        ------
        InputError
            ``path`` is not a (complete, readable) trajectory store of a supported version.
        """
        path = Path(path)
        meta = read_header(
            path / "store.json",
            what="trajectory store",
            format_name=FORMAT_NAME,
            format_version=FORMAT_VERSION,
        )
        if meta.get("error_kind") not in ERROR_KINDS:
            raise InputError(f"{path}: unknown error kind {meta.get('error_kind')!r}")
        table = AtomTable.load(path / "atom_table.npz")
        if table.fingerprint() != meta.get("atom_table_fingerprint"):
            raise InputError(
                f"{path}: atom_table.npz fingerprint {table.fingerprint()} does not match "
                f"store.json ({meta.get('atom_table_fingerprint')})"
            )
        return cls(path, table, meta["error_kind"], meta)

    # ------------------------------------------------------------------ properties
    @property
    def n_atoms(self) -> int:
        """Number of training atoms N."""
        return self.atom_table.n_atoms

    @property
    def error_shape(self) -> tuple[int, ...]:
        """Shape of one epoch of errors: (N,) or (N, 3)."""
        return (self.n_atoms,) if self.error_kind == "force_norm" else (self.n_atoms, 3)

    def __repr__(self) -> str:
        return (
            f"TrajectoryStore({str(self.path)!r}, n_atoms={self.n_atoms}, "
            f"error_kind={self.error_kind!r}, models={self.model_ids()})"
        )

    # ------------------------------------------------------------------ models
    def _model_dir(self, model_id: str) -> Path:
        if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
            raise InputError(
                f"model_id: {model_id!r} is not a valid name (letters, digits, '._-', "
                "not starting with '.' or '-')"
            )
        return self.path / "models" / model_id

    def _existing_model_dir(self, model_id: str) -> Path:
        directory = self._model_dir(model_id)
        if not directory.is_dir():
            raise InputError(
                f"model_id: {model_id!r} is not in the store {self.path} "
                f"(models: {self.model_ids()})"
            )
        return directory

    def writer(
        self, model_id: str, *, seed: int | None = None, info: dict | None = None
    ) -> TrajectoryWriter:
        """Writer appending epochs for ``model_id`` (resumes after its last logged epoch).

        Parameters
        ----------
        model_id : str
            Name of the model (letters, digits, ``._-``).
        seed : int, optional
            Training seed, recorded in ``meta.json``; must match the recorded seed when
            resuming.
        info : dict, optional
            Free-form JSON-serialisable information (hyper-parameters, paths).
        """
        return TrajectoryWriter(self, model_id, seed=seed, info=info)

    def model_ids(self) -> list[str]:
        """Names of the models in the store, sorted."""
        models = self.path / "models"
        if not models.is_dir():
            return []
        return sorted(
            entry.name
            for entry in models.iterdir()
            if entry.is_dir() and _MODEL_ID.match(entry.name)
        )

    def model_meta(self, model_id: str) -> dict:
        """Contents of ``models/<model_id>/meta.json`` (model id, seed, info)."""
        return read_json(self._existing_model_dir(model_id) / "meta.json")

    def epochs(self, model_id: str) -> np.ndarray:
        """Completed epoch numbers of ``model_id``, sorted, int64 array of shape (E,)."""
        directory = self._existing_model_dir(model_id)
        numbers = [
            int(match.group(1))
            for match in map(_EPOCH_FILE.match, os.listdir(directory))
            if match is not None
        ]
        return np.asarray(sorted(numbers), dtype=np.int64)

    def _selected_epochs(self, model_id: str, window: Window | None) -> np.ndarray:
        epochs = self.epochs(model_id)
        if len(epochs) == 0:
            raise InputError(f"model {model_id!r}: no epochs logged in {self.path}")
        return epochs[window_slice(len(epochs), window)]

    def epoch_path(self, model_id: str, epoch: int) -> Path:
        """Path of the force-error file of one epoch."""
        return self._model_dir(model_id) / f"epoch_{int(epoch):06d}.npy"

    def energy_path(self, model_id: str, epoch: int) -> Path:
        """Path of the energy-error file of one epoch."""
        return self._model_dir(model_id) / f"energy_epoch_{int(epoch):06d}.npy"

    # ------------------------------------------------------------------ reading
    def _load(self, path: Path, shape: tuple[int, ...], *, mmap: bool) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npy file ({exc})") from None
        if array.shape != shape:
            raise InputError(f"{path}: has shape {array.shape}, expected {shape}")
        return array

    def _epoch_array(self, model_id: str, epoch: int, *, mmap: bool = False) -> np.ndarray:
        return self._load(self.epoch_path(model_id, epoch), self.error_shape, mmap=mmap)

    @staticmethod
    def _as_norm(values: np.ndarray) -> np.ndarray:
        if values.ndim == 1 or values.shape[-1] != 3:
            return values
        return np.sqrt(np.einsum("...k,...k->...", values, values, dtype=np.float32))

    def _out_shape(self, n_rows: int, norm: bool) -> tuple[int, ...]:
        if self.error_kind == "force_norm" or norm:
            return (n_rows,)
        return (n_rows, 3)

    def read(
        self, model_id: str, *, window: Window | None = None, norm: bool = False
    ) -> np.ndarray:
        """All selected epochs in memory.

        Parameters
        ----------
        model_id : str
        window : (start, size), optional
            Epoch window (see module docstring).
        norm : bool
            For ``force_components`` stores, return per-atom norms (E, N) instead.

        Returns
        -------
        ndarray of float32, shape (E, N) or (E, N, 3)
            Errors in eV/Å, rows in epoch order.
        """
        epochs = self._selected_epochs(model_id, window)
        out = np.empty((len(epochs), *self._out_shape(self.n_atoms, norm)), dtype=np.float32)
        for row, epoch in enumerate(epochs):
            values = self._epoch_array(model_id, epoch)
            out[row] = self._as_norm(values) if norm else values
        return out

    def read_norms(self, model_id: str, *, window: Window | None = None) -> np.ndarray:
        """Force-error norms (E, N) in eV/Å for either error kind."""
        return self.read(model_id, window=window, norm=True)

    def iter_epochs(
        self, model_id: str, *, window: Window | None = None, norm: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(epoch, errors)`` one epoch at a time; memory O(N).

        ``errors`` is float32 of shape (N,) (or (N, 3) for components unless ``norm``).
        """
        for epoch in self._selected_epochs(model_id, window):
            values = self._epoch_array(model_id, epoch)
            yield int(epoch), (self._as_norm(values) if norm else values)

    def read_atoms(
        self,
        model_id: str,
        atoms: slice,
        *,
        window: Window | None = None,
        norm: bool = False,
    ) -> np.ndarray:
        """All selected epochs for a contiguous block of atoms, (E, n) or (E, n, 3).

        Each epoch file is memory-mapped and only the rows of ``atoms`` are copied, so
        memory is O(E x n) whatever N is.
        """
        start, stop, step = atoms.indices(self.n_atoms)
        if step != 1:
            raise InputError(f"atoms: expected a contiguous slice, got step {step}")
        epochs = self._selected_epochs(model_id, window)
        n_rows = max(stop - start, 0)
        out = np.empty((len(epochs), *self._out_shape(n_rows, norm)), dtype=np.float32)
        for row, epoch in enumerate(epochs):
            mapped = self._epoch_array(model_id, epoch, mmap=True)
            block = np.array(mapped[start:stop])
            del mapped  # unmap now: keeps resident memory bounded
            out[row] = self._as_norm(block) if norm else block
        return out

    def iter_atom_chunks(
        self,
        model_id: str,
        *,
        chunk_size: int = 100_000,
        window: Window | None = None,
        norm: bool = False,
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(atoms, errors)`` with ``errors`` of shape (E, n_chunk) per atom block.

        Memory is O(E x chunk_size): use it for per-atom statistics over all epochs of
        stores larger than RAM.
        """
        if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise InputError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
        self._selected_epochs(model_id, window)  # validate before the first chunk
        for start in range(0, self.n_atoms, int(chunk_size)):
            atoms = slice(start, min(start + int(chunk_size), self.n_atoms))
            yield atoms, self.read_atoms(model_id, atoms, window=window, norm=norm)

    def read_energy_errors(self, model_id: str, *, window: Window | None = None) -> np.ndarray:
        """Per-configuration energy errors (E, C) in eV for the selected epochs.

        Raises
        ------
        InputError
            A selected epoch was logged without energy errors.
        """
        epochs = self._selected_epochs(model_id, window)
        n_configs = self.atom_table.n_configs
        out = np.empty((len(epochs), n_configs), dtype=np.float64)
        for row, epoch in enumerate(epochs):
            path = self.energy_path(model_id, epoch)
            if not path.is_file():
                raise InputError(f"model {model_id!r}: epoch {epoch} has no energy errors")
            out[row] = self._load(path, (n_configs,), mmap=False)
        return out

    def final_errors(self, model_id: str, *, norm: bool = False) -> np.ndarray:
        """Errors of the last logged epoch, float32 (N,) (or (N, 3) for components)."""
        epoch = self._selected_epochs(model_id, (-1, None))[0]
        values = self._epoch_array(model_id, epoch)
        return self._as_norm(values) if norm else values


class TrajectoryWriter:
    """Appends epochs of one model to a :class:`TrajectoryStore` (atomic per epoch).

    Only one writer per model at a time: opening a writer removes the temporary
    files a killed writer of the same model left behind.

    Attributes
    ----------
    model_id : str
    next_epoch : int
        Epoch number used by the next :meth:`append` without ``epoch`` (one after the
        last completed epoch, 0 for a new model).
    """

    def __init__(
        self,
        store: TrajectoryStore,
        model_id: str,
        *,
        seed: int | None = None,
        info: dict | None = None,
    ) -> None:
        self.store = store
        self.model_id = model_id
        self.directory = store._model_dir(model_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_meta(seed, info)
        self._clean_temporary_files()
        epochs = store.epochs(model_id)
        self.next_epoch = int(epochs[-1]) + 1 if len(epochs) else 0

    def _write_meta(self, seed: int | None, info: dict | None) -> None:
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise InputError(f"seed: expected an integer or None, got {seed!r}")
        if info is not None and not isinstance(info, dict):
            raise InputError(f"info: expected a dict, got {type(info).__name__}")
        path = self.directory / "meta.json"
        meta = read_json(path) if path.is_file() else {"model_id": self.model_id, "info": {}}
        recorded = meta.get("seed")
        if seed is not None and recorded is not None and int(seed) != int(recorded):
            raise InputError(
                f"seed: model {self.model_id!r} was logged with seed {recorded}, got {seed}"
            )
        if seed is not None:
            meta["seed"] = int(seed)
        meta.setdefault("seed", None)
        if info is not None:
            meta["info"] = info
        write_json(path, meta)

    def _clean_temporary_files(self) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith(".") and entry.is_file():
                entry.unlink(missing_ok=True)

    def append(
        self,
        errors: np.ndarray,
        *,
        epoch: int | None = None,
        energy_errors: np.ndarray | None = None,
    ) -> int:
        """Write one epoch of per-atom errors atomically and return its epoch number.

        Parameters
        ----------
        errors : ndarray, shape (N,) or (N, 3)
            Force-error norms in eV/Å (non-negative) for ``force_norm`` stores, signed
            components (F_pred - F_ref) for ``force_components`` stores. Stored float32.
        epoch : int, optional
            Epoch number (default :attr:`next_epoch`); must be larger than the last
            logged epoch (gaps are allowed, e.g. logging every 5th epoch).
        energy_errors : ndarray, shape (C,), optional
            Per-configuration energy errors in eV (signed or absolute, stored as given).

        Raises
        ------
        InputError
            Wrong shape or atom count, NaN/inf, negative norms, non-increasing epoch.
        """
        store = self.store
        values = self._check_errors(errors)
        energies = None
        if energy_errors is not None:
            energies = check_array(energy_errors, "energy_errors", ndim=1, dtype=np.float64)
            if len(energies) != store.atom_table.n_configs:
                raise InputError(
                    f"energy_errors: has {len(energies)} configurations but the atom table "
                    f"has {store.atom_table.n_configs}"
                )
        number = self.next_epoch if epoch is None else epoch
        if not isinstance(number, (int, np.integer)) or isinstance(number, bool) or number < 0:
            raise InputError(f"epoch: expected a non-negative integer, got {number!r}")
        if int(number) < self.next_epoch:
            raise InputError(
                f"epoch: {number} is not after the last logged epoch {self.next_epoch - 1} "
                f"of model {self.model_id!r}"
            )
        number = int(number)
        if energies is not None:  # written first: the epoch file marks the epoch complete
            _save_npy(store.energy_path(self.model_id, number), energies)
        _save_npy(store.epoch_path(self.model_id, number), values)
        _fsync_directory(self.directory)
        self.next_epoch = number + 1
        return number

    def _check_errors(self, errors: np.ndarray) -> np.ndarray:
        store = self.store
        components = store.error_kind == "force_components"
        values = check_array(
            errors,
            "errors",
            ndim=2 if components else 1,
            dtype=np.float32,
            nonnegative=not components,
        )
        if components and values.shape[1] != 3:
            raise InputError(
                f"errors: expected shape (N, 3) for force components, got {values.shape}"
            )
        store.atom_table.check_length(len(values), "errors")
        return np.ascontiguousarray(values)


def read_epoch_rows(
    path: str | os.PathLike, atoms: slice, shape: tuple[int, ...], *, norm: bool = False
) -> np.ndarray:
    """Rows ``atoms`` of one epoch file, read by memory map: memory O(n), not O(N).

    The per-task reader of :mod:`mlipuq.distributed` (it needs no atom table).

    Parameters
    ----------
    path : path-like
        An ``epoch_*.npy`` file (:meth:`TrajectoryStore.epoch_path`).
    atoms : slice
        Contiguous block of atoms.
    shape : tuple of int
        The file's expected shape (:attr:`TrajectoryStore.error_shape`).
    norm : bool
        Return per-atom norms of component errors (as :meth:`TrajectoryStore.read`).

    Returns
    -------
    ndarray of float32, shape (n,) or (n, 3)
        Errors in eV/Å.
    """
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None
    if mapped.shape != tuple(shape):
        raise InputError(f"{path}: has shape {mapped.shape}, expected {tuple(shape)}")
    block = np.array(mapped[atoms])
    del mapped  # unmap now: keeps resident memory bounded
    return TrajectoryStore._as_norm(block) if norm else block


def _is_empty_or_unfinished_store(path: Path) -> bool:
    """True for an empty directory or one left by a ``create`` killed before store.json."""
    if not path.is_dir():
        return False
    for entry in path.iterdir():
        if entry.name.startswith(".") or entry.name == "atom_table.npz":
            continue
        if entry.name == "models" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return False
    return True


def _save_npy(target: Path, values: np.ndarray) -> None:
    with atomic_path(target, suffix=".tmp") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, values, allow_pickle=False)


def _fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (no-op where unsupported)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
