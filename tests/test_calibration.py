"""Automatic LTAU scale-factor calibration on synthetic data with a known answer.

Synthetic model: atom i has a predicted p_i, and its "base" error is
atol * X_i / m_i with X_i ~ Exp(1) and m_i = -ln(1 - p_i), so that
P(base_i <= atol) = 1 - exp(-m_i) = p_i exactly: p is calibrated at s = 1.
Errors s_true * base are then calibrated at threshold atol * s_true.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.calibration import (
    calibrate,
    fit_group_scales,
    fit_scale,
    scales_for_atoms,
    split_calibration,
)
from mlipuq.exceptions import InputError
from mlipuq.metrics import ece

ATOL = 0.01


def synthetic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = rng.uniform(0.02, 0.98, n)
    m = -np.log1p(-p)
    base = ATOL * rng.exponential(size=n) / m
    return p, m, base


def test_base_errors_are_calibrated_at_s1(rng):
    p, _, base = synthetic(rng, 20_000)
    assert ece(p, base, ATOL) < 0.02


@pytest.mark.parametrize("s_true", [0.5, 2.0, 4.0])
def test_fit_scale_recovers_known_scale(rng, s_true):
    p, _, base = synthetic(rng, 20_000)
    s = fit_scale(lambda _s: p, s_true * base, ATOL)
    assert s == pytest.approx(s_true, rel=0.05)
    assert ece(p, s_true * base, ATOL * s) < 0.02


def test_fit_scale_when_predict_p_folds_in_the_scale(rng):
    # p(s) = P(s * base <= atol) = 1 - exp(-m / s): the threshold stays atol
    p, m, base = synthetic(rng, 20_000)
    s = fit_scale(lambda s: 1.0 - np.exp(-m / s), 3.0 * base, ATOL, threshold_scales=False)
    assert s == pytest.approx(3.0, rel=0.05)


def test_fit_scale_accepts_the_p_array(rng):
    p, _, base = synthetic(rng, 20_000)
    assert fit_scale(p, 2.0 * base, ATOL) == pytest.approx(
        fit_scale(lambda _s: p, 2.0 * base, ATOL)
    )


def test_wrong_convention_ends_on_the_bound_and_warns(rng):
    # unscaled CDF at atol * s against errors at atol * s: both sides -> 0 as s -> 0
    # and -> 1 as s grows, so the ECE is smallest at a bound (degenerate)
    p, m, base = synthetic(rng, 5_000)
    with pytest.warns(UserWarning, match="search bound"):
        s = fit_scale(lambda s: 1.0 - np.exp(-m * s), 2.0 * base, ATOL)
    assert s < 0.11 or s > 19.0


def test_fit_scale_with_ltau_estimator(rng):
    # End to end with LTAUEstimator (k=1 on its own training descriptors): training
    # errors of atom i ~ width_i * Exp(1) over 200 epochs, test errors 2.5x larger.
    pytest.importorskip("faiss")
    from mlipuq.ltau import LTAUEstimator

    n, s_true = 2_000, 2.5
    desc = rng.normal(size=(n, 4)).astype(np.float32)
    width = 0.01 * np.exp(rng.normal(size=n))
    est = LTAUEstimator(k=1, index="flat").fit_arrays(
        rng.exponential(size=(200, n)) * width, desc, ["H"] * n
    )
    p = est.predict_arrays(desc, ["H"] * n, scale=1.0).extras["p"]
    test_errors = s_true * rng.exponential(size=n) * width
    assert fit_scale(p, test_errors, est.atol_) == pytest.approx(s_true, rel=0.08)


def test_fit_scale_coarse_grid_escapes_a_local_minimum():
    # ECE(s) for p = 0.5 everywhere and errors at 1 and 10 (x atol):
    # observed = 0 for s < 1, 0.5 for 1 <= s < 10, 1 above -> minimum on [1, 10)
    errors = ATOL * np.array([1.0, 10.0] * 50)
    s = fit_scale(lambda _s: np.full(100, 0.5), errors, ATOL, bounds=(0.1, 20.0))
    assert 1.0 <= s < 10.0
    assert ece(np.full(100, 0.5), errors, ATOL * s) == pytest.approx(0.0)


def test_fit_group_scales_recovers_two_scales(rng):
    p, _, base = synthetic(rng, 30_000)
    groups = np.where(np.arange(len(p)) % 2 == 0, "bulk", "surface")
    errors = np.where(groups == "bulk", 2.0, 3.5) * base
    scales = fit_group_scales(lambda _s: p, errors, ATOL, groups)
    assert set(scales) == {"bulk", "surface"}
    assert scales["bulk"] == pytest.approx(2.0, rel=0.05)
    assert scales["surface"] == pytest.approx(3.5, rel=0.05)


def test_small_groups_fall_back_to_global_scale(rng):
    p, _, base = synthetic(rng, 5_000)
    groups = np.array(["big"] * 4_990 + ["tiny"] * 10)
    errors = 2.0 * base
    scales = fit_group_scales(lambda _s: p, errors, ATOL, groups, min_group_size=100)
    assert scales["tiny"] == pytest.approx(fit_scale(lambda _s: p, errors, ATOL))
    scales = fit_group_scales(lambda _s: p, errors, ATOL, groups, default=1.7)
    assert scales["tiny"] == 1.7
    assert scales["big"] == pytest.approx(2.0, rel=0.05)


def test_scales_for_atoms():
    out = scales_for_atoms({"a": 2.0, "b": 3.0}, np.array(["b", "c", "a", "b"]), default=1.5)
    np.testing.assert_array_equal(out, [3.0, 1.5, 2.0, 3.0])


def test_split_calibration_atoms_and_configs():
    cal, test = split_calibration(10, 0.3, seed=1)
    assert len(cal) == 3 and len(test) == 7
    np.testing.assert_array_equal(np.sort(np.concatenate([cal, test])), np.arange(10))
    cal2, _ = split_calibration(10, 0.3, seed=1)
    np.testing.assert_array_equal(cal, cal2)  # reproducible
    ci = np.repeat(np.arange(6), 3)
    cal, test = split_calibration(18, 0.5, seed=0, config_index=ci)
    assert len(np.unique(ci[cal])) == 3
    assert not set(ci[cal]) & set(ci[test])  # whole configurations


def test_calibrate_reports_before_and_after(rng):
    p, _, base = synthetic(rng, 20_000)
    errors = 2.5 * base
    cal, test = split_calibration(len(p), 0.5, seed=3)
    result = calibrate(lambda _s: p, errors, ATOL, cal_index=cal, test_index=test)
    assert result.scale == pytest.approx(2.5, rel=0.05)
    assert result.ece_before == pytest.approx(ece(p[test], errors[test], ATOL))
    assert result.ece_before > 0.15
    assert result.ece_after == pytest.approx(ece(p[test], errors[test], ATOL * result.scale))
    assert result.ece_after < 0.02
    assert (result.n_calibration, result.n_test) == (10_000, 10_000)
    assert result.as_dict()["group_scales"] == {}


def test_calibrate_with_groups_uses_per_atom_scales(rng):
    p, _, base = synthetic(rng, 20_000)
    groups = np.where(np.arange(len(p)) % 2 == 0, "a", "b")
    errors = np.where(groups == "a", 1.5, 4.0) * base
    cal, test = split_calibration(len(p), 0.5, seed=4)
    seen = []

    def predict_p(scale):
        seen.append(np.ndim(scale))
        return p

    result = calibrate(predict_p, errors, ATOL, cal_index=cal, test_index=test, groups=groups)
    assert 1 in seen  # called once with the per-atom scale array
    assert result.group_scales["a"] == pytest.approx(1.5, rel=0.05)
    assert result.group_scales["b"] == pytest.approx(4.0, rel=0.05)
    s_atoms = scales_for_atoms(result.group_scales, groups)
    assert result.ece_after == pytest.approx(ece(p[test], errors[test], ATOL * s_atoms[test]))
    assert result.ece_after < 0.03 < result.ece_before
    assert set(result.ece_after_by_group) == {"a", "b"}
    assert max(result.ece_after_by_group.values()) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"atol": 0.0}, "atol"),
        ({"bounds": (2.0, 1.0)}, "bounds"),
        ({"errors": np.array([])}, "errors: is empty"),
        ({"errors": np.array([0.1, -0.1, 0.1])}, "negative"),
        ({"predict": lambda s: np.full(2, 0.5)}, "predict_p: returned shape"),
    ],
)
def test_fit_scale_bad_input(kwargs, match):
    errors = kwargs.get("errors", np.array([0.1, 0.2, 0.3]))
    predict = kwargs.get("predict", lambda s: np.full(len(errors), 0.5))
    with pytest.raises(InputError, match=match):
        fit_scale(predict, errors, kwargs.get("atol", ATOL), bounds=kwargs.get("bounds", (0.1, 20)))


def test_calibrate_and_split_bad_input():
    errors = np.full(4, 0.01)
    with pytest.raises(InputError, match="overlap"):
        calibrate(
            lambda s: np.full(4, 0.5),
            errors,
            ATOL,
            cal_index=np.array([0, 1]),
            test_index=np.array([1, 2]),
        )
    with pytest.raises(InputError, match="out of range"):
        calibrate(
            lambda s: np.full(4, 0.5),
            errors,
            ATOL,
            cal_index=np.array([0, 9]),
            test_index=np.array([2]),
        )
    with pytest.raises(InputError, match="groups"):
        fit_group_scales(lambda s: np.full(4, 0.5), errors, ATOL, ["a"])
    with pytest.raises(InputError, match="fraction"):
        split_calibration(10, 1.0)
    with pytest.raises(InputError, match="2 configurations"):
        split_calibration(3, 0.5, config_index=np.zeros(3, int))
