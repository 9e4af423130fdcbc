"""The run folder written by ``mlipuq train`` and read by ``mlipuq fit`` and the calculator.

Layout::

    RUN/
      run.json              format "mlipuq-run", format_version, versions, elements,
                            preset or user_config, epochs, n_models, seeds, model_ids,
                            train_file, train_sha256, isolated_energies, threads,
                            log_mode, weights, val_fraction, created
      train.extxyz          the training frames exactly as used (order = atom-table order)
      val.extxyz            the validation frames
      atom_table.npz        AtomTable of train.extxyz
      configs/model_0.yaml  the NequIP config of member 0 (one per member)
      models/model_0/       nequip-train output (best.ckpt, last.ckpt, csv/, train.log)
      models/model_0.nequip.zip   packaged model (``nequip-package build``), optional
      trajectories/         TrajectoryStore, model ids "model_0", "model_1", ...
      metrics/model_0.csv   per-epoch training/validation metrics (one row per epoch)
      ltau/                 written by ``mlipuq fit``

Only this module knows the layout; everything else goes through :class:`RunFolder`.
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
FORMAT_VERSION = 1
RUN_FILE = "run.json"


class RunFolder:
    """A training run of an ensemble of NequIP models with their error trajectories.

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
    def open(cls, path: str | os.PathLike) -> RunFolder:
        """Open a run folder, checking its format and version.

        Raises
        ------
        InputError
            No ``run.json``, a foreign file, or another ``format_version``.
        """
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: run folder not found")
        run_file = path / RUN_FILE
        meta = read_header(
            run_file, what="run folder", format_name=FORMAT_NAME, format_version=FORMAT_VERSION
        )
        for key in ("model_ids", "elements"):
            if not isinstance(meta.get(key), list):
                raise InputError(f"{run_file}: field {key!r} missing or not a list")
        return cls(path, meta)

    @classmethod
    def create(
        cls, path: str | os.PathLike, meta: dict, *, overwrite: bool = False
    ) -> RunFolder:
        """Start a run folder: check it is empty (or ``overwrite``), write ``run.json``.

        Raises
        ------
        InputError
            ``path`` is a non-empty directory (or a file) and ``overwrite`` is False.
        """
        import shutil

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
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
        folder = cls(path, meta)
        folder.save_meta()
        return folder

    def save_meta(self) -> None:
        """Write ``run.json`` (atomically)."""
        write_json(self.path / RUN_FILE, self.meta)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, models={self.model_ids})"

    # ------------------------------------------------------------------ contents
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

    @property
    def ltau_dir(self) -> Path:
        """Directory where ``mlipuq fit`` saves the fitted LTAU estimator."""
        return self.path / "ltau"

    def _check_model_id(self, model_id: str) -> str:
        if model_id not in self.meta["model_ids"]:
            raise InputError(
                f"model_id: {model_id!r} is not in the run {self.path} (models: {self.model_ids})"
            )
        return model_id

    def config_path(self, model_id: str) -> Path:
        """The NequIP config used for ``model_id``."""
        return self.configs_dir / f"{self._check_model_id(model_id)}.yaml"

    def model_dir(self, model_id: str) -> Path:
        """``nequip-train`` output directory of ``model_id``."""
        return self.models_dir / self._check_model_id(model_id)

    def checkpoint_path(self, model_id: str, which: str = "best") -> Path:
        """``best.ckpt`` or ``last.ckpt`` of ``model_id`` (may not exist yet)."""
        if which not in ("best", "last"):
            raise InputError(f"which: expected 'best' or 'last', got {which!r}")
        return self.model_dir(model_id) / f"{which}.ckpt"

    def packaged_path(self, model_id: str) -> Path:
        """``models/<model_id>.nequip.zip`` (may not exist)."""
        return self.models_dir / f"{self._check_model_id(model_id)}.nequip.zip"

    def model_path(self, model_id: str) -> Path:
        """The model file to load: packaged zip if present, else best, else last checkpoint.

        Raises
        ------
        InputError
            None of them exists (the member was not trained).
        """
        for candidate in (
            self.packaged_path(model_id),
            self.checkpoint_path(model_id, "best"),
            self.checkpoint_path(model_id, "last"),
        ):
            if candidate.is_file():
                return candidate
        raise InputError(
            f"{self.model_dir(model_id)}: no trained model for {model_id!r} (no packaged "
            "model, best.ckpt or last.ckpt)"
        )

    def metrics_path(self, model_id: str) -> Path:
        """``metrics/<model_id>.csv`` (one row per epoch)."""
        return self.path / "metrics" / f"{self._check_model_id(model_id)}.csv"
