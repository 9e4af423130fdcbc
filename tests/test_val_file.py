"""A fixed validation set: ``train_ensemble(val_file=...)`` / ``mlipuq train --val-file``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.backends.nequip import config as cfg  # noqa: E402
from mlipuq.cli import main  # noqa: E402
from mlipuq.io import read_structures  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402
from nequip_support import cli_error, make_emt_copper_frames, write_frames  # noqa: E402


def _same_frames(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-10)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-10)


def test_cli_val_file_trains_on_every_frame_and_validates_on_the_file(tmp_path, capsys):
    train = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(5, seed=2))
    val = write_frames(tmp_path / "held_out.extxyz", make_emt_copper_frames(3, seed=7))
    run_dir = tmp_path / "run"
    argv = ["train", str(train), "--run", str(run_dir), "--preset", "tiny", "--epochs", "1",
            "--val-file", str(val), "--no-package", "-q"]
    assert main(argv) == 0
    folder = RunFolder.open(run_dir)
    assert folder.meta["train_frames"] == [0, 1, 2, 3, 4] and folder.meta["val_frames"] == []
    assert folder.meta["val_file"] == "held_out.extxyz" and folder.meta["val_fraction"] is None
    assert folder.atom_table.n_atoms == 5 * 8
    _same_frames(folder.train_frames(), read_structures(train))
    _same_frames(read_structures(folder.val_path), read_structures(val))
    data = cfg.load_yaml(folder.config_path("model_0"))["data"]
    assert data["val_file_path"] == str(folder.val_path.resolve())
    # resuming with another validation file is refused; with the same one it runs on
    other = write_frames(tmp_path / "other.extxyz", make_emt_copper_frames(3, seed=8))
    err = cli_error(capsys, [a if a != str(val) else str(other) for a in argv] + ["--resume"])
    assert "held_out.extxyz" in err and "other.extxyz" in err
    err = cli_error(capsys, [a if a != str(val) else str(tmp_path / "absent.extxyz")
                             for a in argv] + ["--resume"])
    assert "absent.extxyz: validation file not found" in err
    assert main(argv + ["--resume"]) == 0


def test_val_file_with_a_foreign_element_is_refused_before_the_run(tmp_path, capsys):
    train = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(4, seed=2))
    frames = make_emt_copper_frames(2, seed=3)
    frames[1].symbols[0] = "Ag"
    val = write_frames(tmp_path / "with_ag.extxyz", frames)
    run_dir = tmp_path / "run"
    err = cli_error(capsys, ["train", str(train), "--run", str(run_dir), "--val-file", str(val)])
    assert "with_ag.extxyz" in err and "['Ag']" in err and "['Cu']" in err
    assert not run_dir.exists()


def test_val_file_without_forces_or_missing_is_refused(tmp_path, capsys):
    from ase.io import write

    train = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(4, seed=2))
    bare = tmp_path / "bare.extxyz"
    write(bare, [a.copy() for a in make_emt_copper_frames(2, seed=3)], format="extxyz")
    err = cli_error(capsys, ["train", str(train), "--run", str(tmp_path / "r1"),
                              "--val-file", str(bare)])
    assert "bare.extxyz" in err and "forces" in err
    err = cli_error(capsys, ["train", str(train), "--run", str(tmp_path / "r2"),
                              "--val-file", str(tmp_path / "absent.extxyz")])
    assert "absent.extxyz" in err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_val_file_conflicts_are_refused(tmp_path, capsys):
    train = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(4, seed=2))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(train), "--run", str(tmp_path / "r"), "--val-file", str(train),
              "--val-fraction", "0.2"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    err = cli_error(capsys, ["train", "--run", str(tmp_path / "r"), "--reweight", "easy",
                              "--from", str(tmp_path), "--val-file", str(train)])
    assert "--val-file" in err
