"""FAISS index construction, search against brute force, recall, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq import InputError
from mlipuq.knn_index import (
    build_index,
    choose_kind,
    default_nlist,
    default_nprobe,
    default_pq_m,
    faiss_threads,
    index_kind,
    load_index,
    save_index,
    search,
    set_search_params,
)


def clustered(rng: np.random.Generator, n: int, dim: int, n_clusters: int = 50) -> np.ndarray:
    """Gaussian mixture: unit-normal centres, 0.3 spread (float32, shape (n, dim))."""
    centres = rng.normal(size=(n_clusters, dim))
    labels = rng.integers(n_clusters, size=n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in float64 numpy: squared distances and indices, ascending."""
    sq = ((queries[:, None, :].astype(float) - train[None, :, :].astype(float)) ** 2).sum(-1)
    order = np.argsort(sq, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sq, order, axis=1), order


def recall(reference: np.ndarray, found: np.ndarray) -> float:
    """Mean fraction of the reference neighbours that were found (recall@k)."""
    k = reference.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(reference, found, strict=True)]))


def test_flat_search_equals_brute_force(rng):
    train = rng.normal(size=(1500, 16)).astype(np.float32)
    queries = rng.normal(size=(120, 16)).astype(np.float32)
    index = build_index(train, kind="flat")
    sq, found = search(index, queries, 7)
    sq_ref, expected = brute_force(train, queries, 7)
    assert found.shape == (120, 7) and found.dtype == np.int64
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(sq, sq_ref, rtol=1e-4, atol=1e-4)


def test_hnsw_recall_against_flat_on_clustered_data():
    rng = np.random.default_rng(7)
    data = clustered(rng, 20_500, 32)
    train, queries = data[:20_000], data[20_000:]
    _, exact = search(build_index(train, kind="flat"), queries, 5)
    hnsw = build_index(train, kind="hnsw", hnsw_m=32, ef_construction=40, ef_search=16)
    assert (hnsw.hnsw.efSearch, hnsw.hnsw.efConstruction, index_kind(hnsw)) == (16, 40, "hnsw")
    _, approx = search(hnsw, queries, 5)
    assert recall(exact, approx) >= 0.95  # measured 0.98 at efSearch=16
    set_search_params(hnsw, ef_search=64)
    _, better = search(hnsw, queries, 5)
    assert recall(exact, better) >= recall(exact, approx)


def test_ivfflat_recall_and_defaults_on_clustered_data():
    rng = np.random.default_rng(11)
    data = clustered(rng, 8_300, 16, n_clusters=40)
    train, queries = data[:8_000], data[8_000:]
    _, exact = search(build_index(train, kind="flat"), queries, 5)
    index = build_index(train, kind="auto", seed=0)
    assert index_kind(index) == "ivfflat"
    assert (index.nlist, index.nprobe) == (89, default_nprobe("ivfflat", 89)) == (89, 5)
    sq, approx = search(index, queries, 5)
    assert recall(exact, approx) >= 0.95
    # distances are exact (full vectors): equal to the flat ones wherever the row is found
    flat_sq, _ = search(build_index(train, kind="flat"), queries, 5)
    found = approx == exact
    np.testing.assert_allclose(sq[found], flat_sq[found], rtol=1e-4, atol=1e-5)
    set_search_params(index, nprobe=index.nlist)  # every list: exact search
    assert recall(exact, search(index, queries, 5)[1]) == 1.0
    with pytest.raises(InputError, match="ivfflat needs at least nlist=50 training rows"):
        build_index(train[:40], kind="ivfflat", ivf_nlist=50)


def test_ivfpq_finds_most_neighbours_and_checks_its_parameters():
    rng = np.random.default_rng(3)
    data = clustered(rng, 6_100, 16, n_clusters=20)
    train, queries = data[:6_000], data[6_000:]
    _, exact = search(build_index(train, kind="flat"), queries, 5)
    index = build_index(train, kind="ivfpq", ivf_nlist=16, pq_m=4, nprobe=16, seed=0)
    assert index_kind(index) == "ivfpq" and index.nprobe == 16 and index.ntotal == 6_000
    sq, approx = search(index, queries, 5)
    assert recall(exact, approx) >= 0.4  # 8-byte codes: approximate by design
    assert np.all(np.diff(sq, axis=1) >= 0)
    with pytest.raises(InputError, match="pq_m: must divide the descriptor size 16, got 5"):
        build_index(train, kind="ivfpq", ivf_nlist=16, pq_m=5)
    with pytest.raises(InputError, match="ivfpq needs at least 256 training rows"):
        build_index(train[:100], kind="ivfpq", ivf_nlist=2, pq_m=4)


def test_size_rule_and_defaults():
    assert [choose_kind(n) for n in (1, 999, 1_000, 49_999, 50_000, 4_999_999, 5_000_000)] == [
        "flat", "flat", "ivfflat", "ivfflat", "hnsw", "hnsw", "ivfpq"
    ]
    assert default_nprobe("ivfpq", 4000) == 16 and default_nprobe("ivfpq", 8) == 8
    assert default_nprobe("ivfflat", 30) == 4 and default_nprobe("ivfflat", 224) == 14
    assert index_kind(build_index(np.eye(4, dtype=np.float32))) == "flat"
    assert default_pq_m(32) == 8 and default_pq_m(30) == 6 and default_pq_m(3) == 1
    assert default_nlist(1_000_000) == 4000 and default_nlist(10) == 1


def test_save_load_gives_identical_search(tmp_path, rng):
    train = clustered(rng, 3000, 12)
    queries = clustered(rng, 50, 12)
    for kind in ("flat", "ivfflat", "hnsw"):
        index = build_index(train, kind=kind, ef_search=24)
        save_index(index, tmp_path / f"{kind}.faiss")
        loaded = load_index(tmp_path / f"{kind}.faiss")
        assert index_kind(loaded) == kind
        for a, b in zip(search(index, queries, 4), search(loaded, queries, 4), strict=True):
            np.testing.assert_array_equal(a, b)
    assert load_index(tmp_path / "hnsw.faiss").hnsw.efSearch == 24


def test_threads_are_set_only_inside_the_block():
    import faiss

    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before


def test_bad_input(tmp_path, rng):
    index = build_index(rng.normal(size=(20, 8)), kind="flat")
    with pytest.raises(InputError, match="descriptors: expected 8 features per row, got 6"):
        search(index, rng.normal(size=(3, 6)), 2)
    with pytest.raises(InputError, match=r"k: expected 1 <= k <= 20 \(indexed rows\), got 21"):
        search(index, rng.normal(size=(3, 8)), 21)
    queries = rng.normal(size=(3, 8))
    queries[1, 2] = np.nan
    with pytest.raises(InputError, match="descriptors: contains 1 NaN"):
        search(index, queries, 2)
    with pytest.raises(InputError, match="descriptors: is empty"):
        build_index(np.empty((0, 8)))
    with pytest.raises(InputError, match="index: expected one of auto, flat, ivfflat, hnsw, ivfpq"):
        build_index(rng.normal(size=(5, 8)), kind="lsh")
    with pytest.raises(InputError, match="n_threads: expected a positive integer, got 0"):
        build_index(rng.normal(size=(5, 8)), n_threads=0)
    (tmp_path / "junk.faiss").write_text("not an index")
    with pytest.raises(InputError, match="not a readable FAISS index"):
        load_index(tmp_path / "junk.faiss")
    with pytest.raises(InputError, match="index file not found"):
        load_index(tmp_path / "missing.faiss")
