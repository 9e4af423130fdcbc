"""The run folder written by ``mlipuq train`` and read by ``mlipuq fit`` and the calculator.

Layout::

    RUN/
      run.json              format "mlipuq-run", format_version, backend, versions,
                            elements, preset or user_config, epochs, n_models, seeds,
                            model_ids, train_file, train_sha256, isolated_energies,
                            threads, log_mode, weights, val_fraction, created,
                            trained_epochs (member -> epochs, set when it finished)
      train.extxyz          the training frames exactly as used (order = atom-table order)
      val.extxyz            the validation frames
      atom_table.npz        AtomTable of train.extxyz
      models/               the members' models, as the backend keeps them
      trajectories/         TrajectoryStore, model ids "model_0", "model_1", ...
      metrics/model_0.csv   per-epoch training/validation metrics (one row per epoch)
      ltau/                 written by ``mlipuq fit``

``backend`` names the model backend (:mod:`mlipuq.backends.registry`); the backend
says which file under ``models/`` holds a member (:meth:`RunFolder.model_path`). For
NequIP (``"nequip"``, also every run written before the field existed, format_version
1)::

      configs/model_0.yaml  the NequIP config of member 0 (one per member)
      models/model_0/       nequip-train output (best.ckpt, last.ckpt, csv/, train.log)
      models/model_0.nequip.zip   packaged model (``nequip-package build``), optional

For stored predictions (``"arrays"``, :mod:`mlipuq.backends.arrays`)::

      models/model_0.npz    predictions of member 0 for the structures it was given

Only this module and the backends know the layout; everything else goes through
:class:`RunFolder`.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from ase import Atoms

from mlipuq.atom_table import AtomTable
from mlipuq.exceptions import InputError
from mlipuq.io import read_header, read_structures, write_json

FORMAT_NAME = "mlipuq-run"
FORMAT_VERSION = 2
"""Written by this mlipuq. 2 added ``"backend"``; version 1 (no field) means NequIP."""
READ_VERSIONS = (1, 2)
RUN_FILE = "run.json"


class RunFolder:
    """A training run of an ensemble of models with their error trajectories.

    Use :meth:`open` for an existing folder (validates ``run.json``) and
    :meth:`create` to start one (``mlipuq train`` does this).

    Attributes
    ----------
    path : Path
    meta : dict
        Contents of ``run.json``.
    """

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta

    # ------------------------------------------------------------------ creation
    @classmethod
    def open(cls, path: str | os.PathLike, *, unfinished: bool = False) -> RunFolder:
        """Open a run folder, checking its format and version.

        A ``run.json`` without ``"backend"`` (written before the field existed) is a
        NequIP run.

        Parameters
        ----------
        path : path-like
        unfinished : bool
            Also open a run whose training has not finished (``train --resume``);
            otherwise such a run is refused (:meth:`check_trained`), so nothing fits
            or predicts with a half-trained model.

        Raises
        ------
        InputError
            No ``run.json``, a foreign file, another ``format_version``, a backend
            that is not registered (the message lists those that are), or a member
            whose training was interrupted (unless ``unfinished``).
        """
        from mlipuq.backends import registry

        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: run folder not found")
        run_file = path / RUN_FILE
        meta = read_header(
            run_file, what="run folder", format_name=FORMAT_NAME, format_version=READ_VERSIONS
        )
        for key in ("model_ids", "elements"):
            if not isinstance(meta.get(key), list):
                raise InputError(f"{run_file}: field {key!r} missing or not a list")
        try:
            registry.check(meta.get("backend", registry.DEFAULT))
        except InputError as exc:
            raise InputError(f"{run_file}: {exc}") from None
        folder = cls(path, meta)
        if not unfinished:
            folder.check_trained()
        return folder

    def unfinished_members(self) -> list[str]:
        """Members whose training has not finished (``run.json["trained_epochs"]``
        below ``epochs``): interrupted, or still training. Runs written before the
        field existed, and runs of backends that do not train, have none."""
        trained = self.meta.get("trained_epochs")
        if not isinstance(trained, dict):
            return []
        epochs = int(self.meta.get("epochs") or 0)
        return [m for m in self.model_ids if int(trained.get(m) or 0) < max(epochs, 1)]

    def check_trained(self) -> None:
        """InputError naming the members whose training did not finish, and how to
        continue it."""
        missing = self.unfinished_members()
        if missing:
            raise InputError(
                f"{self.path}: training of {', '.join(missing)} did not finish (interrupted, "
                "or still running); continue it with 'mlipuq train ... --resume' (same "
                "training file and options), or start again with --overwrite"
            )

    @classmethod
    def create(
        cls, path: str | os.PathLike, meta: dict, *, overwrite: bool = False
    ) -> RunFolder:
        """Start a run folder: check it is empty (or ``overwrite``), write ``run.json``.

        ``meta["backend"]`` names the backend (default ``"nequip"``).

        Raises
        ------
        InputError
            ``path`` is a non-empty directory (or a file) and ``overwrite`` is False;
            an unknown backend.
        """
        import shutil

        from mlipuq.backends import registry

        backend = registry.check(meta.get("backend", registry.DEFAULT))
        path = Path(path)
        if cls.check_target(path, overwrite=overwrite):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta,
                "backend": backend}
        folder = cls(path, meta)
        folder.save_meta()
        return folder

    @staticmethod
    def check_target(path: str | os.PathLike, *, overwrite: bool = False) -> bool:
        """Check that a run folder may be created at ``path``; True when a run folder
        is there to be replaced (``overwrite``).

        Raises
        ------
        InputError
            ``path`` is a file, a non-empty directory and ``overwrite`` is False, or a
            non-empty directory that is not a run folder.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not a directory")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise InputError(
                    f"{path}: run folder exists and is not empty (use --overwrite to replace "
                    "it or --resume to continue it)"
                )
            if not (path / RUN_FILE).is_file():
                raise InputError(
                    f"{path}: refusing to overwrite a non-empty folder that is not an mlipuq "
                    "run folder"
                )
            return True
        return False

    def save_meta(self) -> None:
        """Write ``run.json`` (atomically)."""
        write_json(self.path / RUN_FILE, self.meta)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, models={self.model_ids})"

    # ------------------------------------------------------------------ contents
    @property
    def backend(self) -> str:
        """Name of the model backend (``run.json["backend"]``; ``"nequip"`` if absent)."""
        from mlipuq.backends.registry import DEFAULT

        return str(self.meta.get("backend", DEFAULT))

    @property
    def backend_class(self) -> type:
        """The backend class (:class:`~mlipuq.backends.base.Backend`), imported now."""
        from mlipuq.backends.registry import get

        return get(self.backend)

    @property
    def model_ids(self) -> list[str]:
        """Model ids ``["model_0", ...]`` in training order."""
        return list(self.meta["model_ids"])

    @property
    def elements(self) -> list[str]:
        """Chemical symbols of the training set, sorted."""
        return list(self.meta["elements"])

    @property
    def seeds(self) -> list[int]:
        """Training seed of each member."""
        return [int(s) for s in self.meta.get("seeds", [])]

    @property
    def isolated_energies(self) -> dict[str, float]:
        """Isolated-atom energies in eV used as per-type energy shifts."""
        return {k: float(v) for k, v in self.meta.get("isolated_energies", {}).items()}

    @property
    def train_path(self) -> Path:
        """``train.extxyz``: the training frames in atom-table order."""
        return self.path / "train.extxyz"

    @property
    def val_path(self) -> Path:
        """``val.extxyz``: the validation frames."""
        return self.path / "val.extxyz"

    def train_frames(self) -> list[Atoms]:
        """The training configurations (with reference energies and forces)."""
        return read_structures(self.train_path, require_forces=True)

    @cached_property
    def atom_table(self) -> AtomTable:
        """AtomTable of the training set (``atom_table.npz``)."""
        return AtomTable.load(self.path / "atom_table.npz")

    @property
    def configs_dir(self) -> Path:
        return self.path / "configs"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def store_path(self) -> Path:
        """Directory of the trajectory store."""
        return self.path / "trajectories"

    @property
    def store(self):
        """The :class:`~mlipuq.trajectory_store.TrajectoryStore` of the run."""
        from mlipuq.trajectory_store import TrajectoryStore

        return TrajectoryStore.open(self.store_path)

    def _check_model_id(self, model_id: str) -> str:
        if model_id not in self.meta["model_ids"]:
            raise InputError(
                f"model_id: {model_id!r} is not in the run {self.path} (models: {self.model_ids})"
            )
        return model_id

    def config_path(self, model_id: str) -> Path:
        """The training config used for ``model_id`` (NequIP YAML)."""
        return self.configs_dir / f"{self._check_model_id(model_id)}.yaml"

    def model_dir(self, model_id: str) -> Path:
        """Training output directory of ``model_id`` (``nequip-train``'s for NequIP)."""
        return self.models_dir / self._check_model_id(model_id)

    def checkpoint_path(self, model_id: str, which: str = "best") -> Path:
        """NequIP runs: ``best.ckpt`` or ``last.ckpt`` of ``model_id`` (may not exist yet)."""
        from mlipuq.backends.nequip.features import checkpoint_path

        return checkpoint_path(self, model_id, which)

    def packaged_path(self, model_id: str) -> Path:
        """NequIP runs: the packaged model of ``model_id`` (may not exist)."""
        from mlipuq.backends.nequip.features import packaged_path

        return packaged_path(self, model_id)

    def model_path(self, model_id: str) -> Path:
        """The model file of ``model_id``, as the run's backend says.

        For NequIP: the packaged zip if present, else ``best.ckpt``, else ``last.ckpt``.

        Raises
        ------
        InputError
            ``model_id`` is not a member, or it has no model file (not trained).
        """
        return self.backend_class.model_path(self, self._check_model_id(model_id))

    def metrics_path(self, model_id: str) -> Path:
        """``metrics/<model_id>.csv`` (one row per epoch)."""
        return self.path / "metrics" / f"{self._check_model_id(model_id)}.csv"
