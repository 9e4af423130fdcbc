"""Distance-aware LTAU transfer, stored calibration and fitted threshold."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mlipuq import InputError
from mlipuq.distributions import distributions_from_errors
from mlipuq.ltau import LTAUEstimator

ATOL = 0.1  # eV/Å


def numpy_cdf(mass: np.ndarray, edges: np.ndarray, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """CDF of histogram rows at x: mass of the bins left of x plus the linear share."""
    out = np.empty(len(rows))
    for n, (row, value) in enumerate(zip(rows, x, strict=True)):
        total = 0.0
        for b in range(len(edges) - 1):
            low, high = edges[b], edges[b + 1]
            if value >= high:
                total += mass[row, b]
            elif value > low:
                total += mass[row, b] * (value - low) / (high - low)
        if value <= edges[0]:
            total = 0.0
        out[n] = total
    return out


def make_data(rng, n_configs=40, per_config=6, dim=5):
    """Training set of configurations (one element), two error trajectories."""
    n = n_configs * per_config
    configs = np.repeat(np.arange(n_configs), per_config)
    descriptors = rng.normal(size=(n, dim))
    errors = [rng.gamma(2.0, 0.05, size=(20, n)), rng.gamma(2.0, 0.06, size=(12, n))]
    return errors, descriptors, np.array(["Cu"] * n), configs


def brute_reference(desc: np.ndarray, configs: np.ndarray, k: int) -> float:
    """Median over atoms of the mean distance to the k nearest atoms of other configs."""
    sq = ((desc[:, None, :].astype(float) - desc[None, :, :].astype(float)) ** 2).sum(-1)
    means = []
    for i in range(len(desc)):
        other = np.flatnonzero(configs != configs[i])
        means.append(np.sort(np.sqrt(sq[i, other]))[:k].mean())
    return float(np.median(means))


@pytest.mark.parametrize(("power", "scope"), [(0.5, "configuration"), (1.0, "configuration"),
                                              (2.0, "configuration"), (1.0, "atom"),
                                              (1.0, "both")])
def test_distance_transfer_equals_numpy(rng, power, scope):
    errors, train, species, configs = make_data(rng)
    dists = distributions_from_errors(errors, n_bins=30)
    est = LTAUEstimator(
        k=4, atol=ATOL, distance_power=power, index="flat", distance_scope=scope
    ).fit_arrays(dists, train, species, config_index=configs)
    d_ref = brute_reference(train, configs, 4)
    assert est.reference_distance_["Cu"] == pytest.approx(d_ref, rel=1e-5)

    test = np.vstack([rng.normal(size=(10, 5)), 4.0 * rng.normal(size=(10, 5))])
    test_configs = np.repeat([0, 1, 2, 3], [3, 7, 4, 6])
    result = est.predict_arrays(test, ["Cu"] * 20, scale=1.3, config_index=test_configs)
    sq = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    order = np.argsort(sq, axis=1)[:, :4]
    distance = np.sqrt(np.take_along_axis(sq, order, axis=1)).mean(axis=1)
    z = distance / d_ref
    z_used = z.copy()
    for c in range(4):  # root mean square of z over the configuration
        rms = np.sqrt(np.mean(z[test_configs == c] ** 2))
        if scope == "configuration":
            z_used[test_configs == c] = rms
        elif scope == "both":
            z_used[test_configs == c] = np.maximum(z[test_configs == c], rms)
    s_atom = 1.3 * np.maximum(1.0, z_used) ** power
    limits = np.repeat(ATOL / s_atom, 4)
    p = numpy_cdf(dists.mass, dists.bin_edges, order.ravel(), limits).reshape(20, 4).mean(1)
    np.testing.assert_allclose(result.extras["knn_distance_normalised"], z, rtol=1e-5)
    np.testing.assert_allclose(result.extras["p"], p, atol=1e-6)
    expected = s_atom * (dists.mass @ dists.midpoints)[order].mean(axis=1)
    np.testing.assert_allclose(result.extras["expected_error"], expected, rtol=1e-5)
    # the plain mean is the paper's transfer: the same neighbours at s = 1.3 for every atom
    plain = LTAUEstimator(k=4, atol=ATOL, transfer="mean", index="flat").fit_arrays(
        dists, train, species, config_index=configs
    )
    p_plain = (
        numpy_cdf(dists.mass, dists.bin_edges, order.ravel(), np.full(80, ATOL / 1.3))
        .reshape(20, 4)
        .mean(1)
    )
    np.testing.assert_allclose(
        plain.predict_arrays(test, ["Cu"] * 20, scale=1.3).extras["p"], p_plain, atol=1e-6
    )
    # without config_index the atoms form one configuration
    if scope != "atom":
        alone = est.predict_arrays(test, ["Cu"] * 20, scale=1.3).extras["p"]
        together = est.predict_arrays(
            test, ["Cu"] * 20, scale=1.3, config_index=np.zeros(20, int)
        ).extras["p"]
        np.testing.assert_array_equal(alone, together)


def test_far_atoms_get_lower_p_than_atoms_inside(rng):
    errors, train, species, configs = make_data(rng, n_configs=60)
    est = LTAUEstimator(k=5, atol=ATOL).fit_arrays(errors, train, species, config_index=configs)
    plain = LTAUEstimator(k=5, atol=ATOL, transfer="mean").fit_arrays(
        errors, train, species, config_index=configs
    )
    inside = rng.normal(size=(200, 5))
    far = 6.0 + rng.normal(size=(200, 5))  # shifted away from every training point
    own = np.arange(200)  # one atom per configuration: each atom's own distance counts
    z_in = est.predict_arrays(inside, ["Cu"] * 200).extras["knn_distance_normalised"]
    z_far = est.predict_arrays(far, ["Cu"] * 200).extras["knn_distance_normalised"]
    assert np.median(z_in) < 1.5 < 3.0 < z_far.min()
    p_in = est.predict_arrays(inside, ["Cu"] * 200, config_index=own).extras["p"]
    p_far = est.predict_arrays(far, ["Cu"] * 200, config_index=own).extras["p"]
    assert p_far.max() < np.median(p_in) and p_far.mean() < 0.5 * p_in.mean()
    # the paper's plain mean cannot tell them apart: far atoms inherit their neighbours' p
    q_in = plain.predict_arrays(inside, ["Cu"] * 200).extras["p"]
    q_far = plain.predict_arrays(far, ["Cu"] * 200).extras["p"]
    assert abs(q_far.mean() - q_in.mean()) < 0.1
    # inside the training cloud (z <= 1) the two transfers agree
    near = z_in <= 1.0
    assert near.sum() > 20
    np.testing.assert_allclose(p_in[near], q_in[near])


def test_leave_one_configuration_out_reference(rng):
    """Atoms of one configuration are near each other; d_ref must skip them."""
    n_configs, per_config = 30, 8
    centres = 10.0 * rng.normal(size=(n_configs, 4))
    train = np.repeat(centres, per_config, axis=0) + 0.01 * rng.normal(size=(240, 4))
    configs = np.repeat(np.arange(n_configs), per_config)
    errors = [rng.gamma(2.0, 0.05, size=(10, 240))]
    loco = LTAUEstimator(k=3, atol=ATOL).fit_arrays(
        errors, train, ["W"] * 240, config_index=configs
    )
    alone = LTAUEstimator(k=3, atol=ATOL).fit_arrays(errors, train, ["W"] * 240)
    assert loco.reference_distance_["W"] == pytest.approx(
        brute_reference(train, configs, 3), rel=1e-5
    )
    assert loco.reference_distance_["W"] > 100 * alone.reference_distance_["W"]


def test_calibrate_fits_scale_and_threshold_at_fpr(rng):
    errors, train, species, configs = make_data(rng, n_configs=60)
    est = LTAUEstimator(k=5, atol=ATOL).fit_arrays(errors, train, species, config_index=configs)
    # held-out in-domain atoms whose errors are 2x the training errors
    held = rng.normal(size=(600, 5))
    held_configs = np.repeat(np.arange(100), 6)
    held_errors = 2.0 * rng.gamma(2.0, 0.055, size=600)
    before = est.predict_arrays(held, ["Cu"] * 600).extras["p"]
    est.calibrate_arrays(held, ["Cu"] * 600, held_errors, config_index=held_configs, fpr=0.1)
    cal = est.calibration_
    assert 1.4 < est.scale_ < 2.8 and not cal["at_bound"]
    assert cal["ece_after"] < 0.07 and cal["ece_after"] < 0.5 * cal["ece_before"]
    after = est.predict_arrays(held, ["Cu"] * 600, config_index=held_configs)
    assert np.all(after.extras["p"] <= before + 1e-12)  # larger s: lower p
    # the threshold flags at most 10 % of the held-out configurations, and not far fewer
    flagged = np.mean(after.config_uncertainty > est.threshold_)
    assert 0.05 <= flagged <= 0.10
    assert after.threshold == est.threshold_
    np.testing.assert_array_equal(after.config_flags, after.config_uncertainty > est.threshold_)


@pytest.mark.parametrize(("grows", "allowed"), [(True, (0.75, 1.0, 1.5)), (False, (0.0, 0.25))])
def test_calibrate_chooses_the_distance_power_from_in_domain_data(rng, grows, allowed):
    """Held-out errors that grow with the distance (beta = 1) or do not (beta = 0)."""
    errors, train, species, configs = make_data(rng, n_configs=80)
    est = LTAUEstimator(k=5, atol=ATOL).fit_arrays(errors, train, species, config_index=configs)
    assert est.distance_power_ == 1.0  # before calibration
    spread = np.repeat(rng.uniform(0.5, 3.0, size=150), 4)[:, None]  # near and far configs
    held = spread * rng.normal(size=(600, 5))
    held_configs = np.repeat(np.arange(150), 4)
    z = est.predict_arrays(held, ["Cu"] * 600).extras["knn_distance_normalised"]
    rms = np.sqrt(np.bincount(held_configs, z**2) / 4)[held_configs]
    factor = np.maximum(rms, 1.0) if grows else 1.0
    held_errors = factor * rng.gamma(2.0, 0.055, size=600)
    est.calibrate_arrays(held, ["Cu"] * 600, held_errors, config_index=held_configs)
    assert est.distance_power_ in allowed
    briers = est.calibration_["brier_by_distance_power"]
    assert set(briers) == {"0.0", "0.25", "0.5", "0.75", "1.0", "1.5", "2.0"}
    assert min(briers, key=briers.get) == str(est.distance_power_)
    assert est.calibration_["distance_power_at_grid_end"] == (est.distance_power_ == 2.0)
    # a fixed power is kept
    fixed = LTAUEstimator(k=5, atol=ATOL, distance_power=0.5).fit_arrays(
        errors, train, species, config_index=configs
    )
    fixed.calibrate_arrays(held, ["Cu"] * 600, held_errors, config_index=held_configs)
    assert fixed.distance_power_ == 0.5
    assert list(fixed.calibration_["brier_by_distance_power"]) == ["0.5"]


def test_calibration_at_bound_is_reported(rng):
    errors, train, species, configs = make_data(rng)
    est = LTAUEstimator(k=5, atol=ATOL).fit_arrays(errors, train, species, config_index=configs)
    huge = np.full(120, 50.0)  # errors far beyond anything s <= 20 can explain
    gaps = 2 * configs[:120] + 7  # any integer labels: renumbered
    with pytest.warns(UserWarning, match="at the search bound"):
        est.calibrate_arrays(train[:120], species[:120], huge, config_index=gaps)
    assert est.calibration_["at_bound"] and est.scale_ == pytest.approx(20.0, rel=0.05)
    assert est.calibration_["n_configs"] == len(np.unique(gaps))
    # refused input leaves the fitted calibration as it was
    before = dict(est.calibration_)
    with pytest.raises(InputError, match="fpr: expected a rate in"):
        est.calibrate_arrays(train[:10], species[:10], huge[:10], config_index=gaps[:10], fpr=1.5)
    with pytest.raises(InputError, match="errors: contains negative"):
        est.calibrate_arrays(train[:10], species[:10], -huge[:10], config_index=gaps[:10])
    with pytest.raises(InputError, match="config_index: required"):
        est.calibrate_arrays(train[:10], species[:10], huge[:10], config_index=None)
    with pytest.raises(InputError, match=r"element\(s\) Au not in the training set"):
        est.calibrate_arrays(train[:2], ["Cu", "Au"], huge[:2], config_index=[0, 0])
    assert est.calibration_ == before and est.scale_ == pytest.approx(20.0, rel=0.05)


def test_fitted_threshold_flags_configurations_not_atoms(rng):
    """The fitted threshold is on the mean of 1 - p per configuration."""
    errors, train, species, configs = make_data(rng, n_configs=60)
    est = LTAUEstimator(k=5, atol=ATOL).fit_arrays(errors, train, species, config_index=configs)
    held = rng.normal(size=(240, 5))
    held_configs = np.repeat(np.arange(40), 6)
    est.calibrate_arrays(
        held, ["Cu"] * 240, rng.gamma(2.0, 0.06, size=240), config_index=held_configs
    )
    result = est.predict_arrays(held, ["Cu"] * 240, config_index=held_configs)
    assert result.atom_flags is None and result.threshold == est.threshold_
    np.testing.assert_array_equal(result.config_flags, result.config_uncertainty > est.threshold_)
    # another scale, atol or k: the fitted threshold does not apply
    assert (
        est.predict_arrays(held, ["Cu"] * 240, config_index=held_configs, scale=2.0).threshold
        is None
    )
    assert est.predict_arrays(held, ["Cu"] * 240, k=3).threshold is None
    # a number given by the user flags atoms and configurations
    given = est.predict_arrays(held, ["Cu"] * 240, config_index=held_configs, threshold=0.5)
    np.testing.assert_array_equal(given.atom_flags, given.atom_uncertainty > 0.5)
    # uncalibrated(): the state before calibrate, sharing the indices
    plain = est.uncalibrated()
    assert plain.scale_ == 1.0 and plain.threshold_ is None and plain.distance_power_ == 1.0
    assert plain.indices_ is est.indices_ and est.threshold_ is not None


def test_calibration_round_trips_and_refit_drops_it(tmp_path, rng):
    errors, train, species, configs = make_data(rng)
    est = LTAUEstimator(k=5, atol=ATOL).fit_arrays(errors, train, species, config_index=configs)
    held = rng.normal(size=(120, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        est.calibrate_arrays(
            held,
            ["Cu"] * 120,
            1.5 * rng.gamma(2.0, 0.055, size=120),
            config_index=np.repeat(np.arange(20), 6),
        )
    est.save(tmp_path / "est")
    loaded = LTAUEstimator.load(tmp_path / "est")
    assert loaded.scale_ == est.scale_ and loaded.threshold_ == est.threshold_
    assert loaded.distance_power_ == est.distance_power_
    assert loaded.calibration_ == est.calibration_
    assert loaded.reference_distance_ == pytest.approx(est.reference_distance_)
    test = rng.normal(size=(30, 5))
    a, b = est.predict_arrays(test, ["Cu"] * 30), loaded.predict_arrays(test, ["Cu"] * 30)
    np.testing.assert_array_equal(a.extras["p"], b.extras["p"])
    np.testing.assert_array_equal(a.atom_flags, b.atom_flags)
    # a refit forgets the calibration (it belonged to the old training set)
    est.fit_arrays(errors, train, species, config_index=configs)
    assert est.scale_ == 1.0 and est.threshold_ is None and est.calibration_ is None
    assert est.distance_power_ == 1.0


def test_bad_transfer_parameters(rng):
    errors, train, species, configs = make_data(rng)
    with pytest.raises(InputError, match="transfer: expected one of distance, mean, got 'knn'"):
        LTAUEstimator(transfer="knn").fit_arrays(errors, train, species)
    with pytest.raises(InputError, match="distance_power: expected 'auto' or a finite number"):
        LTAUEstimator(distance_power=-1.0).fit_arrays(errors, train, species)
    with pytest.raises(InputError, match="distance_scope: expected one of configuration, atom"):
        LTAUEstimator(distance_scope="frame").fit_arrays(errors, train, species)
    with pytest.raises(InputError, match="reference_sample: expected a positive integer"):
        LTAUEstimator(reference_sample=0).fit_arrays(errors, train, species)
