"""File input/output helpers: reading structures with clear errors, atomic writes.

Nothing half-written is ever left looking complete: every writer here writes to a
temporary file in the target directory and renames it into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError


def _umask() -> int:
    """The process umask: from /proc where it exists (no change to the process), else
    read by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The file gets the mode a plain ``open`` would give it (0o666 less the umask), not
    the 0o600 of the temporary file. On any exception the temporary file is removed
    and ``target`` is untouched; temporaries of killed processes are removed by the next
    call (:func:`clean_stale_temporaries`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=suffix or ".tmp",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | os.PathLike, *, marker: str | None = None
                     ) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; swap it onto ``target`` on success.

    The swap is one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux (the old directory
    then lies in the temporary name and is removed): a reader, or a kill at any moment,
    sees the old or the new directory, never a mix and never none. Elsewhere the old
    directory is moved aside first and, if the process dies between the two renames,
    put back by the next call. On any exception the temporary directory is removed and
    ``target`` is untouched. Temporaries left by killed processes of this host
    (``.NAME.tmp-HOST-PID-*`` with PID no longer running) are removed by the next call.

    With ``marker`` (a file name), an existing ``target`` is replaced only when it is an
    empty directory or holds ``marker`` (an artefact of the same kind): a user's other
    directory or file given as the output is refused, never deleted.
    """
    import shutil

    target = Path(target)
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; follow the umask instead
        yield tmp
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
            return
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(target)}old-",
                                        dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None and not target.exists():
                os.replace(old / target.name, target)  # put the old directory back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(target: str | os.PathLike, marker: str | None) -> None:
    """Raise :class:`InputError` unless ``target`` is missing, or (with ``marker``) an
    empty directory or a directory holding ``marker``; never a plain file."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory (give a new output path)")
    if marker is not None and any(target.iterdir()) and not (target / marker).exists():
        raise InputError(f"{target}: a non-empty directory without {marker} (not an output "
                         "of this kind); give a new or empty output path")


def _temporary_prefix(target: Path) -> str:
    """``.NAME.tmp-HOST-PID-``: the host keeps cleanup to this machine's processes."""
    return f".{target.name}.tmp-{_host()}-{os.getpid()}-"


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where
    the call is not available (another OS, an old kernel or file system), or ``b`` has
    gone meanwhile (the caller then renames)."""
    import errno as errnos

    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        if errno in (errnos.ENOSYS, errnos.EINVAL, errnos.ENOTSUP, errnos.ENOENT):
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


@lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2, or None (loaded once)."""
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def clean_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``target`` left by processes that no longer run; put
    back a directory a killed two-step swap left aside. Returns what was removed."""
    import re
    import shutil

    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-{re.escape(_host())}-(\d+)-")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        found = pattern.match(path.name)
        if found is None or _alive(int(found.group(1))):
            continue
        aside = path / target.name
        if "-old-" in path.name and aside.is_dir() and not target.exists():
            os.replace(aside, target)  # the swap died between its two renames
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
            missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_json(target: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, raising :class:`InputError` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None


def read_header(
    header_file: str | os.PathLike,
    *,
    what: str,
    format_name: str,
    format_version: int | tuple[int, ...],
) -> dict:
    """Read the JSON header of an mlipuq artefact and check its format and version.

    Parameters
    ----------
    header_file : path-like
        The header (e.g. ``RUN/run.json``, ``STORE/store.json``).
    what : str
        What the artefact is called in messages (``"run folder"``, ...).
    format_name : str
        The expected ``"format"`` field.
    format_version : int or tuple of int
        The supported ``"format_version"`` value(s).

    Raises
    ------
    InputError
        Missing header, foreign format, or another format version.
    """
    header_file = Path(header_file)
    if not header_file.is_file():
        raise InputError(f"{header_file.parent}: not an mlipuq {what} (no {header_file.name})")
    meta = read_json(header_file)
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(
            f"{header_file}: not an mlipuq {what} (format {found!r}, expected {format_name!r})"
        )
    version = meta.get("format_version")
    supported = (format_version,) if isinstance(format_version, int) else tuple(format_version)
    if version not in supported:
        raise InputError(
            f"{header_file}: {what} format_version {version!r} is not supported "
            f"(this mlipuq supports format_version {', '.join(map(str, supported))})"
        )
    return meta


def save_npz(target: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save arrays to ``target`` (.npz, uncompressed), atomically; no pickled objects."""
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load an .npz written by :func:`save_npz` with ``allow_pickle=False``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None


def read_structures(
    path: str | os.PathLike, *, index: str = ":", require_forces: bool = False
) -> list[Atoms]:
    """Read all configurations of an extxyz (or any ASE-readable) file.

    Parameters
    ----------
    path : path-like
        Structure file.
    index : str
        ASE index string (default: every frame).
    require_forces : bool
        If True, every frame must carry reference forces (eV/Å).

    Raises
    ------
    InputError
        File missing, unreadable, empty, or without forces when they are required.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        frames = read(path, index=index)
    except Exception as exc:  # ASE raises many types for malformed files
        raise InputError(f"{path}: cannot read structures ({type(exc).__name__}: {exc})") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise InputError(f"{path}: contains no configurations")
    if require_forces:
        for number, atoms in enumerate(frames):
            if reference_forces(atoms) is None:
                raise InputError(f"{path}: configuration {number} has no reference forces")
    return frames


def reference_forces(atoms: Atoms) -> np.ndarray | None:
    """Reference forces (n_atoms, 3) in eV/Å from ``atoms``, or None if absent.

    Looks at the attached (single-point) calculator first, then ``atoms.arrays``
    under the usual extxyz names.
    """
    if atoms.calc is not None and "forces" in getattr(atoms.calc, "results", {}):
        return np.asarray(atoms.calc.results["forces"], dtype=float)
    for key in ("forces", "REF_forces", "force"):
        if key in atoms.arrays:
            return np.asarray(atoms.arrays[key], dtype=float)
    return None


def reference_energy(atoms: Atoms) -> float | None:
    """Reference total energy in eV from ``atoms``, or None if absent."""
    if atoms.calc is not None and "energy" in getattr(atoms.calc, "results", {}):
        return float(atoms.calc.results["energy"])
    for key in ("energy", "REF_energy", "Energy"):
        if key in atoms.info:
            return float(atoms.info[key])
    return None
