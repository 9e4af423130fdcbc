"""evaluate() on small synthetic results with hand-computed entries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mlipuq.evaluation import evaluate
from mlipuq.exceptions import InputError
from mlipuq.result import UQResult

# 6 configurations x 2 atoms; groups a, b, c; group c has no reference forces.
CI = np.repeat(np.arange(6), 2)
GROUPS = np.array(["a", "a", "b", "b", "c", "c"])
NAN = np.nan
FORCE_ERR = np.array([0.1, 0.4, 0.05, 0.02, 0.9, 1.2, 0.3, 0.2, NAN, NAN, NAN, NAN])
ENERGY_ERR = np.array([0.01, -0.02, 0.03, 0.04, 0.5, -0.9])
IS_OOD = np.array([False, False, False, False, True, True])
ATOL = 0.25

DOPT = UQResult(
    "doptimality",
    np.array([0.5, 2.0, 0.1, 0.2, 3.0, 4.0, 0.3, 0.9, 1.5, 0.2, 5.0, 6.0]),
    config_index=CI,
    threshold=1.0,
)
P = np.array([0.9, 0.2, 0.8, 0.7, 0.1, 0.05, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5])
LTAU = UQResult("ltau", 1 - P, config_index=CI, extras={"p": P})
ENS = UQResult(
    "ensemble",
    np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2]),
    config_uncertainty=np.array([0.2, 0.4, 0.6, 0.8, 1.0, 1.2]),
    config_index=CI,
    config_flags=np.array([False, False, False, True, True, True]),
    threshold=0.7,
    unit="eV/Å",
    extras={"config_energy_uncertainty": np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])},
)


@pytest.fixture(scope="module")
def out() -> dict:
    return evaluate(
        {"dopt": DOPT, "ltau": LTAU, "ens": ENS},
        config_index=CI,
        force_errors=FORCE_ERR,
        energy_errors=ENERGY_ERR,
        groups=GROUPS,
        atol=ATOL,
        is_ood=IS_OOD,
        timings={"dopt": 2e-5, "ltau": 1e-5},
        forward_seconds_per_atom=1e-4,
    )


def test_every_method_and_group_present(out):
    assert set(out["methods"]) == {"dopt", "ltau", "ens"}
    for method in out["methods"].values():
        assert set(method["metrics"]) == {"all", "a", "b", "c"}
    assert out["groups"]["c"] == {"n_atoms": 4, "n_configs": 2}
    assert (out["n_atoms"], out["n_configs"]) == (12, 6)
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN, only plain types


def test_detection_rates_from_threshold(out):
    m = out["methods"]["dopt"]["metrics"]
    # atom flags (u > 1): 0 1 | 0 0 | 1 1 | 0 0 | 1 0 | 1 1 ; config max u: 2 .2 4 .9 1.5 6
    assert m["all"]["detection_rate_atom"] == pytest.approx(6 / 12)
    assert m["all"]["detection_rate_config"] == pytest.approx(4 / 6)
    assert m["a"]["detection_rate_atom"] == pytest.approx(1 / 4)
    assert m["a"]["detection_rate_config"] == pytest.approx(1 / 2)
    assert m["c"]["detection_rate_atom"] == pytest.approx(3 / 4)
    assert m["c"]["detection_rate_config"] == pytest.approx(1.0)


def test_detection_rates_from_given_flags_and_override(out):
    m = out["methods"]["ens"]["metrics"]
    assert m["all"]["detection_rate_config"] == pytest.approx(3 / 6)  # given config_flags
    assert m["b"]["detection_rate_config"] == pytest.approx(1 / 2)
    # no atom flags given: computed from the result's threshold 0.7 -> 0.8 .. 1.2 = 5 atoms
    assert m["all"]["detection_rate_atom"] == pytest.approx(5 / 12)
    over = evaluate({"ens": ENS}, config_index=CI, thresholds={"ens": 0.5})
    # override: config u > 0.5 -> 0.6 0.8 1.0 1.2 ; atom u > 0.5 -> 7 atoms
    assert over["methods"]["ens"]["metrics"]["all"]["detection_rate_config"] == pytest.approx(4 / 6)
    assert over["methods"]["ens"]["metrics"]["all"]["detection_rate_atom"] == pytest.approx(7 / 12)


def test_ood_metrics(out):
    m = out["methods"]["dopt"]["metrics"]["all"]
    # OOD (1.5, 6.0) vs ID (2, .2, 4, .9): 1.5 beats 2 of 4, 6.0 beats 4 -> 6/8
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["tpr"] == pytest.approx(1.0) and m["fpr"] == pytest.approx(0.5)
    assert out["methods"]["dopt"]["metrics"]["a"]["roc_auc"] is None  # one class only


def test_spearman_entries(out):
    m = out["methods"]["dopt"]["metrics"]
    # group a: u (.5 2 .1 .2) ranks 3 4 1 2; e (.1 .4 .05 .02) ranks 3 4 2 1 -> 1 - 12/60
    assert m["a"]["spearman_atom"] == pytest.approx(0.8)
    finite = np.isfinite(FORCE_ERR)
    expected = spearmanr(DOPT.atom_uncertainty[finite], FORCE_ERR[finite]).statistic
    assert m["all"]["spearman_atom"] == pytest.approx(expected)
    assert m["c"]["spearman_atom"] is None  # no forces in group c
    assert m["c"]["spearman_config_force"] is None
    # group c on energy: u (1.5, 6.0) vs |dE| (0.5, 0.9) -> 1
    assert m["c"]["spearman_config_energy"] == pytest.approx(1.0)
    # ensemble: energy uses extras["config_energy_uncertainty"] (reversed order) -> -1
    ens = out["methods"]["ens"]["metrics"]["all"]
    e_abs = np.abs(ENERGY_ERR)
    assert ens["spearman_config_energy"] == pytest.approx(
        spearmanr(ENS.extras["config_energy_uncertainty"], e_abs).statistic
    )
    assert ens["spearman_config_force"] == pytest.approx(
        spearmanr([0.2, 0.4, 0.6, 0.8], [0.4, 0.05, 1.2, 0.3]).statistic
    )


def test_calibration_entries(out):
    m = out["methods"]["ltau"]["metrics"]
    # group a: p .9 .2 .8 .7, errors .1 .4 .05 .02 <= .25 -> hits 1 0 1 1
    # one atom per bin: gaps .1 .2 .2 .3 -> ECE 0.2
    assert m["a"]["ece"] == pytest.approx(0.2)
    assert m["a"]["calibration_curve"]["counts"] == [0, 0, 1, 0, 0, 0, 0, 1, 1, 1]
    assert m["c"]["ece"] is None and m["c"]["sharpness"] == pytest.approx(0.0)
    assert m["all"]["sharpness"] == pytest.approx(np.std(P))
    assert out["methods"]["dopt"]["metrics"]["all"]["ece"] is None  # no p


def test_scale_enters_the_calibration_threshold():
    res = evaluate({"ltau": LTAU}, config_index=CI, force_errors=FORCE_ERR, atol=ATOL, scale=2.0)
    # threshold 0.5: hits of the 8 atoms with forces: 1 1 1 1 0 0 1 1
    p8, hit = P[:8], np.array([1, 1, 1, 1, 0, 0, 1, 1.0])
    bins = np.array([9, 2, 8, 7, 1, 0, 6, 5])  # p8 * 10, floored by hand
    expected = (
        sum(
            abs(hit[bins == b].mean() - p8[bins == b].mean()) * np.sum(bins == b)
            for b in np.unique(bins)
        )
        / 8
    )
    assert res["methods"]["ltau"]["metrics"]["all"]["ece"] == pytest.approx(expected)


def test_cost_entries(out):
    assert out["methods"]["ltau"]["cost"] == {
        "seconds_per_atom": 1e-5,
        "relative_to_forward": pytest.approx(0.1),
    }
    assert out["methods"]["ens"]["cost"]["seconds_per_atom"] is None


def test_larger_random_case_against_direct_formulas(rng):
    n_cfg = 90
    ci = np.repeat(np.arange(n_cfg), 4)
    groups = np.array(["300K", "600K", "surface"])[np.arange(n_cfg) % 3]
    err = rng.lognormal(size=len(ci))
    u = err * rng.lognormal(size=len(ci))
    ood = groups == "surface"
    res = evaluate(
        {"m": UQResult("m", u, config_index=ci)},
        config_index=ci,
        force_errors=err,
        groups=groups,
        is_ood=ood,
    )
    cfg_u = u.reshape(-1, 4).max(axis=1)
    cfg_e = err.reshape(-1, 4).max(axis=1)
    sel = groups == "600K"
    m = res["methods"]["m"]["metrics"]
    assert m["600K"]["spearman_config_force"] == pytest.approx(
        spearmanr(cfg_u[sel], cfg_e[sel]).statistic
    )
    assert m["all"]["roc_auc"] == pytest.approx(roc_auc_score(ood, cfg_u))
    assert m["all"]["detection_rate_config"] is None  # no threshold, no flags


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"results": {}}, "no UQ results"),
        ({"force_errors": np.zeros(5)}, "force_errors"),
        ({"groups": ["a", "b"]}, "groups"),
        ({"energy_errors": np.zeros(3)}, "energy_errors"),
        ({"is_ood": np.zeros(6)}, "is_ood: expected booleans"),
        ({"results": {"x": UQResult("x", np.zeros(3))}}, "x.atom_uncertainty"),
        ({"atol": -1.0}, "atol"),
        ({"scale": np.ones(3)}, "scale"),
        ({"config_index": np.array([], dtype=int)}, "config_index"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"results": {"dopt": DOPT}, "config_index": CI} | kwargs
    with pytest.raises(InputError, match=match):
        evaluate(args.pop("results"), **args)
