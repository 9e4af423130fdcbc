"""Tests of the error-trajectory store: roundtrips, resume, validation, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlipuq.atom_table import AtomTable
from mlipuq.exceptions import InputError
from mlipuq.trajectory_store import TrajectoryStore, window_slice

SRC = Path(__file__).resolve().parents[1] / "src"


def make_table(n_atoms: int = 1000, n_configs: int = 10, seed: int = 0) -> AtomTable:
    sizes = np.full(n_configs, n_atoms // n_configs)
    sizes[-1] += n_atoms - sizes.sum()
    rng = np.random.default_rng(seed)
    species = rng.choice(["H", "C", "O"], size=n_atoms)
    return AtomTable.from_sizes(sizes, species, force_norm=rng.uniform(0, 3, n_atoms))


@pytest.fixture
def table() -> AtomTable:
    return make_table()


def test_roundtrip_force_norm(tmp_path, table, rng):
    store = TrajectoryStore.create(tmp_path / "s", table)
    errors = rng.gamma(2.0, 0.05, size=(7, table.n_atoms)).astype(np.float32)
    energies = rng.normal(size=(7, table.n_configs))
    writer = store.writer("m0", seed=3, info={"lr": 0.01})
    for row, energy in zip(errors, energies, strict=True):
        writer.append(row, energy_errors=energy)
    reopened = TrajectoryStore.open(tmp_path / "s")
    assert reopened.model_ids() == ["m0"]
    assert reopened.model_meta("m0")["seed"] == 3
    assert reopened.model_meta("m0")["info"] == {"lr": 0.01}
    np.testing.assert_array_equal(reopened.epochs("m0"), np.arange(7))
    out = reopened.read("m0")
    assert out.dtype == np.float32 and out.shape == (7, table.n_atoms)
    np.testing.assert_array_equal(out, errors)
    np.testing.assert_array_equal(reopened.read("m0", window=(2, 3)), errors[2:5])
    np.testing.assert_array_equal(reopened.read("m0", window=(-2, None)), errors[5:])
    np.testing.assert_array_equal(reopened.final_errors("m0"), errors[-1])
    np.testing.assert_allclose(reopened.read_energy_errors("m0", window=(1, 2)), energies[1:3])
    streamed = list(reopened.iter_epochs("m0", window=(4, None)))
    assert [epoch for epoch, _ in streamed] == [4, 5, 6]
    np.testing.assert_array_equal(np.stack([e for _, e in streamed]), errors[4:])
    np.testing.assert_array_equal(reopened.atom_table.force_norm, table.force_norm)
    header = json.loads((tmp_path / "s" / "store.json").read_text())
    assert header["atom_table_fingerprint"] == table.fingerprint()
    assert header["n_atoms"] == 1000 and header["n_configs"] == 10
    assert header["error_kind"] == "force_norm" and header["units"]["errors"] == "eV/Å"


def test_roundtrip_components_and_norms(tmp_path, table, rng):
    store = TrajectoryStore.create(tmp_path / "s", table, error_kind="force_components")
    errors = rng.normal(0, 0.1, size=(4, table.n_atoms, 3)).astype(np.float32)
    writer = store.writer("m0")
    for row in errors:
        writer.append(row)
    np.testing.assert_array_equal(store.read("m0"), errors)
    norms = np.linalg.norm(errors.astype(np.float64), axis=2)
    np.testing.assert_allclose(store.read_norms("m0"), norms, rtol=1e-6)
    np.testing.assert_allclose(store.final_errors("m0", norm=True), norms[-1], rtol=1e-6)
    chunks = list(store.iter_atom_chunks("m0", chunk_size=300))
    assert chunks[0][1].shape == (4, 300, 3)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks], axis=1), errors)


def test_atom_chunks_equal_read(tmp_path, table, rng):
    store = TrajectoryStore.create(tmp_path / "s", table)
    errors = rng.random((6, table.n_atoms)).astype(np.float32)
    writer = store.writer("m0")
    for row in errors:
        writer.append(row)
    chunks = list(store.iter_atom_chunks("m0", chunk_size=333, window=(1, 4)))
    assert [(c.start, c.stop) for c, _ in chunks] == [(0, 333), (333, 666), (666, 999), (999, 1000)]
    np.testing.assert_array_equal(
        np.concatenate([block for _, block in chunks], axis=1), errors[1:5]
    )


def test_resume_continues_at_next_epoch(tmp_path, table, rng):
    store = TrajectoryStore.create(tmp_path / "s", table)
    writer = store.writer("m0", seed=7)
    assert writer.next_epoch == 0
    first = rng.random((3, table.n_atoms)).astype(np.float32)
    for row in first:
        writer.append(row)
    again = TrajectoryStore.create(tmp_path / "s", table).writer("m0", seed=7)
    assert again.next_epoch == 3
    assert again.append(first[0] * 2) == 3
    assert again.append(first[1], epoch=10) == 10  # gaps allowed
    assert again.next_epoch == 11
    np.testing.assert_array_equal(store.epochs("m0"), [0, 1, 2, 3, 10])
    np.testing.assert_array_equal(store.read("m0")[3], first[0] * 2)
    with pytest.raises(InputError, match="epoch: 5 is not after the last logged epoch 10"):
        again.append(first[0], epoch=5)
    with pytest.raises(InputError, match="logged with seed 7, got 8"):
        store.writer("m0", seed=8)


def test_fingerprint_and_kind_mismatch(tmp_path, table):
    TrajectoryStore.create(tmp_path / "s", table)
    other = make_table(n_atoms=1000, seed=1)
    with pytest.raises(InputError, match="store was made for atom table"):
        TrajectoryStore.create(tmp_path / "s", other)
    with pytest.raises(InputError, match="holds 'force_norm' errors, asked for 'force_components'"):
        TrajectoryStore.create(tmp_path / "s", table, error_kind="force_components")
    with pytest.raises(InputError, match="already exists"):
        TrajectoryStore.create(tmp_path / "s", table, exist_ok=False)
    with pytest.raises(InputError, match="error_kind: expected one of"):
        TrajectoryStore.create(tmp_path / "t", table, error_kind="energy")


def test_bad_errors_rejected(tmp_path, table):
    store = TrajectoryStore.create(tmp_path / "s", table)
    writer = store.writer("m0")
    with pytest.raises(InputError, match="errors: has 999 atoms but the atom table has 1000"):
        writer.append(np.ones(999))
    bad = np.ones(1000)
    bad[5] = np.nan
    with pytest.raises(InputError, match="errors: contains 1 NaN"):
        writer.append(bad)
    with pytest.raises(InputError, match="errors: contains negative values"):
        writer.append(-np.ones(1000))
    with pytest.raises(InputError, match="errors: is empty"):
        writer.append(np.array([]))
    with pytest.raises(InputError, match=r"errors: expected a 1-d array, got shape \(1000, 3\)"):
        writer.append(np.ones((1000, 3)))
    with pytest.raises(InputError, match="energy_errors: has 3 configurations but the atom"):
        writer.append(np.ones(1000), energy_errors=np.ones(3))
    with pytest.raises(InputError, match="model_id"):
        store.writer("../escape")
    assert len(store.epochs("m0")) == 0 and writer.next_epoch == 0


def test_components_allow_negative_but_check_shape(tmp_path, table):
    store = TrajectoryStore.create(tmp_path / "s", table, error_kind="force_components")
    writer = store.writer("m0")
    assert writer.append(-np.ones((1000, 3))) == 0
    with pytest.raises(InputError, match=r"expected shape \(N, 3\)"):
        writer.append(np.ones((1000, 2)))
    with pytest.raises(InputError, match="has 10 atoms but the atom table has 1000"):
        writer.append(np.ones((10, 3)))


def test_unreadable_paths(tmp_path, table):
    with pytest.raises(InputError, match="not an mlipuq trajectory store"):
        TrajectoryStore.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "store.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable JSON file"):
        TrajectoryStore.open(tmp_path / "junk")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(InputError, match="exists and is not an mlipuq trajectory store"):
        TrajectoryStore.create(tmp_path / "other", table)
    (tmp_path / "unfinished" / "models").mkdir(parents=True)  # create() killed early
    table.save(tmp_path / "unfinished" / "atom_table.npz")
    assert TrajectoryStore.create(tmp_path / "unfinished", table).n_atoms == 1000
    store = TrajectoryStore.create(tmp_path / "s", table)
    with pytest.raises(InputError, match="'nope' is not in the store"):
        store.read("nope")
    store.writer("empty")
    with pytest.raises(InputError, match="no epochs logged"):
        store.read("empty")
    writer = store.writer("m0")
    writer.append(np.ones(1000))
    np.save(store.epoch_path("m0", 1), np.ones(5, dtype=np.float32))  # foreign file
    with pytest.raises(InputError, match=r"has shape \(5,\), expected \(1000,\)"):
        store.read("m0")


def test_window_validation():
    assert window_slice(5, None) == slice(0, 5)
    assert window_slice(5, (4, 1)) == slice(4, 5)
    with pytest.raises(InputError, match="needs 7 logged epochs, only 5"):
        window_slice(5, (2, 5))
    with pytest.raises(InputError, match="start 5 is outside"):
        window_slice(5, (5, None))
    with pytest.raises(InputError, match="size must be a positive integer"):
        window_slice(5, (0, 0))


def test_temporary_files_ignored_and_cleaned(tmp_path, table):
    store = TrajectoryStore.create(tmp_path / "s", table)
    writer = store.writer("m0")
    writer.append(np.full(1000, 0.5))
    leftover = store.epoch_path("m0", 1).parent / ".epoch_000001.npy.abc123.tmp"
    leftover.write_bytes(b"\x93NUMPY half written")
    np.testing.assert_array_equal(store.epochs("m0"), [0])
    assert store.read("m0").shape == (1, 1000)
    resumed = store.writer("m0")
    assert not leftover.exists() and resumed.next_epoch == 1


def test_failed_write_leaves_no_epoch(tmp_path, table, monkeypatch):
    store = TrajectoryStore.create(tmp_path / "s", table)
    writer = store.writer("m0")
    writer.append(np.full(1000, 0.5))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        writer.append(np.full(1000, 0.7))
    monkeypatch.undo()
    directory = store.epoch_path("m0", 0).parent
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_000000.npy", "meta.json"]
    assert writer.next_epoch == 1 and writer.append(np.full(1000, 0.7)) == 1


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mlipuq.atom_table import AtomTable
    from mlipuq.trajectory_store import TrajectoryStore

    n_atoms = int(sys.argv[2])
    table = AtomTable.from_sizes([n_atoms], ["H"] * n_atoms)
    writer = TrajectoryStore.create(sys.argv[1], table).writer("m0", seed=1)
    base = (np.arange(n_atoms, dtype=np.float32) % 97) * np.float32(0.01)
    while True:
        epoch = writer.next_epoch
        writer.append(base + np.float32(epoch), energy_errors=np.array([float(epoch)]))
    """
)


