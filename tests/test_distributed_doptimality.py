"""D-optimality on a Dask cluster: two-level MaxVol, parallel gamma, worker descriptors.

One 2-worker ``distributed.LocalCluster`` (processes, 1 thread each) for the module.
Data: Gaussian features of two elements (mixed order), and an arrays-backend run of
EMT-labelled Cu/Au cells with random descriptors for the worker outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

import dask.array as da  # noqa: E402

from mlipuq.backends.base import ModelOutputs  # noqa: E402
from mlipuq.doptimality import DOptimalityEstimator  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.maxvol import maxvol_from  # noqa: E402

TOL = 1.01
DET_FACTOR = 10.0
"""Stated bound: the two-level |det| is within this factor of the single pass's (the
single pass's own |det| moves by 0.3x-3.7x when only the column order changes;
docs/benchmarks_doptimality.md)."""


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=50)
    with Client(cluster) as dask_client:
        yield dask_client
    cluster.close()


@pytest.fixture(scope="module")
def training():
    """12000 rows x 12 features, elements Cu (about 60 %) and O interleaved at random."""
    rng = np.random.default_rng(7)
    n_rows, width = 12000, 12
    mixing = rng.normal(size=(width, width)) @ np.diag(np.logspace(0, -2, width))
    features = rng.normal(size=(n_rows, width)) @ mixing
    species = np.where(rng.random(n_rows) < 0.6, "Cu", "O")
    features[species == "O"] *= 2.0
    outputs = ModelOutputs(species=species, config_index=np.arange(n_rows) // 8,
                           descriptors=features)
    return outputs, DOptimalityEstimator(tol=TOL).fit(outputs)


def test_one_chunk_is_the_single_pass(client, training):
    outputs, single = training
    two_level = DOptimalityEstimator(tol=TOL, batch_size=outputs.n_atoms).fit_distributed(
        outputs, client=client)
    assert two_level.elements_ == single.elements_
    for element in single.elements_:
        np.testing.assert_array_equal(two_level.active_sets_[element],
                                      single.active_sets_[element])
        np.testing.assert_array_equal(two_level.active_inverse_[element],
                                      single.active_inverse_[element])
        assert two_level.n_swaps_[element] == single.n_swaps_[element]
        assert two_level.two_level_[element]["n_rounds"] == 0
    assert two_level.n_train_atoms_ == single.n_train_atoms_


@pytest.mark.parametrize("split_every", [None, 2])
def test_several_chunks_report_det_against_single_pass(client, training, split_every):
    from mlipuq.distributed.doptimality import two_level_active_sets

    outputs, single = training
    chunked = da.from_array(outputs.descriptors, chunks=(1700, -1))  # 8 chunks, uneven
    found = two_level_active_sets(chunked, outputs.species, client, tol=TOL,
                                  split_every=split_every)
    features, species = outputs.descriptors, outputs.species
    for element, item in found.items():
        width = features.shape[1]
        assert item.indices.shape == (width,) and len(set(item.indices.tolist())) == width
        assert np.all(species[item.indices] == element)  # real training rows of the element
        np.testing.assert_array_equal(item.active.rows, features[item.indices])
        assert item.n_chunks == 8 and item.n_candidates <= 8 * width
        # refined to a dominant set of every training row, like the single pass
        assert item.converged and item.max_gamma <= TOL * (1 + 1e-9)
        mine = features[species == element]
        gamma = np.abs(mine @ item.active.inverse).max(axis=1)
        assert gamma.max() <= TOL * (1 + 1e-9)
        log_ratio = (np.linalg.slogdet(item.active.rows)[1]
                     - np.linalg.slogdet(single.active_sets_[element])[1])
        print(f"{element} split_every={split_every}: |det| two-level / single pass = "
              f"{np.exp(log_ratio):.3g} ({item.n_rounds} refinement rounds)")
        assert abs(log_ratio) <= np.log(DET_FACTOR)


def test_without_refinement_the_candidates_are_dominated(client, training):
    from mlipuq.distributed.doptimality import two_level_active_sets

    outputs, _ = training
    found = two_level_active_sets(outputs.descriptors, outputs.species, client, tol=TOL,
                                  refine=False, chunk_rows=3000)
    for element, item in found.items():
        assert item.max_gamma is None and item.n_rounds == 0
        assert np.all(outputs.species[item.indices] == element)


def test_rank_deficient_rows_get_a_projection(client):
    from mlipuq.distributed.doptimality import two_level_active_sets

    rng = np.random.default_rng(5)
    features = np.zeros((3000, 8))
    features[:, :5] = rng.normal(size=(3000, 5))  # rank 5 of 8 columns
    with pytest.warns(UserWarning, match=r"features of element Cu: numerical rank 5 < 8"):
        found = two_level_active_sets(features, np.full(3000, "Cu"), client, tol=TOL,
                                      chunk_rows=700)
    item = found["Cu"]
    assert item.active.projection.shape == (8, 5) and item.indices.shape == (5,)
    assert item.converged and item.max_gamma <= TOL * (1 + 1e-9)
    assert np.abs(features @ item.active.inverse).max() <= TOL * (1 + 1e-9)


def test_parallel_gamma_equals_estimator_gamma(client, training, tmp_path):
    from mlipuq.distributed.chunked import read_all

    outputs, single = training
    rng = np.random.default_rng(3)
    width = outputs.descriptors.shape[1]
    # one element, chunks of 1000 rows: every row is graded by the same BLAS kernel as
    # in the single pass (one 5000-row GEMM), so the grades are bitwise equal
    query = rng.normal(size=(5000, width)) * 0.5
    X = ModelOutputs(species=np.full(5000, "O"), config_index=np.arange(5000) // 10,
                     descriptors=da.from_array(query, chunks=(1000, -1)))
    expected = single.predict_arrays(query, X.species, config_index=X.config_index)
    result = single.predict_distributed(X, client, out=tmp_path / "gamma")
    np.testing.assert_array_equal(result.atom_uncertainty, expected.atom_uncertainty)
    np.testing.assert_array_equal(result.config_uncertainty, expected.config_uncertainty)
    np.testing.assert_array_equal(read_all(tmp_path / "gamma"), expected.atom_uncertainty)
    # mixed elements, uneven chunks: the remainder rows of a GEMM (m mod 4 on x86) go
    # through another BLAS kernel, so a grade may differ in its last bit
    species = rng.choice(["Cu", "O"], size=5000)
    X = ModelOutputs(species=species, config_index=X.config_index,
                     descriptors=da.from_array(query, chunks=(777, -1)))
    expected = single.predict_arrays(query, species, config_index=X.config_index)
    result = single.predict_distributed(X, client, out=tmp_path / "gamma")
    np.testing.assert_allclose(result.atom_uncertainty, expected.atom_uncertainty,
                               rtol=1e-14, atol=0)
    np.testing.assert_array_equal(result.atom_flags, expected.atom_flags)
    np.testing.assert_array_equal(read_all(tmp_path / "gamma"), result.atom_uncertainty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gamma"]  # replaced whole


def test_distributed_fit_saves_like_the_single_pass(client, training, tmp_path):
    from mlipuq.method import load_method

    outputs, _ = training
    fitted = DOptimalityEstimator(tol=TOL, batch_size=4000).fit_distributed(
        outputs, client=client)
    fitted.save(tmp_path / "dopt")
    loaded = load_method(tmp_path / "dopt")
    np.testing.assert_array_equal(loaded.gamma(outputs.descriptors, outputs.species),
                                  fitted.gamma(outputs.descriptors, outputs.species))
    # how the active sets were found is recorded and said: several chunks give another
    # local maximum than the single pass
    assert loaded.two_level_ == fitted.two_level_
    assert any(info["n_chunks"] > 1 for info in loaded.two_level_.values())
    assert "two-level MaxVol" in loaded.summary()
    assert "two-level" not in DOptimalityEstimator(tol=TOL).fit(outputs).summary()


def test_bad_inputs_raise_one_line_errors(client, training):
    outputs, single = training
    broken = outputs.descriptors.copy()
    broken[5000, 3] = np.nan
    bad = ModelOutputs(species=outputs.species, config_index=outputs.config_index,
                       descriptors=da.from_array(broken, chunks=(3000, -1)))
    with pytest.raises(InputError, match=r"rows 3000\.\.5999 hold NaN"):
        DOptimalityEstimator().fit_distributed(bad, client=client)
    unknown = ModelOutputs(species=np.array(["Cu", "Zn"]), config_index=np.array([0, 0]),
                           descriptors=outputs.descriptors[:2])
    with pytest.raises(InputError, match=r"\['Zn'\] have no active set"):
        single.predict_distributed(unknown, client)
    with pytest.raises(InputError, match="outlier_filter"):
        DOptimalityEstimator(outlier_filter="force_norm").fit_distributed(outputs,
                                                                           client=client)


def test_maxvol_from_never_loses_volume(rng):
    features = rng.normal(size=(400, 6))
    start = np.arange(6)
    result = maxvol_from(features, start, tol=TOL)
    assert np.linalg.slogdet(features[result.indices])[1] >= np.linalg.slogdet(
        features[start])[1]
    assert np.abs(features @ np.linalg.inv(features[result.indices])).max() <= TOL * (1 + 1e-9)
    with pytest.raises(InputError, match="linearly dependent"):
        maxvol_from(np.vstack([features[:1], features[:1], features[2:]]), start, tol=TOL)


# ---------------------------------------------------------------------- worker outputs


def _cu_au_run(path):
    from mlipuq.backends.arrays import ArraysBackend, write_run
    from mlipuq.emt_data import bulk_copper, labelled

    rng = np.random.default_rng(11)
    frames = []
    for number in range(14):
        atoms = bulk_copper(1).repeat((1, 1, 1 + number % 2))  # 4 or 8 atoms
        symbols = atoms.get_chemical_symbols()
        symbols[number % len(symbols)] = "Au"
        atoms.set_chemical_symbols(symbols)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(labelled(atoms, "bulk"))
    n_atoms = sum(len(a) for a in frames)
    member = ArraysBackend(frames, energies=rng.normal(size=len(frames)),
                           forces=rng.normal(size=(n_atoms, 3)),
                           descriptors=rng.normal(size=(n_atoms, 5)))
    return write_run(path, frames[:10], frames[10:], {"model_0": member}), frames


def test_worker_outputs_equal_backend_outputs(client, tmp_path):
    from mlipuq.backends.registry import load
    from mlipuq.distributed.descriptors import model_loads, open_outputs, worker_outputs

    run, frames = _cu_au_run(tmp_path / "run")
    query = frames[::-1]  # not the stored order
    expected = load(run, "model_0").outputs(query)
    got = worker_outputs(run, query, tmp_path / "outputs", client, shard_frames=3)
    assert isinstance(got.descriptors, da.Array) and len(got.descriptors.chunks[0]) == 5
    for field in ("species", "config_index", "energies", "descriptors", "forces"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                      getattr(expected, field))
    reopened = open_outputs(tmp_path / "outputs")
    np.testing.assert_array_equal(np.asarray(reopened.descriptors), expected.descriptors)
    # each worker process loaded the member at most once for its shards
    loads = client.run(model_loads)
    assert sum(sum(c.values()) for c in loads.values()) <= len(loads)
    worker_outputs(run, query[:4], tmp_path / "outputs", client, shard_frames=3)
    assert sum(sum(c.values()) for c in client.run(model_loads).values()) <= len(loads)
    with pytest.raises(InputError, match="configuration 0 .*no stored prediction"):
        from ase.build import bulk

        worker_outputs(run, [bulk("Cu", cubic=True)], tmp_path / "other", client)
    assert not (tmp_path / "other").exists()


def test_worker_descriptors_feed_the_distributed_fit(client, tmp_path):
    from mlipuq.distributed.descriptors import worker_outputs

    run, frames = _cu_au_run(tmp_path / "run")
    got = worker_outputs(run, frames, tmp_path / "outputs", client, shard_frames=4)
    fitted = DOptimalityEstimator().fit_distributed(got, client=client)
    local = DOptimalityEstimator().fit(
        ModelOutputs(species=got.species, config_index=got.config_index,
                     descriptors=np.asarray(got.descriptors)))
    for element in ("Au", "Cu"):
        gamma = fitted.gamma(np.asarray(got.descriptors), got.species)
        assert gamma[got.species == element].max() <= TOL * (1 + 1e-9)
        assert fitted.active_sets_[element].shape == local.active_sets_[element].shape
