"""ErrorTrajectoryCallback: frame order through NequIP's dataset splits, use from a
user's own YAML (``split_dataset``) with plain ``nequip-train``, parameter checks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.exceptions import InputError  # noqa: E402
from nequip_support import TINY_R_MAX, make_emt_copper_frames, write_frames  # noqa: E402


def _ase_dataset(path):
    from nequip.data.dataset import ASEDataset
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    return ASEDataset(
        file_path=str(path),
        transforms=[
            ChemicalSpeciesToAtomTypeMapper(
                model_type_names=["Cu"], chemical_species_to_atom_type_map={"Cu": "Cu"}
            ),
            NeighborListTransform(r_max=TINY_R_MAX),
        ],
    )


def test_training_frames_follow_original_order_through_random_split(tmp_path):
    from nequip.data.dataset import RandomSplitAndIndexDataset
    from torch.utils.data import Subset

    from mlipuq.backends.nequip.callback import TrainingFrames, unwrap_dataset

    frames = make_emt_copper_frames(10, seed=2, repeat=(1, 1, 1))  # 4-atom cells
    path = write_frames(tmp_path / "cu.extxyz", frames)
    base = _ase_dataset(path)
    train = RandomSplitAndIndexDataset(base, {"train": 7, "val": 3}, "train", seed=5)
    nested = Subset(train, [4, 0, 2])  # a subset of a subset
    root, indices = unwrap_dataset(nested)
    assert root is base
    np.testing.assert_array_equal(indices, [int(train.indices[i]) for i in (4, 0, 2)])

    table_frames = TrainingFrames([train, nested])
    expected = sorted(int(i) for i in train.indices) + sorted(int(i) for i in indices)
    assert [b for _, b in table_frames.frame_ids] == expected
    assert [d for d, _ in table_frames.frame_ids] == [0] * 7 + [1] * 3
    table = table_frames.atom_table
    assert table.n_atoms == 4 * 10 and table.n_configs == 10
    want_norms = np.concatenate([np.linalg.norm(frames[i].get_forces(), axis=1) for i in expected])
    np.testing.assert_allclose(table.force_norm, want_norms, atol=1e-12)
    # item c is the frame it claims to be, and positions identify it
    for c, (dataset, local) in enumerate(table_frames.items):
        item = dataset[local]
        np.testing.assert_allclose(item["pos"].numpy(), frames[expected[c]].positions, atol=1e-5)
        assert c in table_frames.lookup(item["pos"])


def test_callback_from_user_yaml_with_split_dataset(tmp_path):
    from mlipuq.backends.nequip import config as cfg
    from mlipuq.backends.nequip.training import run_nequip_train
    from mlipuq.io import read_structures
    from mlipuq.trajectory_store import TrajectoryStore

    frames = make_emt_copper_frames(10, seed=4)
    data = write_frames(tmp_path / "cu.extxyz", frames)
    config = cfg.preset_config(
        "tiny", elements=["Cu"], train_file=data, val_file=data,
        isolated_energies={"Cu": -0.01}, epochs=2, seed=7, r_max=TINY_R_MAX,
    )
    del config["data"]["train_file_path"], config["data"]["val_file_path"]
    config["data"]["split_dataset"] = {"file_path": str(data), "train": 0.7, "val": 0.3}
    store_path = tmp_path / "traj"
    cfg.add_callbacks(
        config,
        [cfg.error_callback_spec(store_path=store_path, model_id="mine", weights="ema",
                                 batch_size=3, seed=7, threads=1)],
    )
    path = cfg.write_yaml(tmp_path / "user.yaml", config)
    run_nequip_train(path, tmp_path / "out", threads=1, progress=False)

    store = TrajectoryStore.open(store_path)
    info = store.model_meta("mine")["info"]
    train_frames = info["train_frames"]
    assert len(train_frames) == 7 and train_frames == sorted(train_frames)
    assert store.read("mine").shape == (2, 7 * 8)
    np.testing.assert_array_equal(store.epochs("mine"), [0, 1])
    # the split is torch.random_split with the data seed: same frames as NequIP's own split
    import torch

    split = torch.utils.data.random_split(
        range(10), [0.7, 0.3], generator=torch.Generator().manual_seed(7)
    )
    assert train_frames == sorted(int(i) for i in split[0].indices)
    # last epoch == direct evaluation of those frames (file order) with last.ckpt (EMA)
    from test_nequip_train import _direct_force_errors

    original = read_structures(data)
    chosen = [original[i] for i in train_frames]
    direct, energy = _direct_force_errors(tmp_path / "out" / "last.ckpt", chosen)
    np.testing.assert_allclose(store.final_errors("mine"), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.read_energy_errors("mine")[-1], energy, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "sometimes"}, "mode"),
        ({"weights": "average"}, "weights"),
        ({"batch_size": 0}, "batch_size"),
        ({"every_n_epochs": -1}, "every_n_epochs"),
        ({"threads": 0}, "threads"),
    ],
)
def test_callback_parameters_are_checked(tmp_path, kwargs, match):
    from mlipuq.backends.nequip.callback import ErrorTrajectoryCallback

    with pytest.raises(InputError, match=match):
        ErrorTrajectoryCallback(str(tmp_path / "s"), **kwargs)


def test_add_callbacks_replaces_previous_mlipuq_entries(tmp_path):
    from mlipuq.backends.nequip import config as cfg

    config = cfg.preset_config(
        "tiny", elements=["Cu"], train_file="a.xyz", val_file="b.xyz",
        isolated_energies={"Cu": 0.0}, epochs=1, seed=0,
    )
    n_before = len(config["trainer"]["callbacks"])
    for mode in ("epoch_end", "in_batch"):
        cfg.add_callbacks(config, [cfg.error_callback_spec(store_path=tmp_path, model_id="m",
                                                           mode=mode)])
    callbacks = config["trainer"]["callbacks"]
    assert len(callbacks) == n_before + 1
    assert callbacks[-1]["mode"] == "in_batch"
    assert callbacks[-1]["_target_"] == cfg.CALLBACK_TARGET
