"""MaxVol and the extrapolation grade against brute force and direct formulas."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from mlipuq.exceptions import InputError
from mlipuq.maxvol import active_set_inverse, extrapolation_grade, maxvol

SLACK = 1e-9


def _abs_det(matrix: np.ndarray, rows: np.ndarray) -> float:
    return abs(float(np.linalg.det(matrix[rows])))


def _grade(matrix: np.ndarray, rows: np.ndarray, projection=None) -> np.ndarray:
    return extrapolation_grade(matrix, active_set_inverse(matrix[rows], projection))


def _best_swap_ratio(matrix: np.ndarray, rows: np.ndarray) -> float:
    """Largest |det| growth from replacing one active row by any other row (brute force)."""
    base = _abs_det(matrix, rows)
    best = 0.0
    for slot in range(len(rows)):
        for candidate in range(len(matrix)):
            trial = rows.copy()
            trial[slot] = candidate
            best = max(best, _abs_det(matrix, trial) / base)
    return best


@pytest.mark.parametrize("shape", [(9, 3), (10, 4)])
def test_maxvol_against_brute_force(rng, shape):
    n, d = shape
    hits = 0
    for _ in range(15):
        x = rng.normal(size=shape)
        result = maxvol(x, tol=1.01)
        best = max(_abs_det(x, list(c)) for c in itertools.combinations(range(n), d))
        got = _abs_det(x, result.indices)
        # A dominant submatrix (all |coefficients| <= tol) is within (tol*sqrt(d))^d of the max
        # (Hadamard's inequality); no single swap grows the volume by more than tol.
        assert got >= best / (1.01 * np.sqrt(d)) ** d
        assert _best_swap_ratio(x, result.indices) <= 1.01 + SLACK
        assert result.max_coefficient <= 1.01 + SLACK
        hits += got >= best / 1.01**d
    # the local maximum is the global one (within tol^d) in most random cases
    assert hits >= 12


def test_training_rows_have_gamma_below_tol(rng):
    x = rng.normal(size=(500, 8)) * rng.uniform(0.1, 10.0, size=8)
    for tol in (1.0, 1.01, 1.5):
        result = maxvol(x, tol=tol)
        gamma = _grade(x, result.indices)
        assert gamma.max() <= tol + SLACK
        np.testing.assert_allclose(gamma[result.indices], 1.0, atol=1e-10)


def test_gamma_formula_matches_direct_solve(rng):
    x = rng.normal(size=(60, 5))
    rows = maxvol(x).indices
    test = rng.normal(size=(7, 5)) * 3
    direct = np.abs(np.linalg.solve(x[rows].T, test.T).T).max(axis=1)
    np.testing.assert_allclose(extrapolation_grade(test, np.linalg.inv(x[rows])), direct)
    np.testing.assert_allclose(
        extrapolation_grade(test, np.linalg.inv(x[rows]), batch_size=2), direct
    )


def test_row_order_invariance(rng):
    x = rng.normal(size=(40, 4))
    test = rng.normal(size=(25, 4)) * 2
    first = maxvol(x, tol=1.0)
    perm = rng.permutation(len(x))
    second = maxvol(x[perm], tol=1.0)
    det_a, det_b = _abs_det(x, first.indices), _abs_det(x[perm], second.indices)
    if set(first.indices.tolist()) == set(perm[second.indices].tolist()):
        np.testing.assert_allclose(det_a, det_b, rtol=1e-10)
        np.testing.assert_allclose(
            _grade_on(x, first.indices, test), _grade_on(x[perm], second.indices, test)
        )
    else:  # two different local maxima: both dominate every training row
        assert max(det_a, det_b) / min(det_a, det_b) <= (np.sqrt(4) * 1.0) ** 4


def _grade_on(train, rows, test):
    return extrapolation_grade(test, active_set_inverse(train[rows]))


def test_row_order_invariance_with_unique_maximum(rng):
    """With D dominant rows, every order and batch size selects the same set."""
    d = 6
    x = rng.normal(size=(300, d)) * 0.1
    big = rng.choice(300, size=d, replace=False)
    x[big] = np.eye(d) * 5 + rng.normal(size=(d, d)) * 0.1
    test = rng.normal(size=(20, d))
    reference = _grade_on(x, maxvol(x).indices, test)
    for _ in range(3):
        perm = rng.permutation(300)
        rows = maxvol(x[perm]).indices
        assert set(perm[rows].tolist()) == set(big.tolist())
        np.testing.assert_allclose(_grade_on(x[perm], rows, test), reference, rtol=1e-10)
    batched = maxvol(x, batch_size=40)
    assert set(batched.indices.tolist()) == set(big.tolist())


def test_active_row_has_gamma_one(rng):
    x = rng.normal(size=(50, 5))
    rows = maxvol(x).indices
    gamma = extrapolation_grade(x[rows], active_set_inverse(x[rows]))
    np.testing.assert_allclose(gamma, 1.0, atol=1e-10)
    # a scaled active row has gamma = the scale factor
    np.testing.assert_allclose(
        extrapolation_grade(3 * x[rows[:1]], active_set_inverse(x[rows])), 3.0, rtol=1e-10
    )


def test_rank_deficient_input_is_projected_with_warning(rng):
    base = rng.normal(size=(80, 3))
    x = np.c_[base, base[:, 0] + base[:, 1], np.zeros(80)]  # rank 3 in 5 columns
    with pytest.warns(UserWarning, match="numerical rank 3 < 5"):
        result = maxvol(x)
    assert result.rank == 3 and result.projection.shape == (5, 3)
    assert len(result.indices) == 3
    gamma = _grade(x, result.indices, result.projection)
    assert gamma.max() <= 1.01 + SLACK
    # the pinv-like inverse without the projection gives the same gamma on the span
    np.testing.assert_allclose(gamma, _grade(x, result.indices), rtol=1e-8)


def test_fewer_rows_than_features(rng):
    x = rng.normal(size=(4, 10))
    with pytest.warns(UserWarning, match="numerical rank 4 < 10"):
        result = maxvol(x)
    assert sorted(result.indices.tolist()) == [0, 1, 2, 3]
    gamma = _grade(x, result.indices, result.projection)
    np.testing.assert_allclose(gamma, 1.0, atol=1e-10)
    # a combination of training rows has gamma = max |coefficient|
    combo = (0.5 * x[0] - 2.0 * x[3])[None]
    np.testing.assert_allclose(
        extrapolation_grade(combo, active_set_inverse(x[result.indices], result.projection)),
        2.0,
        rtol=1e-8,
    )


def test_batch_mode(rng):
    d = 8
    x = rng.normal(size=(3000, d)) * rng.uniform(0.5, 2.0, size=d)
    dense = maxvol(x)
    for batch in (64, 500):
        batched = maxvol(x, batch_size=batch)
        assert batched.converged
        gamma = _grade(x, batched.indices)
        assert gamma.max() <= 1.01 + SLACK
        ratio = _abs_det(x, batched.indices) / _abs_det(x, dense.indices)
        # both are dominant in the same rows, so neither can be much larger (Hadamard bound)
        # (different local maxima: |det| within tol^d of each other is NOT guaranteed)
        assert (1.01 * np.sqrt(d)) ** -d <= ratio <= (1.01 * np.sqrt(d)) ** d


def test_batch_mode_rank_deficient_first_chunk(rng):
    """First chunks span only 2 of 4 directions: the batch start waits for more rows."""
    d = 4
    x = np.zeros((400, d))
    x[:200, :2] = rng.normal(size=(200, 2))
    x[200:] = rng.normal(size=(200, d))
    result = maxvol(x, batch_size=50)
    assert result.converged and result.rank == d
    assert _grade(x, result.indices).max() <= 1.01 + SLACK


def test_max_iters_stops_with_warning(rng):
    x = rng.normal(size=(2000, 10))
    with pytest.warns(UserWarning, match="max_iters=1"):
        result = maxvol(x, max_iters=1, tol=1.0)
    assert result.n_swaps == 1 and not result.converged


def test_bad_inputs():
    with pytest.raises(InputError, match="features: contains 1 NaN"):
        maxvol(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(InputError, match="features: expected a 2-d array"):
        maxvol(np.ones(3))
    with pytest.raises(InputError, match="tol: expected a value >= 1"):
        maxvol(np.eye(2), tol=0.5)
    with pytest.raises(InputError, match="numerical rank 0"):
        maxvol(np.zeros((5, 2)))
    with pytest.raises(InputError, match=r"features: expected shape \(n, 2\)"):
        extrapolation_grade(np.ones((3, 3)), np.eye(2))


# --------------------------------------------------------------------------- fast paths


def _reference_maxvol(x: np.ndarray, tol: float = 1.01) -> np.ndarray:
    """Textbook MaxVol: LU-pivoted start on the column-scaled rows, then greedy swaps
    with C = X A^{-1} recomputed from scratch after every swap (no rank-1 updates)."""
    import scipy.linalg

    scaled = x / np.sqrt(np.mean(x * x, axis=0))
    d = x.shape[1]
    perm, _, _ = scipy.linalg.lu(scaled, p_indices=True)
    rows = np.array([int(np.flatnonzero(perm == k)[0]) for k in range(d)])
    while True:
        coef = np.abs(scaled @ np.linalg.inv(scaled[rows]))
        p, q = np.unravel_index(coef.argmax(), coef.shape)
        if coef[p, q] <= tol * (1 + 1e-12):
            return rows
        rows[q] = p


@pytest.mark.parametrize("shape", [(50, 5), (400, 12), (3000, 24)])
def test_maxvol_volume_at_least_the_reference_implementation(rng, shape):
    for _ in range(3):
        x = rng.normal(size=shape) @ rng.normal(size=(shape[1], shape[1]))
        got = maxvol(x)
        reference = _reference_maxvol(x)
        assert got.projection is None and got.converged
        assert _abs_det(x, got.indices) >= _abs_det(x, reference) * (1 - 1e-9)


def test_swap_loop_chunking_does_not_change_the_result(rng, monkeypatch):
    """The fused update + search runs over row chunks; tiny chunks give the same rows."""
    import mlipuq.maxvol as module

    x = rng.normal(size=(700, 9)) * rng.uniform(0.1, 10.0, size=9)
    default = maxvol(x, tol=1.0)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 9 * 7)  # 7-row chunks, ragged last one
    chunked = maxvol(x, tol=1.0)
    np.testing.assert_array_equal(chunked.indices, default.indices)
    assert chunked.n_swaps == default.n_swaps > 0
    np.testing.assert_allclose(chunked.max_coefficient, default.max_coefficient, rtol=1e-12)


def test_fortran_ordered_input_gives_the_same_rows(rng):
    x = rng.normal(size=(300, 7))
    np.testing.assert_array_equal(maxvol(np.asfortranarray(x)).indices, maxvol(x).indices)


def test_full_rank_without_certificate_is_not_projected(rng):
    """sigma_min / sigma_max ~ 1.4e-3 > rank_rtol = 3e-4, but too close for the cheap
    certificate: the rank is computed, found full, and the MaxVol rows are kept."""
    import mlipuq.maxvol as module

    q1, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    q2, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    x = rng.normal(size=(2000, 6)) @ (q1 * np.geomspace(1.0, 1e-3, 6)) @ q2
    scale, frobenius = module._column_stats(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = maxvol(x, rank_rtol=3e-4)
    assert not module._certified_full_rank(x[result.indices] / scale, 3e-4 * frobenius)
    assert result.rank == 6 and result.projection is None and result.converged
    np.testing.assert_array_equal(result.indices, maxvol(x).indices)
    assert _grade(x, result.indices).max() <= 1.01 + SLACK


def test_rank_deficient_batch_mode_is_projected(rng):
    base = rng.normal(size=(1200, 4))
    x = np.c_[base, base @ rng.normal(size=(4, 2))]  # rank 4 in 6 columns
    with pytest.warns(UserWarning, match="numerical rank 4 < 6"):
        result = maxvol(x, batch_size=256)
    assert result.rank == 4 and result.projection.shape == (6, 4) and result.converged
    assert _grade(x, result.indices, result.projection).max() <= 1.01 + SLACK


def test_extrapolation_grade_equals_the_direct_formula(rng):
    x = rng.normal(size=(5000, 12))
    inverse = rng.normal(size=(12, 12))
    direct = np.abs(x @ inverse).max(axis=1)
    for batch_size in (1, 7, 4096, 10**6):
        np.testing.assert_allclose(
            extrapolation_grade(x, inverse, batch_size=batch_size), direct, rtol=1e-12
        )
    fortran = np.asfortranarray(x)
    np.testing.assert_allclose(extrapolation_grade(fortran, inverse), direct, rtol=1e-12)
    narrow = inverse[:, :5]  # rank-reduced active set: (D, r) with r < D
    np.testing.assert_allclose(
        extrapolation_grade(x, narrow), np.abs(x @ narrow).max(axis=1), rtol=1e-12
    )
    rows = rng.choice(5000, size=777, replace=False)
    np.testing.assert_allclose(
        extrapolation_grade(x, inverse, rows=rows, batch_size=100), direct[rows], rtol=1e-12
    )
    assert extrapolation_grade(x[:0], inverse).shape == (0,)
    for bad in ([5000], [-1], [[0]]):
        with pytest.raises(InputError, match=r"rows: expected a 1-d array of row indices"):
            extrapolation_grade(x, inverse, rows=bad)


def test_extrapolation_grade_by_group_equals_per_group_formula(rng):
    from mlipuq.maxvol import extrapolation_grade_by_group

    x = rng.normal(size=(3000, 8))
    species = rng.choice(["Cu", "O", "H"], size=3000)
    inverses = {el: rng.normal(size=(8, 8)) for el in ("Cu", "O", "H", "Zn")}
    expected = np.empty(3000)
    for el in ("Cu", "O", "H"):
        mask = species == el
        expected[mask] = np.abs(x[mask] @ inverses[el]).max(axis=1)
    for batch_size in (5, 8192):
        got = extrapolation_grade_by_group(x, species, inverses, batch_size=batch_size)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    single = extrapolation_grade_by_group(x, np.full(3000, "O"), inverses)
    np.testing.assert_allclose(single, np.abs(x @ inverses["O"]).max(axis=1), rtol=1e-12)
    numbers = np.where(species == "Cu", 29, 8)
    got = extrapolation_grade_by_group(x, numbers, {29: inverses["Cu"], 8: inverses["O"]})
    np.testing.assert_allclose(
        got, np.where(species == "Cu", np.abs(x @ inverses["Cu"]).max(1),
                      np.abs(x @ inverses["O"]).max(1)), rtol=1e-12
    )
    many = rng.integers(0, 90, size=3000)  # more labels than the per-label scans
    scaled = {k: np.eye(8) * (k + 1) for k in range(90)}
    np.testing.assert_allclose(
        extrapolation_grade_by_group(x, many, scaled), np.abs(x).max(axis=1) * (many + 1)
    )
    with pytest.raises(InputError, match=r"label\(s\) \['Fe'\] have no inverse"):
        extrapolation_grade_by_group(x[:2], np.array(["Cu", "Fe"]), inverses)
    with pytest.raises(InputError, match=r"groups: expected shape \(3000,\)"):
        extrapolation_grade_by_group(x, species[:10], inverses)
