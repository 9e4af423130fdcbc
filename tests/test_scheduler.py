"""``--scheduler``: parsing, one-line errors, a local cluster, the SLURM job script."""

from __future__ import annotations

import sys

import pytest

from mlipuq.cli import main
from mlipuq.distributed.scheduler import (
    client_for,
    parse_scheduler,
    slurm_cluster,
    slurm_options,
)
from mlipuq.exceptions import InputError

pytest.importorskip("distributed")

SLURM_YAML = """\
# dask-jobqueue SLURMCluster keyword arguments (docs/distributed.md), plus jobs
cores: 4
processes: 4
memory: 16GB
walltime: "02:00:00"
queue: compute
account: uq-project
job_extra_directives: ["--exclusive"]
worker_extra_args: ["--memory-limit", "3.5GB"]
local_directory: /tmp
jobs: 6
"""


@pytest.mark.parametrize("spec, expected", [
    (None, ("none", None)),
    ("local:2", ("local", (2, None))),
    ("local:3:2GB", ("local", (3, "2GB"))),
    ("tcp://10.1.2.3:8786", ("address", "tcp://10.1.2.3:8786")),
])
def test_parse_scheduler(spec, expected):
    assert parse_scheduler(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("local:0", "at least 1 local worker"),
    ("local:2:lots", "'lots' in 'local:2:lots' is not a memory size"),
    ("slurm:/no/such.yaml", "SLURM configuration /no/such.yaml not found"),
    ("cluster", "expected local:N[:MEM]"),
])
def test_bad_scheduler_is_one_line(spec, message):
    with pytest.raises(InputError, match="^--scheduler: ") as caught:
        parse_scheduler(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argv", [
    ["fit", "--run", "nowhere"],
    ["evaluate", "--run", "nowhere", "--test", "a.extxyz", "--out", "r"],
    ["ltau", "fit", "--store", "s", "--descriptors", "d.npy", "--structures", "t.extxyz",
     "--out", "o"],
    ["ltau", "predict", "--estimator", "e", "--descriptors", "d.npy", "--structures",
     "t.extxyz", "--out", "o.extxyz"],
])
def test_every_verb_refuses_a_bad_scheduler_first(argv, capsys):
    assert main([*argv, "--scheduler", "local:two"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mlipuq: error: --scheduler: expected local:N[:MEM] (N worker processes "
                   "here), tcp://HOST:PORT (a running Dask scheduler) or slurm:CONFIG.yaml "
                   "(a dask-jobqueue SLURMCluster), got 'local:two'"]


def test_local_cluster_has_the_workers_asked_for():
    with client_for("local:2") as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert all(w["nthreads"] == 1 for w in workers.values())
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert client.status == "closed"


def test_slurm_job_script_from_yaml(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text(SLURM_YAML)
    options, jobs = slurm_options(path)
    assert jobs == 6 and options["python"] == sys.executable
    cluster, jobs = slurm_cluster(path)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "#SBATCH -n 1" in lines
    assert "#SBATCH --cpus-per-task=4" in lines
    assert "#SBATCH --mem=15G" in lines  # 16 GB in GiB, as dask-jobqueue writes it
    assert "#SBATCH -t 02:00:00" in lines
    assert "#SBATCH -p compute" in lines and "#SBATCH -A uq-project" in lines
    assert "#SBATCH --exclusive" in lines
    command = lines[-1]
    assert command.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://")
    assert "--nworkers 4" in command and "--nthreads 1" in command
    assert "--memory-limit 3.5GB" in command


def test_slurm_yaml_errors_are_one_line(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text("cores: 4\n")
    with pytest.raises(InputError, match="missing 'memory'"):
        slurm_options(path)
    path.write_text("cores: 4\nmemory: 8GB\njobs: 0\n")
    with pytest.raises(InputError, match="jobs must be a positive integer"):
        slurm_options(path)
    path.write_text("cores: 4\nmemory: 8GB\nno_such_option: 1\n")
    with pytest.raises(InputError, match="not valid SLURMCluster arguments"):
        slurm_cluster(path)
