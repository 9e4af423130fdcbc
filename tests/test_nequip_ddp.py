"""ErrorTrajectoryCallback under Lightning DDP (2 CPU processes, gloo): the store of a
2-process run equals the store of a 1-process run of the same model and data.

Why the values can be compared exactly (up to float32 storage and float64 summation
order): the tiny preset is float64 and each epoch is ONE optimiser step on the whole
training set (single process: ``batch_size`` = all frames; 2 processes: half of them
per rank, and NequIP's loss is the mean over the global batch), so both runs take the
same steps from the same initial weights whatever the sampler order. With uneven
shards (the ``DistributedSampler`` repeats frames) and several batches the DDP steps
differ from a single process's; there the test uses learning rate 0 and compares
with the saved model instead.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

pytest.importorskip("nequip")
torch = pytest.importorskip("torch")

from nequip_support import (  # noqa: E402
    TINY_R_MAX,
    make_emt_copper_frames,
    make_tiny_run,
    write_frames,
)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


@pytest.fixture(autouse=True)
def _localhost_rendezvous(monkeypatch):
    """gloo on localhost: a fixed address and a port free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, "1")


def _assert_complete(store, model_id, epochs):
    """One finite value per atom and logged epoch, per-frame energies, epochs in order."""
    errors = store.read(model_id)
    np.testing.assert_array_equal(store.epochs(model_id), np.arange(epochs))
    assert errors.shape == (epochs, store.n_atoms)
    assert np.isfinite(errors).all() and (errors >= 0).all()
    energy = store.read_energy_errors(model_id)
    assert energy.shape == (epochs, store.atom_table.n_configs) and np.isfinite(energy).all()
    return errors, energy


def test_ddp_epoch_end_store_equals_single_process_and_resumes(tmp_path):
    from mlipuq.backends.nequip import config as cfg
    from mlipuq.backends.nequip.training import train_ensemble
    from mlipuq.run_folder import RunFolder

    common = {"n_models": 1, "n_frames": 8, "seed": 3, "log_mode": "epoch_end"}
    # 8 frames -> 6 training frames; one full-batch step per epoch in both runs
    single = RunFolder.open(make_tiny_run(
        tmp_path / "single", epochs=3, preset_overrides={"batch_size": 6}, **common
    ))
    ddp_dir = make_tiny_run(
        tmp_path / "ddp", epochs=2, processes=2, preset_overrides={"batch_size": 3}, **common
    )
    recorded = cfg.load_yaml(RunFolder.open(ddp_dir).config_path("model_0"))
    assert cfg.config_processes(recorded) == 2
    assert recorded["trainer"]["strategy"] == cfg.DDP_STRATEGY
    # a run killed after logging epoch 2 but before its checkpoint: resume drops it
    store = RunFolder.open(ddp_dir).store
    stale = store.epoch_path("model_0", 2)
    np.save(stale, np.full(store.n_atoms, 99.0, dtype=np.float32))
    ddp = train_ensemble(
        tmp_path / "ddp" / "cu_train.extxyz", ddp_dir, preset="tiny", epochs=3, n_models=1,
        seed=3, log_mode="epoch_end", threads=1, r_max=TINY_R_MAX, package=False, progress=False,
        resume=True, preset_overrides={"batch_size": 3},  # processes: as recorded (2)
    )
    want, want_energy = _assert_complete(single.store, "model_0", 3)
    got, got_energy = _assert_complete(ddp.store, "model_0", 3)
    assert (got < 99.0).all()  # the stale epoch was recomputed
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_energy, want_energy, rtol=1e-6, atol=1e-8)
    assert ddp.store.model_meta("model_0")["info"]["train_frames"] == (
        single.store.model_meta("model_0")["info"]["train_frames"]
    )
    # no stray (temporary) files: one writer per epoch
    names = sorted(p.name for p in (ddp.store.path / "models" / "model_0").iterdir())
    assert names == sorted(
        ["meta.json"] + [f"{kind}epoch_{e:06d}.npy" for e in range(3) for kind in ("", "energy_")]
    )


