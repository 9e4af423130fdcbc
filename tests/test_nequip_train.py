"""``mlipuq train`` / ``train_ensemble``: run folder, trajectories, resume, bad input.

Trains tiny NequIP models (1 layer x 8 features) on 12 frames of 8-atom EMT copper;
one 2-member run is shared by the module (session-scoped fixture).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.cli import main  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.io import read_structures  # noqa: E402
from mlipuq.run_folder import FORMAT_VERSION, RunFolder  # noqa: E402
from nequip_support import (  # noqa: E402
    TINY_R_MAX,
    cli_error,
    make_emt_copper_frames,
    make_tiny_run,
    write_frames,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")

EPOCHS = 3


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 2-member tiny ensemble trained for 3 epochs (epoch_end mode, EMA weights)."""
    directory = tmp_path_factory.mktemp("nequip_tiny")
    return RunFolder.open(make_tiny_run(directory, n_models=2, epochs=EPOCHS))


def _direct_force_errors(model_path, frames, r_max=TINY_R_MAX):
    """|F_ref - F_pred| per atom from a saved model, frame by frame (no batching)."""
    import torch
    from nequip.data import AtomicDataDict
    from nequip.data.ase import from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.model.saved_models import load_saved_model
    from nequip.utils.global_state import set_global_state

    set_global_state()
    torch.set_num_threads(1)
    model = load_saved_model(str(model_path))
    mapper = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=["Cu"], chemical_species_to_atom_type_map={"Cu": "Cu"}
    )
    neighbours = NeighborListTransform(r_max=r_max)
    forces, energies = [], []
    for atoms in frames:
        out = model(AtomicDataDict.batched_from_list([neighbours(mapper(from_ase(atoms)))]))
        pred = out["forces"].detach().double().numpy()
        forces.append(np.linalg.norm(pred - atoms.get_forces(), axis=1))
        energy = float(out["total_energy"].detach().reshape(-1)[0])
        energies.append(abs(energy - atoms.get_potential_energy()))
    return np.concatenate(forces), np.asarray(energies)


def test_run_folder_layout_and_metadata(tiny_run):
    meta = tiny_run.meta
    assert meta["format"] == "mlipuq-run" and meta["format_version"] == FORMAT_VERSION
    assert tiny_run.model_ids == ["model_0", "model_1"]
    assert tiny_run.seeds == [0, 1]
    assert tiny_run.elements == ["Cu"]
    assert meta["epochs"] == EPOCHS and meta["log_mode"] == "epoch_end"
    # 12 frames, val_fraction 0.25 -> 3 validation frames, 9 training frames of 8 atoms
    assert len(meta["train_frames"]) == 9 and len(meta["val_frames"]) == 3
    assert tiny_run.atom_table.n_atoms == 72
    for model_id in tiny_run.model_ids:
        assert tiny_run.config_path(model_id).is_file()
        assert tiny_run.model_path(model_id) == tiny_run.checkpoint_path(model_id, "best")
    with pytest.raises(InputError, match="model_9"):
        tiny_run.model_path("model_9")


def test_train_file_is_training_subset_in_original_order(tiny_run, tmp_path):
    original = read_structures(tiny_run.path.parent / "cu_train.extxyz")
    frames = tiny_run.train_frames()
    expected = [original[i] for i in tiny_run.meta["train_frames"]]
    assert len(frames) == len(expected)
    for got, want in zip(frames, expected, strict=True):
        np.testing.assert_allclose(got.positions, want.positions, atol=1e-10)
        np.testing.assert_allclose(got.get_forces(), want.get_forces(), atol=1e-10)
    assert np.all(np.diff(tiny_run.meta["train_frames"]) > 0)


def test_isolated_energies_are_least_squares_per_atom_mean(tiny_run):
    frames = tiny_run.train_frames()
    per_atom = np.mean([a.get_potential_energy() / len(a) for a in frames])
    # one element and equal sizes: the min-norm least-squares solution is the mean E/n
    assert tiny_run.isolated_energies["Cu"] == pytest.approx(per_atom, abs=1e-9)
    assert tiny_run.meta["isolated_energies_source"] == "least_squares"


