"""Atomic writes: a directory is swapped in whole, temporaries of killed processes are
removed by the next write, a swap killed between its renames is undone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlipuq.exceptions import InputError
from mlipuq.io import _host, atomic_directory, clean_stale_temporaries, write_json


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_swap_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "m"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "only_old").write_text("x")
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failure_leaves_the_old_directory(tmp_path):
    target = tmp_path / "m"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_temporaries_of_dead_processes_are_cleaned(tmp_path):
    pid = _dead_pid()
    stale_dir = tmp_path / f".m.tmp-{_host()}-{pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "half").write_text("x")
    stale_file = tmp_path / f".run.json.tmp-{_host()}-{pid}-x.json"
    stale_file.write_text("{")
    alive = tmp_path / f".m.tmp-{_host()}-{os.getpid()}-mine"  # this process: kept
    alive.mkdir()
    with atomic_directory(tmp_path / "m") as tmp:
        (tmp / "a").write_text("1")
    write_json(tmp_path / "run.json", {"a": 1})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["m", "run.json", alive.name])


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    pid = _dead_pid()
    aside = tmp_path / f".m.tmp-{_host()}-{pid}-old-xyz"
    aside.mkdir()
    (aside / "m").mkdir()
    (aside / "m" / "a").write_text("old")
    removed = clean_stale_temporaries(tmp_path / "m")
    assert removed == [aside]
    assert (tmp_path / "m" / "a").read_text() == "old"


def test_another_hosts_temporaries_are_left_alone(tmp_path):
    """On a shared file system a PID says nothing about another machine's processes."""
    pid = _dead_pid()
    other = tmp_path / f".m.tmp-othernode-{pid}-abc"
    other.mkdir()
    assert clean_stale_temporaries(tmp_path / "m") == []
    assert other.is_dir()


def test_a_foreign_directory_or_file_is_never_replaced(tmp_path):
    user = tmp_path / "data"
    user.mkdir()
    (user / "precious.txt").write_text("keep")
    with pytest.raises(InputError, match="without metrics.json"), \
            atomic_directory(user, marker="metrics.json") as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert (user / "precious.txt").read_text() == "keep"
    plain = tmp_path / "file"
    plain.write_text("keep")
    with pytest.raises(InputError, match="not a directory"), atomic_directory(plain):
        pass
    assert plain.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, marker="metrics.json") as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert (empty / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty", "file"]