def expected_epoch(epoch: int, n_atoms: int) -> np.ndarray:
    return (np.arange(n_atoms, dtype=np.float32) % 97) * np.float32(0.01) + np.float32(epoch)


def test_crash_safety_sigkill(tmp_path):
    n_atoms = 2_000_000  # 8 MB per epoch: a write takes a while
    path = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), str(n_atoms)], env=env
    )
    model_dir = path / "models" / "m0"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if model_dir.is_dir() and len(list(model_dir.glob("epoch_*.npy"))) >= 4:
                break
            assert process.poll() is None, "writer process died on its own"
            time.sleep(0.01)
        else:
            pytest.fail("writer did not log 4 epochs within 120 s")
        time.sleep(0.137)  # land at an arbitrary point of a later write
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    store = TrajectoryStore.open(path)
    table = AtomTable.from_sizes([n_atoms], ["H"] * n_atoms)
    epochs = store.epochs("m0")
    assert len(epochs) >= 4
    np.testing.assert_array_equal(epochs, np.arange(len(epochs)))  # no hole, nothing partial
    for epoch, errors in store.iter_epochs("m0"):
        np.testing.assert_array_equal(errors, expected_epoch(epoch, n_atoms))
    np.testing.assert_array_equal(store.read_energy_errors("m0")[:, 0], epochs.astype(float))
    writer = TrajectoryStore.create(path, table).writer("m0", seed=1)
    assert writer.next_epoch == len(epochs)
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # temp files removed
    writer.append(expected_epoch(writer.next_epoch, n_atoms))
    np.testing.assert_array_equal(store.final_errors("m0"), expected_epoch(len(epochs), n_atoms))