def test_trajectory_shape_and_last_epoch_matches_saved_model(tiny_run):
    store = tiny_run.store
    frames = tiny_run.train_frames()
    n_atoms = tiny_run.atom_table.n_atoms
    for model_id in tiny_run.model_ids:
        errors = store.read(model_id)
        assert errors.shape == (EPOCHS, n_atoms)
        np.testing.assert_array_equal(store.epochs(model_id), np.arange(EPOCHS))
        assert store.read_energy_errors(model_id).shape == (EPOCHS, len(frames))
        # last.ckpt is saved right after the last logged epoch; loading it gives the EMA
        # weights, which is what the default epoch_end/ema mode evaluated
        direct_f, direct_e = _direct_force_errors(
            tiny_run.checkpoint_path(model_id, "last"), frames
        )
        np.testing.assert_allclose(errors[-1], direct_f, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            store.read_energy_errors(model_id)[-1], direct_e, rtol=1e-6, atol=1e-7
        )
    # different seeds give different models
    assert not np.allclose(store.read("model_0")[-1], store.read("model_1")[-1])


def test_metrics_csv_has_one_row_per_epoch(tiny_run):
    import csv

    with open(tiny_run.metrics_path("model_0"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert all(float(r["val0_epoch/forces_mae"]) > 0 for r in rows)
    # "best.ckpt" is chosen on per-atom energy + force MAE (normalised weights), not
    # on the total energy, which grows with the cell size
    for r in rows:
        balanced = 0.5 * (float(r["val0_epoch/per_atom_energy_mae"])
                          + float(r["val0_epoch/forces_mae"]))
        assert float(r["val0_epoch/weighted_sum"]) == pytest.approx(balanced, rel=1e-5)


def test_in_batch_equals_epoch_end_when_learning_rate_is_zero(tmp_path):
    """in_batch (preset) vs epoch_end (the same model given as a user YAML) at lr = 0.

    The user YAML has a ``split_dataset`` and another seed/max_epochs: ``--config``
    must replace them by the run's split, member seed and epochs, giving the very
    same model as the preset.
    """
    from mlipuq.backends.nequip import config as cfg
    from mlipuq.backends.nequip.training import fit_isolated_energies, split_train_val

    frames = make_emt_copper_frames(12, 0)
    train_idx, _ = split_train_val(12, val_fraction=0.25, seed=0)
    energies = fit_isolated_energies([frames[i] for i in train_idx], ["Cu"])
    user = cfg.preset_config(
        "tiny", elements=["Cu"], train_file="x.xyz", val_file="y.xyz",
        isolated_energies=energies, epochs=50, seed=99, r_max=TINY_R_MAX,
        overrides={"lr": 0.0},
    )
    del user["data"]["train_file_path"], user["data"]["val_file_path"]
    user["data"]["split_dataset"] = {"file_path": "elsewhere.xyz", "train": 0.5, "val": 0.5}
    user_yaml = cfg.write_yaml(tmp_path / "user.yaml", user)
    runs = {
        "in_batch": RunFolder.open(make_tiny_run(
            tmp_path / "in_batch", n_models=1, epochs=2, log_mode="in_batch",
            preset_overrides={"lr": 0.0},
        )),
        "epoch_end": RunFolder.open(make_tiny_run(
            tmp_path / "epoch_end", n_models=1, epochs=2, log_mode="epoch_end",
            weights="raw", config=user_yaml,
        )),
    }
    used = cfg.load_yaml(runs["epoch_end"].config_path("model_0"))
    assert "split_dataset" not in used["data"] and used["trainer"]["max_epochs"] == 2
    assert used["training_module"]["model"]["seed"] == 0
    in_batch = runs["in_batch"].store.read("model_0")
    epoch_end = runs["epoch_end"].store.read("model_0")
    assert in_batch.shape == epoch_end.shape == (2, 72)
    np.testing.assert_allclose(in_batch, epoch_end, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        runs["in_batch"].store.read_energy_errors("model_0"),
        runs["epoch_end"].store.read_energy_errors("model_0"),
        rtol=1e-6, atol=1e-7,
    )
    # in_batch mapped every frame from the shuffled batches (no end-of-epoch fallback)
    log = (runs["in_batch"].model_dir("model_0") / "train.log").read_text()
    assert "not in any batch" not in log
    assert runs["in_batch"].store.model_meta("model_0")["info"]["mode"] == "in_batch"


def test_cli_resume_continues_store_without_duplicates(tmp_path, capsys):
    data = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(8, seed=3))
    run_dir = tmp_path / "run"
    common = [
        "train", str(data), "--run", str(run_dir), "--preset", "tiny", "--r-max", str(TINY_R_MAX),
        "--val-fraction", "0.25", "--no-package", "--threads", "1",
    ]
    assert main([*common, "--epochs", "2"]) == 0
    folder = RunFolder.open(run_dir)
    store = folder.store
    np.testing.assert_array_equal(store.epochs("model_0"), [0, 1])
    # a run killed after logging epoch 2 but before checkpointing it leaves a stale row
    stale = np.full(folder.atom_table.n_atoms, 123.0)
    store.writer("model_0").append(stale, epoch=2)
    # an existing run folder is refused without --resume/--overwrite
    capsys.readouterr()
    assert main([*common, "--epochs", "4"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*common, "--epochs", "4", "--resume"]) == 0
    errors = folder.store.read("model_0")
    np.testing.assert_array_equal(folder.store.epochs("model_0"), [0, 1, 2, 3])
    assert errors.shape == (4, folder.atom_table.n_atoms)
    assert np.all(errors < 100.0)  # the stale epoch was replaced
    assert RunFolder.open(run_dir).meta["epochs"] == 4
    import csv

    with open(folder.metrics_path("model_0"), newline="") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1, 2, 3]
    # the resumed last epoch still matches the saved model
    last = folder.checkpoint_path("model_0", "last")
    direct, _ = _direct_force_errors(last, folder.train_frames())
    np.testing.assert_allclose(errors[-1], direct, rtol=1e-5, atol=1e-6)
    # resuming with another training file is refused, not silently ignored
    other = write_frames(tmp_path / "other.extxyz", make_emt_copper_frames(8, seed=4))
    other_args = [other if part == str(data) else part for part in common]
    other_args = [str(part) for part in other_args]
    assert main([*other_args, "--epochs", "5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "run was trained on cu.extxyz" in err and "resume given" in err
    assert RunFolder.open(run_dir).meta["epochs"] == 4


# ---------------------------------------------------------------------- bad input
def test_extxyz_without_forces_is_refused(tmp_path, capsys):
    frames = make_emt_copper_frames(3, seed=1)
    for atoms in frames:
        atoms.calc = None
    path = write_frames(tmp_path / "noforces.extxyz", frames)
    err = cli_error(capsys, ["train", str(path), "--run", str(tmp_path / "run"), "--no-package"])
    assert "noforces.extxyz" in err and "configuration 0" in err and "forces" in err
    assert not (tmp_path / "run").exists()


def test_unknown_element_is_refused(tmp_path, capsys):
    path = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, seed=1))
    lines = path.read_text().splitlines()
    # first frame: line 0 count, line 1 header, line 2 first atom; second frame's first atom
    second = int(lines[0]) + 4
    lines[second] = lines[second].replace("Cu", "Qq", 1)
    path.write_text("\n".join(lines) + "\n")
    err = cli_error(capsys, ["train", str(path), "--run", str(tmp_path / "run")])
    assert "configuration 1" in err and "'Qq'" in err


