"""LTAU on a 2-worker Dask LocalCluster gives the in-process answers, and survives a
killed worker (retried) or fails in one line leaving the old output."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from mlipuq.atom_table import AtomTable
from mlipuq.backends.base import ModelOutputs
from mlipuq.cli import main
from mlipuq.distributed.chunked import (
    as_dask_array,
    read_all,
    row_blocks,
    write_chunk,
    write_manifest,
)
from mlipuq.ltau import LTAUEstimator
from mlipuq.trajectory_store import TrajectoryStore

pytest.importorskip("distributed")

from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402


class KillHistogramTask(WorkerPlugin):
    """Kills its worker process when a histogram task of the LTAU fit starts executing:
    once (the first such task on any worker creates ``flag``), or every time."""

    def __init__(self, flag: str | None = None) -> None:
        self.flag = flag

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key[0] if isinstance(key, tuple) else str(key)
        if finish != "executing" or not name.startswith("_block_histogram"):
            return
        if self.flag is not None:
            try:
                os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os._exit(1)

SIZES = [6] * 60  # 360 atoms in 60 configurations
DIM = 8
CHUNK = 70  # 6 atom blocks: several tasks per worker


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def _store(path, kind="force_norm"):
    rng = np.random.default_rng(0)
    n_atoms = sum(SIZES)
    species = np.array(["Cu", "Au", "Cu"] * (n_atoms // 3))
    table = AtomTable.from_sizes(SIZES, species)
    store = TrajectoryStore.create(path, table, error_kind=kind)
    for model, epochs in (("m0", 7), ("m1", 5)):
        writer = store.writer(model, seed=1)
        for _ in range(epochs):
            shape = (n_atoms,) if kind == "force_norm" else (n_atoms, 3)
            values = rng.gamma(2.0, 0.05, size=shape)
            writer.append(values if kind == "force_norm" else values - 0.1)
    return store, rng.normal(size=(n_atoms, DIM)).astype(np.float32)


def _fit_both(store, desc, client, **params):
    table = store.atom_table
    norms = np.linspace(0.1, 2.0, table.n_atoms)  # |F_ref| in eV/Å, for rtol
    single = LTAUEstimator(**params).fit_arrays(store, desc, table.species, force_norm=norms,
                                                config_index=table.config_index)
    spread = LTAUEstimator(chunk_size=CHUNK, **params)
    spread.fit_arrays(store, desc, table.species, force_norm=norms,
                      config_index=table.config_index, client=client)
    return single, spread


@pytest.mark.parametrize("kind, params", [
    ("force_norm", {"index": "flat", "rtol": 0.05}),
    ("force_components", {"index": "ivfpq", "per_element": False, "ivf_nlist": 4,
                          "pq_m": 2}),
])
def test_distributed_fit_equals_single_process(tmp_path, client, kind, params, monkeypatch):
    import mlipuq.distributed.ltau as distributed_ltau

    monkeypatch.setattr(distributed_ltau, "MERGE_FAN_IN", 2)  # a merge tree of 2+ levels
    store, desc = _store(tmp_path / "store", kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FAISS: few points for 256 PQ centroids
        single, spread = _fit_both(store, desc, client, k=3, seed=2, **params)
    # identical distributions and p_i, bit for bit
    np.testing.assert_array_equal(spread.distributions_.bin_edges,
                                  single.distributions_.bin_edges)
    np.testing.assert_array_equal(spread.distributions_.mass, single.distributions_.mass)
    np.testing.assert_array_equal(spread.distributions_.n_samples,
                                  single.distributions_.n_samples)
    np.testing.assert_array_equal(spread.train_confidence(), single.train_confidence())
    assert spread.atol_ == single.atol_
    assert spread.reference_distance_ == single.reference_distance_
    assert all(len(shards) > 1 for shards in spread.index_files_.values())  # sharded
    assert max(len(shards) for shards in spread.index_files_.values()) > 2  # a deeper tree
    # identical predictions, in this process and with the search on the workers
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(40, DIM)).astype(np.float32) * 1.5
    species = np.array(["Cu", "Au"] * 20)
    configs = np.repeat(np.arange(8), 5)
    expected = single.predict_arrays(queries, species, config_index=configs)
    for result in (spread.predict_arrays(queries, species, config_index=configs),
                   spread.predict_arrays(queries, species, config_index=configs,
                                         client=client)):
        np.testing.assert_array_equal(result.atom_uncertainty, expected.atom_uncertainty)
        np.testing.assert_array_equal(result.extras["knn_distance"],
                                      expected.extras["knn_distance"])
    # saved with its shards and the memory-mapped mass; loads and predicts the same
    spread.save(tmp_path / "est")
    assert (tmp_path / "est" / "mass.npy").is_file()
    loaded = LTAUEstimator.load(tmp_path / "est")
    again = loaded.predict_arrays(queries, species, config_index=configs, client=client)
    np.testing.assert_array_equal(again.atom_uncertainty, expected.atom_uncertainty)


def test_fit_distributed_hook_gathers_dask_descriptors(tmp_path, client):
    import dask.array as da

    store, desc = _store(tmp_path / "store")
    table = store.atom_table
    X = ModelOutputs(species=table.species, config_index=table.config_index,
                     descriptors=da.from_array(desc, chunks=(100, DIM)))
    spread = LTAUEstimator(k=3, index="flat").fit_distributed(X, store, client)
    single = LTAUEstimator(k=3, index="flat").fit(
        ModelOutputs(species=table.species, config_index=table.config_index,
                     descriptors=desc), store)
    np.testing.assert_array_equal(spread.train_confidence(), single.train_confidence())


def test_killed_worker_is_retried(tmp_path, client):
    store, desc = _store(tmp_path / "store")
    flag = tmp_path / "killed"
    client.register_plugin(KillHistogramTask(str(flag)), name="kill-once")
    try:
        single, spread = _fit_both(store, desc, client, k=3, index="flat")
    finally:
        client.unregister_worker_plugin("kill-once")
    assert flag.is_file()  # a worker did die in a histogram task
    np.testing.assert_array_equal(spread.distributions_.mass, single.distributions_.mass)
    np.testing.assert_array_equal(spread.train_confidence(), single.train_confidence())


def test_failed_fit_is_one_line_and_keeps_the_old_output(tmp_path, capsys, monkeypatch):
    import dask

    store, desc = _store(tmp_path / "store")
    frames = []
    for number, size in enumerate(SIZES):
        rows = store.atom_table.config_index == number
        atoms = Atoms(symbols=list(store.atom_table.species[rows]),
                      positions=np.arange(size * 3).reshape(size, 3) * 0.7)
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((size, 3)))
        frames.append(atoms)
    write(tmp_path / "train.extxyz", frames)
    np.save(tmp_path / "desc.npy", desc)
    args = ["ltau", "fit", "--store", str(tmp_path / "store"), "--descriptors",
            str(tmp_path / "desc.npy"), "--structures", str(tmp_path / "train.extxyz"),
            "--out", str(tmp_path / "est"), "--k", "3", "--index", "flat",
            "--chunk-size", str(CHUNK)]
    assert main(args) == 0  # the old output, fitted in-process
    args += ["--scheduler", "local:1"]
    before = sorted(os.listdir(tmp_path / "est"))
    header = (tmp_path / "est" / "estimator.json").read_bytes()
    capsys.readouterr()
    from contextlib import contextmanager

    from mlipuq.distributed import scheduler

    original = scheduler.client_for

    @contextmanager
    def killing_client_for(spec, **kwargs):  # the command's cluster kills every try
        with original(spec, **kwargs) as cluster_client:
            cluster_client.register_plugin(KillHistogramTask(), name="kill-always")
            yield cluster_client

    monkeypatch.setattr(scheduler, "client_for", killing_client_for)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        status = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("mlipuq: error: --scheduler local:1: the cluster failed "
                              "(KilledWorker")
    assert "Traceback" not in "\n".join(err)
    assert sorted(os.listdir(tmp_path / "est")) == before
    assert (tmp_path / "est" / "estimator.json").read_bytes() == header


def test_chunked_array_round_trip(tmp_path, client):
    values = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    blocks = row_blocks(len(values), 10)
    for number, block in enumerate(blocks):
        write_chunk(tmp_path, number, values[block])
    write_manifest(tmp_path, blocks, values.shape, values.dtype)
    np.testing.assert_array_equal(read_all(tmp_path), values)
    lazy = as_dask_array(tmp_path)
    assert lazy.chunks[0] == (10, 10, 3)
    np.testing.assert_array_equal(client.compute(lazy.sum(axis=0)).result(),
                                  values.sum(axis=0))


def test_mlipuq_fit_on_a_running_scheduler_equals_in_process(tmp_path, client, capsys):
    """``mlipuq fit --scheduler tcp://...`` (the run's store, every method through the
    fit_distributed hook) saves the methods the in-process fit saves."""
    import shutil

    from mlipuq.method import load_method
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import method_dir, model_outputs, predict_methods
    from test_arrays_backend import make_run

    run, tests = make_run(tmp_path / "run")
    shutil.copytree(run.path, tmp_path / "copy")
    assert main(["fit", "--run", str(run.path), "--methods", "ltau", "ensemble"]) == 0
    assert main(["fit", "--run", str(tmp_path / "copy"), "--methods", "ltau", "ensemble",
                 "--scheduler", client.scheduler.address]) == 0
    copy = RunFolder.open(tmp_path / "copy")
    saved = {name: load_method(method_dir(run, name)) for name in ("ltau", "ensemble")}
    spread = {name: load_method(method_dir(copy, name)) for name in ("ltau", "ensemble")}
    np.testing.assert_array_equal(spread["ltau"].train_confidence(),
                                  saved["ltau"].train_confidence())
    assert spread["ltau"].threshold_ == saved["ltau"].threshold_  # calibrated the same
    outputs, _ = model_outputs(run, tests["vacancy"])
    expected, _ = predict_methods(saved, outputs)
    for name, result in predict_methods(spread, outputs)[0].items():
        np.testing.assert_array_equal(result.atom_uncertainty,
                                      expected[name].atom_uncertainty)


def test_non_finite_descriptors_are_refused_on_the_cluster(tmp_path, client):
    """A NaN row reaching a worker's shard is an InputError naming the problem (as the
    in-process fit refuses it), not garbage neighbours."""
    import dask.array as da

    from mlipuq.exceptions import InputError

    store, desc = _store(tmp_path / "store")
    desc = desc.copy()
    desc[100, 3] = np.nan
    table = store.atom_table
    lazy = da.from_array(desc, chunks=(CHUNK, -1))
    with pytest.raises(InputError, match=r"1 training row\(s\) with NaN or inf"):
        LTAUEstimator(k=3, index="flat", chunk_size=CHUNK).fit_arrays(
            store, lazy, table.species, config_index=table.config_index, client=client)
