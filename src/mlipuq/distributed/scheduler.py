"""``--scheduler SPEC``: which Dask cluster a command runs on.

=========================  ==========================================================
SPEC                       cluster
=========================  ==========================================================
(not given)                none: the in-process path
``local:N``                ``distributed.LocalCluster``: N worker processes on this
                           machine, 1 thread each (``local:N:MEM`` caps each worker's
                           memory, e.g. ``local:2:2GB``)
``tcp://HOST:PORT``        an existing Dask scheduler (``dask scheduler`` started by
                           the user, workers attached to it)
``slurm:CONFIG.yaml``      ``dask_jobqueue.SLURMCluster`` built from the keyword
                           arguments in the YAML file; its key ``jobs`` (default 1)
                           is how many SLURM jobs are submitted (``cluster.scale``)
=========================  ==========================================================

Every worker must see the same filesystem paths as the client (the trajectory store,
the descriptors, the output directory): the tasks read and write files by path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlipuq.exceptions import InputError, MlipuqError

SPEC_HELP = ("local:N[:MEM] (N worker processes here), tcp://HOST:PORT (a running "
             "Dask scheduler) or slurm:CONFIG.yaml (a dask-jobqueue SLURMCluster)")
"""How a ``--scheduler`` value is spelled (used in help and error messages)."""

_LOCAL = re.compile(r"^local:(\d+)(?::(\w+))?$")
_TCP = re.compile(r"^(tcp|tls|inproc|ucx)://[^\s]+$")
SLURM_JOBS_KEY = "jobs"
"""Key of a SLURM YAML file giving the number of jobs (not a SLURMCluster argument)."""


def parse_scheduler(spec: str | None) -> tuple[str, Any]:
    """``(kind, value)`` of a ``--scheduler`` value, checked before any cluster starts.

    Returns
    -------
    ("none", None), ("local", (n_workers, memory_limit or None)), ("address", str) or
    ("slurm", Path)

    Raises
    ------
    InputError
        Not one of the forms of :data:`SPEC_HELP`, N < 1, or a missing SLURM file.

    Examples
    --------
    >>> parse_scheduler("local:2")
    ('local', (2, None))
    >>> parse_scheduler("tcp://10.0.0.1:8786")
    ('address', 'tcp://10.0.0.1:8786')
    """
    if spec is None:
        return "none", None
    spec = str(spec).strip()
    match = _LOCAL.match(spec)
    if match:
        n_workers = int(match.group(1))
        if n_workers < 1:
            raise InputError(f"--scheduler: expected at least 1 local worker, got {spec!r}")
        memory = match.group(2)
        if memory is not None:
            from dask.utils import parse_bytes

            try:
                parse_bytes(memory)
            except ValueError:
                raise InputError(f"--scheduler: {memory!r} in {spec!r} is not a memory size "
                                 "(e.g. 2GB)") from None
        return "local", (n_workers, memory)
    if _TCP.match(spec):
        return "address", spec
    if spec.startswith("slurm:"):
        path = Path(spec[len("slurm:"):])
        if not path.is_file():
            raise InputError(f"--scheduler: SLURM configuration {path} not found")
        return "slurm", path
    raise InputError(f"--scheduler: expected {SPEC_HELP}, got {spec!r}")


def slurm_options(path: str | os.PathLike) -> tuple[dict, int]:
    """``(SLURMCluster keyword arguments, jobs)`` from a YAML file.

    The file is a mapping of ``dask_jobqueue.SLURMCluster`` keyword arguments
    (``cores``, ``memory``, ``processes``, ``walltime``, ``queue``, ``account``,
    ``job_extra_directives``, ``python``, ...) plus ``jobs`` (SLURM jobs to submit,
    default 1). ``python`` defaults to this interpreter.
    """
    import yaml

    path = Path(path)
    try:
        options = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise InputError(f"{path}: not a readable YAML file ({first})") from None
    if not isinstance(options, dict):
        raise InputError(f"{path}: expected a mapping of SLURMCluster arguments, got "
                         f"{type(options).__name__}")
    options = dict(options)
    jobs = options.pop(SLURM_JOBS_KEY, 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise InputError(f"{path}: {SLURM_JOBS_KEY} must be a positive integer, got {jobs!r}")
    for required in ("cores", "memory"):
        if required not in options:
            raise InputError(f"{path}: missing {required!r} (SLURMCluster needs cores and "
                             "memory per job)")
    options.setdefault("python", _python())
    return options, jobs


def slurm_cluster(path: str | os.PathLike) -> tuple[Any, int]:
    """``(SLURMCluster, jobs)`` built from the YAML file ``path`` (no job submitted yet:
    ``cluster.job_script()`` shows the script ``cluster.scale(jobs=jobs)`` submits)."""
    from dask_jobqueue import SLURMCluster

    options, jobs = slurm_options(path)
    try:
        cluster = SLURMCluster(**options)
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: not valid SLURMCluster arguments ({error})") from None
    return cluster, jobs


def _python() -> str:
    import sys

    return sys.executable


@contextmanager
def client_for(spec: str | None, *, wait_timeout: float = 600.0) -> Iterator[Any]:
    """A ``distributed.Client`` for a ``--scheduler`` value (None: yields None).

    A cluster this call starts (``local``, ``slurm``) is closed when the block ends;
    an existing scheduler (``tcp://``) is only disconnected from.

    Parameters
    ----------
    spec : str or None
        See :data:`SPEC_HELP`.
    wait_timeout : float
        Seconds to wait for the first worker of a SLURM cluster (queued jobs).
    """
    kind, value = parse_scheduler(spec)
    if kind == "none":
        yield None
        return
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if kind == "local":
            n_workers, memory = value
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   memory_limit=memory or "auto", dashboard_address=":0")
            client = Client(cluster)
        elif kind == "address":
            try:
                client = Client(value, timeout="30s")
            except OSError as error:
                raise InputError(f"--scheduler: no Dask scheduler at {value} ({error})") \
                    from None
        else:
            cluster, jobs = slurm_cluster(value)
            cluster.scale(jobs=jobs)
            client = Client(cluster)
            try:
                client.wait_for_workers(1, timeout=wait_timeout)
            except TimeoutError:
                client.close()
                raise InputError(f"--scheduler {spec}: no worker started within "
                                 f"{wait_timeout:g} s (jobs still queued?)") from None
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    try:
        with cluster_failures(spec):
            yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class ClusterError(MlipuqError):
    """The Dask cluster failed a computation (workers lost beyond the retries, tasks
    cancelled, the scheduler gone); nothing was swapped into the outputs."""


@contextmanager
def cluster_failures(spec: str | None) -> Iterator[None]:
    """Turn Dask's failures of the cluster itself into one-line :class:`ClusterError`."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    try:
        yield
    except (KilledWorker, CancelledError, CommClosedError, TimeoutError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ClusterError(f"--scheduler {spec}: the cluster failed ({type(error).__name__}"
                           f"{': ' + first[:200] if first else ''}); no output was written "
                           "or replaced") from None