def test_config_that_is_not_nequip_is_refused(tmp_path, capsys):
    data = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, seed=1))
    config = tmp_path / "other.yaml"
    config.write_text("model:\n  layers: 3\nlearning_rate: 0.01\n")
    argv = ["train", str(data), "--run", str(tmp_path / "run"), "--config", str(config)]
    err = cli_error(capsys, argv)
    assert "other.yaml" in err and "not a NequIP config" in err and "run" in err
    config.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="not a NequIP config"):
        from mlipuq.backends.nequip.training import train_ensemble

        train_ensemble(data, tmp_path / "run2", config=config)


def test_run_folder_from_another_version_is_refused(tmp_path, capsys):
    import json

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"format": "mlipuq-run", "format_version": 99}))
    with pytest.raises(InputError, match=r"format_version 99 .*supports format_version 1"):
        RunFolder.open(folder)
    (folder / "run.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not an mlipuq run folder"):
        RunFolder.open(folder)
    with pytest.raises(InputError, match="not an mlipuq run folder"):
        RunFolder.open(tmp_path)
    (folder / "run.json").write_text(json.dumps({"format": "mlipuq-run", "format_version": 99}))
    data = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, seed=1))
    err = cli_error(capsys, ["train", str(data), "--run", str(folder), "--resume", "--no-package"])
    assert "format_version" in err


