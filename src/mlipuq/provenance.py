"""Provenance of estimators saved in a run folder: which model files and training set.

An estimator fitted on one member's descriptors (LTAU, D-optimality) or on every
member's forces (the ensemble) is only valid for those model files and that training
set. :func:`run_provenance` records the members' model files with their SHA-256 and
the atom-table fingerprint; :func:`stale_reason` compares a record with the run as it
is now (after ``train --resume`` the model files change; after a new training set the
fingerprint does).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "run_provenance", "stale_reason"]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex), cached per (path, size, modification time)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_provenance(run: Any, model_ids: Sequence[str]) -> dict:
    """What an estimator fitted now on ``model_ids`` of ``run`` depends on (JSON types).

    Returns
    -------
    dict
        ``{"models": {model_id: {"file": path relative to the run, "sha256": hex}},
        "atom_table_fingerprint": str}``.
    """
    models = {}
    for model_id in model_ids:
        path = run.model_path(model_id)
        models[model_id] = {"file": str(path.relative_to(run.path)),
                            "sha256": file_sha256(path)}
    return {"models": models, "atom_table_fingerprint": run.atom_table.fingerprint()}


def stale_reason(recorded: Mapping | None, run: Any) -> str | None:
    """Why a recorded provenance no longer matches ``run`` (None: it matches).

    A record without provenance (written before it was kept) is reported as such.
    """
    if not recorded or "models" not in recorded:
        return "no provenance recorded (fitted by an older mlipuq)"
    if recorded.get("atom_table_fingerprint") != run.atom_table.fingerprint():
        return "fitted on another training set"
    for model_id, entry in recorded["models"].items():
        if model_id not in run.model_ids:
            return f"fitted on {model_id!r}, which the run no longer has"
        path = run.model_path(model_id)
        if str(path.relative_to(run.path)) != entry.get("file") or (
                file_sha256(path) != entry.get("sha256")):
            return f"fitted on another model file of {model_id!r} (retrained or resumed?)"
    return None
