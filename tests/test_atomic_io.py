"""Atomic writes: a directory is swapped in whole, temporaries of killed processes are
removed by the next write, a swap killed between its renames is undone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlipuq.io import atomic_directory, clean_stale_temporaries, write_json


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
    stale_dir = tmp_path / f".m.tmp-{pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "half").write_text("x")
    stale_file = tmp_path / f".run.json.tmp-{pid}-x.json"
    stale_file.write_text("{")
    alive = tmp_path / f".m.tmp-{os.getpid()}-mine"  # this process: kept
    alive.mkdir()
    with atomic_directory(tmp_path / "m") as tmp:
        (tmp / "a").write_text("1")
    write_json(tmp_path / "run.json", {"a": 1})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["m", "run.json", alive.name])


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    pid = _dead_pid()
    aside = tmp_path / f".m.tmp-{pid}-old-xyz"
    aside.mkdir()
    (aside / "m").mkdir()
    (aside / "m" / "a").write_text("old")
    removed = clean_stale_temporaries(tmp_path / "m")
    assert removed == [aside]
    assert (tmp_path / "m" / "a").read_text() == "old"