def test_bad_numbers_are_refused(tmp_path):
    from mlipuq.backends.nequip.training import train_ensemble

    data = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, seed=1))
    with pytest.raises(InputError, match="val_fraction"):
        train_ensemble(data, tmp_path / "r1", val_fraction=1.5)
    with pytest.raises(InputError, match="epochs"):
        train_ensemble(data, tmp_path / "r2", epochs=0)
    with pytest.raises(InputError, match="preset"):
        train_ensemble(data, tmp_path / "r3", preset="huge")
    with pytest.raises(InputError, match="log_mode"):
        train_ensemble(data, tmp_path / "r4", log_mode="sometimes")
    isolated = write_frames(tmp_path / "iso.extxyz", make_emt_copper_frames(1, seed=1))
    with pytest.raises(InputError, match="expected 1"):
        train_ensemble(data, tmp_path / "r5", isolated_energies=isolated)
    with pytest.raises(InputError, match=r"no isolated-atom energy for element\(s\) \['Cu'\]"):
        train_ensemble(data, tmp_path / "r6", isolated_energies={"Ag": -1.0})
    for r_max in (-1.0, 0.0, float("nan")):
        with pytest.raises(InputError, match="r_max: expected a positive cutoff in Å"):
            train_ensemble(data, tmp_path / "r7", r_max=r_max)
    assert not (tmp_path / "r7").exists()


def test_nan_energy_is_refused_before_training(tmp_path, capsys):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = make_emt_copper_frames(3, seed=1)
    frames[2].calc = SinglePointCalculator(frames[2], energy=float("nan"),
                                           forces=frames[2].get_forces())
    path = write_frames(tmp_path / "nan.extxyz", frames)
    err = cli_error(capsys, ["train", str(path), "--run", str(tmp_path / "run"), "--no-package"])
    assert "nan.extxyz: configuration 2 has a NaN or infinite reference energy" in err
    assert not (tmp_path / "run").exists()


def test_a_user_config_model_must_match_the_backend():
    """An Allegro model in --config needs --backend allegro (its features are taken
    differently), and a NequIP model cannot make an allegro run."""
    from mlipuq.backends.nequip.training import _check_architecture

    allegro = {"training_module": {"model": {"_target_": "allegro.model.AllegroModel"}}}
    nequip = {"training_module": {"model": {"_target_": "nequip.model.NequIPGNNModel"}}}
    _check_architecture(allegro, "allegro", "a.yaml")
    _check_architecture(nequip, "nequip", "n.yaml")
    with pytest.raises(InputError, match=r"a.yaml: model allegro.model.AllegroModel needs "
                                         r"--backend allegro \(got --backend nequip\)"):
        _check_architecture(allegro, "nequip", "a.yaml")
    with pytest.raises(InputError, match="needs --backend nequip"):
        _check_architecture(nequip, "allegro", "n.yaml")