def test_ddp_in_batch_with_sampler_padding_has_one_value_per_atom(tmp_path):
    """Uneven shards (5 frames on 2 ranks: the sampler repeats one frame on rank 1),
    2 batches per rank, learning rate 0: every logged value must be the error of the
    (unchanging) saved model, each atom exactly once, none from the end-of-epoch
    fallback (a rank's frames reach rank 0 only through the gather)."""
    from mlipuq.run_folder import RunFolder
    from test_nequip_train import _direct_force_errors

    run = RunFolder.open(make_tiny_run(
        tmp_path, n_models=1, n_frames=7, epochs=2, seed=5, log_mode="in_batch",
        processes=2, preset_overrides={"batch_size": 2, "lr": 0.0},
    ))
    assert run.atom_table.n_configs == 5
    errors, energy = _assert_complete(run.store, "model_0", 2)
    direct, direct_energy = _direct_force_errors(
        run.checkpoint_path("model_0", "last"), run.train_frames()
    )
    for epoch in range(2):
        np.testing.assert_allclose(errors[epoch], direct, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(energy[epoch], direct_energy, rtol=1e-6, atol=1e-7)
    log = (run.model_dir("model_0") / "train.log").read_text()
    assert "were not in any batch" not in log


class _TwoRankStrategy:
    """Stands in for Lightning's DDP strategy: both ranks hold the same buffer."""

    def all_gather(self, tensor):
        return torch.stack([tensor, tensor + 1.0])  # rank 1's errors are 1 eV/Å larger

    def barrier(self, name=None):
        pass

    def broadcast(self, obj, src=0):
        return obj


def test_only_rank_zero_touches_the_store(tmp_path):
    from types import SimpleNamespace

    from nequip.data.dataset import ASEDataset

    from mlipuq.backends.nequip.callback import ErrorTrajectoryCallback
    from mlipuq.trajectory_store import TrajectoryStore

    path = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, repeat=(1, 1, 1)))
    dataset = ASEDataset(file_path=str(path), transforms=[])
    store_path = tmp_path / "store"
    for rank in (1, 0):
        trainer = SimpleNamespace(
            global_rank=rank, world_size=2, current_epoch=0, strategy=_TwoRankStrategy(),
            datamodule=SimpleNamespace(train_dataset=[dataset]),
        )
        callback = ErrorTrajectoryCallback(str(store_path), mode="in_batch")
        module = torch.nn.Identity()
        callback.on_train_start(trainer, module)
        callback.on_train_epoch_start(trainer, module)
        for frame in range(3):  # as if this rank's batches had held every frame
            callback._buffer.add(frame, np.full(4, 0.5 + frame), 0.1)
        callback._write_epoch(trainer, module, 0)
        callback.teardown(trainer, module, "fit")
        assert store_path.exists() == (rank == 0)
    errors = TrajectoryStore.open(store_path).read("model_0")
    np.testing.assert_array_equal(errors, [np.repeat([0.5, 1.5, 2.5], 4)])  # rank 0's values


def test_merge_rank_buffers_takes_the_lowest_rank_of_a_padded_frame():
    from mlipuq.backends.nequip.callback import merge_rank_buffers

    offsets = np.array([0, 2, 3, 5])  # frames of 2, 1 and 2 atoms
    errors = np.array([[1.0, 1.5, 7.0, 7.0, 7.0], [2.0, 2.5, 3.0, 9.0, 9.0]])
    energy = np.array([[0.1, 7.0, 7.0], [0.2, 0.3, 9.0]])
    seen = np.array([[True, False, False], [True, True, False]])  # frame 0 on both ranks
    merged, merged_energy, any_seen = merge_rank_buffers(errors, energy, seen, offsets)
    np.testing.assert_array_equal(merged[:3], [1.0, 1.5, 3.0])
    assert np.isnan(merged[3:]).all()  # frame 2: no rank saw it
    np.testing.assert_array_equal(merged_energy[:2], [0.1, 0.3])
    assert np.isnan(merged_energy[2])
    np.testing.assert_array_equal(any_seen, [True, True, False])


def test_set_processes_round_trip_and_checks():
    from mlipuq.backends.nequip import config as cfg
    from mlipuq.exceptions import InputError

    config = cfg.preset_config(
        "tiny", elements=["Cu"], train_file="a.xyz", val_file="b.xyz",
        isolated_energies={"Cu": 0.0}, epochs=1, seed=0,
    )
    assert cfg.config_processes(config) == 1
    cfg.set_processes(config, 3)
    trainer = config["trainer"]
    assert (trainer["devices"], trainer["accelerator"]) == (3, "cpu")
    assert cfg.config_processes(config) == 3
    cfg.set_processes(config, 1)
    assert "strategy" not in trainer and trainer["devices"] == 1
    assert cfg.config_processes(config) == 1
    with pytest.raises(InputError, match="processes"):
        cfg.set_processes(config, 0)


class _FailedWriteStrategy(_TwoRankStrategy):
    """Rank 0's epoch write failed (once ``failed``): its broadcast carries the message
    to every rank."""

    failed = False

    def broadcast(self, obj, src=0):
        if obj is None and self.failed:
            return "OSError: [Errno 28] No space left on device"
        return obj


def test_a_failed_epoch_write_stops_every_rank_with_rank_zeros_message(tmp_path):
    from types import SimpleNamespace

    from nequip.data.dataset import ASEDataset

    from mlipuq.backends.nequip.callback import ErrorTrajectoryCallback
    from mlipuq.exceptions import InputError

    path = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, repeat=(1, 1, 1)))
    dataset = ASEDataset(file_path=str(path), transforms=[])
    for rank in (0, 1):
        trainer = SimpleNamespace(
            global_rank=rank, world_size=2, current_epoch=0, strategy=_FailedWriteStrategy(),
            datamodule=SimpleNamespace(train_dataset=[dataset]),
        )
        callback = ErrorTrajectoryCallback(str(tmp_path / "store"), mode="in_batch")
        module = torch.nn.Identity()
        callback.on_train_start(trainer, module)
        callback.on_train_epoch_start(trainer, module)
        for frame in range(3):
            callback._buffer.add(frame, np.full(4, 0.5), 0.1)
        if rank == 0:
            def full_disk(*args, **kwargs):
                raise OSError(28, "No space left on device")

            callback.writer_.append = full_disk
        trainer.strategy.failed = True
        with pytest.raises(InputError, match=r"error trajectory, epoch 0: OSError: "
                                             r"\[Errno 28\] No space left on device"):
            callback._write_epoch(trainer, module, 0)
        callback.teardown(trainer, module, "fit")
