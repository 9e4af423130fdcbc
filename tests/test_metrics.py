"""Metrics against hand-computed values (each expected number is worked out in a comment)."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq import metrics
from mlipuq.exceptions import InputError


def test_spearman_hand_value():
    # ranks of e: 1,3,2,4 vs 1,2,3,4 -> d^2 sum = 2 -> 1 - 6*2/(4*15) = 0.8
    assert metrics.spearman([0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    # perfectly reversed ranking
    assert metrics.spearman([1, 2, 3], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_spearman_with_ties_equals_pearson_of_average_ranks():
    # u ranks 1,2,3; e = (0.25, 0.25, 0.5) -> average ranks 1.5, 1.5, 3
    # Pearson: cov 1.5, var 2 and 1.5 -> 1.5 / sqrt(3) = 0.866025
    assert metrics.spearman([1.5, 2.5, 3.0], [0.25, 0.25, 0.5]) == pytest.approx(0.8660254)


def test_spearman_constant_or_single_is_nan():
    assert np.isnan(metrics.spearman([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.spearman([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))
    assert np.isnan(metrics.spearman([1.0], [0.5]))


def test_config_spearman_max_and_mean():
    u = [1, 2, 5, 0, 3, 3]
    e = [0.1, 0.4, 0.2, 0.3, 0.9, 0.1]
    ci = [0, 0, 1, 1, 2, 2]
    # max: u (2, 5, 3) ranks 1,3,2; e (0.4, 0.3, 0.9) ranks 2,1,3 -> d^2 = 6 -> 1 - 36/24 = -0.5
    assert metrics.config_spearman(u, e, ci) == pytest.approx(-0.5)
    # mean: u (1.5, 2.5, 3), e (0.25, 0.25, 0.5) -> 0.866025 (see the ties test)
    assert metrics.config_spearman(u, e, ci, aggregate="mean") == pytest.approx(0.8660254)


def test_config_aggregate_skips_missing_configs():
    out = metrics.config_aggregate(np.array([1.0, 4.0, 2.0]), np.array([0, 0, 2]))
    assert out[0] == 4.0 and np.isnan(out[1]) and out[2] == 2.0
    out = metrics.config_aggregate(np.array([1.0, 4.0, 2.0]), np.array([0, 0, 2]), how="mean")
    assert out[0] == 2.5 and out[2] == 2.0
    with pytest.raises(InputError, match="how"):
        metrics.config_aggregate(np.array([1.0]), np.array([0]), how="median")


P = np.array([0.05, 0.15, 0.12, 0.95, 1.0, 0.55])
ERR = np.array([0.5, 0.5, 2.0, 0.1, 3.0, 0.9])


def test_calibration_curve_uniform_hand_values():
    curve = metrics.calibration_curve(P, ERR, 1.0, n_bins=10)
    # bins: 0.05 -> 0; 0.15, 0.12 -> 1; 0.55 -> 5; 0.95, 1.0 -> 9 (last bin closed)
    # hits (err <= 1): 1, 1, 0, 1, 0, 1
    assert curve.counts.tolist() == [1, 2, 0, 0, 0, 1, 0, 0, 0, 2]
    np.testing.assert_allclose(curve.bin_edges, np.linspace(0, 1, 11))
    np.testing.assert_allclose(curve.predicted[[0, 1, 5, 9]], [0.05, 0.135, 0.55, 0.975])
    np.testing.assert_allclose(curve.observed[[0, 1, 5, 9]], [1.0, 0.5, 1.0, 0.5])
    assert np.all(np.isnan(curve.predicted[[2, 3, 4, 6, 7, 8]]))
    # ECE = (1*0.95 + 2*0.365 + 1*0.45 + 2*0.475) / 6 = 3.08 / 6
    assert metrics.expected_calibration_error(curve) == pytest.approx(3.08 / 6)
    assert metrics.ece(P, ERR, 1.0) == pytest.approx(3.08 / 6)


def test_calibration_curve_per_atom_threshold_and_bin_edge():
    # atom 2 (p=0.12, err=2) now within its threshold 3 -> bin 1 observed 1.0
    thr = np.array([1.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    curve = metrics.calibration_curve(P, ERR, thr, n_bins=10)
    assert curve.observed[1] == pytest.approx(1.0)
    # p exactly on an inner edge goes to the right bin (right-open bins)
    edge = metrics.calibration_curve([0.1, 0.5, 0.7, 0.3], [0.0] * 4, 1.0, n_bins=10)
    assert edge.counts.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]


def test_calibration_curve_quantile_strategy():
    # quantile edges of (0.1, 0.2, 0.3, 0.4) with 2 bins: 0.1, 0.25, 0.4
    curve = metrics.calibration_curve(
        [0.1, 0.2, 0.3, 0.4], [0.0, 2.0, 2.0, 0.0], 1.0, n_bins=2, strategy="quantile"
    )
    np.testing.assert_allclose(curve.bin_edges, [0.1, 0.25, 0.4])
    np.testing.assert_allclose(curve.predicted, [0.15, 0.35])
    np.testing.assert_allclose(curve.observed, [0.5, 0.5])
    # ECE = (2*0.35 + 2*0.15) / 4 = 0.25
    assert metrics.expected_calibration_error(curve) == pytest.approx(0.25)


def test_calibration_curve_clips_rounding_above_one():
    # 1 + 1e-7 (float32 histogram sums) is accepted as p = 1 (last bin); 1.01 is not
    curve = metrics.calibration_curve([1.0 + 1e-7, 0.05], [0.0, 0.0], 1.0)
    assert curve.predicted[9] == 1.0 and curve.counts[9] == 1
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        metrics.calibration_curve([1.01], [0.0], 1.0)


def test_calibration_curve_as_dict_is_json_friendly():
    d = metrics.calibration_curve(P, ERR, 1.0, n_bins=10).as_dict()
    assert d["predicted"][2] is None and d["counts"][1] == 2
    assert d["observed"][9] == pytest.approx(0.5)


def test_perfectly_calibrated_synthetic_has_small_ece(rng):
    n = 50_000
    p = rng.uniform(0, 1, n)
    hit = rng.uniform(0, 1, n) < p  # P(error <= atol) = p exactly
    errors = np.where(hit, 0.5, 2.0) * 0.01
    assert metrics.ece(p, errors, 0.01) < 0.02
    # a shifted prediction is clearly miscalibrated: gap 0.3 almost everywhere
    assert metrics.ece(np.clip(p + 0.3, 0, 1), errors, 0.01) > 0.2


def test_sharpness_and_cv():
    assert metrics.sharpness([0.0, 1.0]) == pytest.approx(0.5)
    # std of (0.2, 0.4, 0.6), ddof=0 = sqrt(0.08/3)
    assert metrics.sharpness([0.2, 0.4, 0.6]) == pytest.approx(np.sqrt(0.08 / 3))
    assert metrics.coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)
    assert np.isnan(metrics.coefficient_of_variation([0.0, 0.0]))


def test_detection_rates():
    assert metrics.detection_rate([0.5, 1.0, 1.5, 2.0], 1.0) == 0.5  # strictly above
    rates = metrics.detection_rates_by_group([5.0, 1.0, 2.0, 6.0], 3.0, ["a", "b", "b", "b"])
    assert rates == {"a": 1.0, "b": pytest.approx(1 / 3)}


def test_roc_auc_and_tpr_fpr():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    ood = np.array([False, False, True, True])
    # pairs (ood, id): 0.35>0.1, 0.35<0.4, 0.8>both -> 3/4
    assert metrics.roc_auc(scores, ood) == pytest.approx(0.75)
    assert metrics.roc_auc(scores, [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: 1 pair, tie -> 0.5
    assert metrics.roc_auc([1.0, 1.0], [False, True]) == pytest.approx(0.5)
    # threshold 0.3 flags 0.4, 0.35, 0.8: tpr 2/2, fpr 1/2
    assert metrics.tpr_fpr(scores, ood, 0.3) == (1.0, 0.5)


def test_cost():
    assert metrics.cost_per_atom(2.0, 400) == pytest.approx(0.005)
    assert metrics.relative_cost(0.05, 1.0) == pytest.approx(0.05)
    with pytest.raises(InputError, match="n_atoms"):
        metrics.cost_per_atom(1.0, 0)
    with pytest.raises(InputError, match="forward_seconds"):
        metrics.relative_cost(1.0, 0.0)
    with pytest.raises(InputError, match="seconds"):
        metrics.cost_per_atom(-1.0, 3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: metrics.spearman([], []), "uncertainty: is empty"),
        (lambda: metrics.spearman([1.0, 2.0], [1.0]), "inconsistent numbers"),
        (lambda: metrics.spearman([1.0, np.nan], [1.0, 2.0]), "NaN"),
        (lambda: metrics.config_spearman([1.0, 2.0], [1.0, 2.0], [0]), "config_index"),
        (lambda: metrics.calibration_curve([0.5, 1.2], [0.1, 0.1], 1.0), r"\[0, 1\]"),
        (lambda: metrics.calibration_curve([0.5], [0.1], [1.0, 1.0]), "threshold"),
        (lambda: metrics.calibration_curve([0.5], [0.1], 0.0), "positive"),
        (lambda: metrics.calibration_curve([0.5], [0.1], 1.0, n_bins=0), "n_bins"),
        (lambda: metrics.calibration_curve([0.5], [0.1], 1.0, strategy="x"), "strategy"),
        (lambda: metrics.roc_auc([0.1, 0.2], [True, True]), "only out-of-domain"),
        (lambda: metrics.roc_auc([0.1, 0.2], [False, False]), "only in-domain"),
        (lambda: metrics.roc_auc([0.1, 0.2], [0, 2]), "booleans"),
        (lambda: metrics.tpr_fpr([0.1, 0.2], [False, False], 0.1), "both"),
        (lambda: metrics.detection_rates_by_group([1.0, 2.0], 1.0, ["a"]), "groups"),
    ],
)
def test_bad_input_raises_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call()
