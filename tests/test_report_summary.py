"""The report's summary sentences over every combination of set roles."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from mlipuq.evaluation import evaluate
from mlipuq.report import summary_text
from mlipuq.result import UQResult

#: (name, in domain, has forces, error scale): the kinds of test set a user brings.
KINDS = [
    ("bulk_300K", True, True, 1.0),
    ("bulk_val", True, True, 1.2),
    ("hot_1200K", False, True, 3.0),
    ("surface", False, True, 2.0),
    ("dihedral", False, False, 4.0),
]
COMBINATIONS = [
    combo for r in range(1, len(KINDS) + 1) for combo in itertools.combinations(KINDS, r)
]


def build(combo, seed=0):
    """evaluate() output for test sets of the given kinds (8 configurations x 5 atoms)."""
    rng = np.random.default_rng(seed)
    per_set, atoms = 8, 5
    groups = np.repeat([name for name, *_ in combo], per_set)
    ci = np.repeat(np.arange(len(groups)), atoms)
    scale = np.repeat([k[3] for k in combo], per_set * atoms)
    forces = np.repeat([k[2] for k in combo], per_set * atoms)
    errors = 0.05 * scale * rng.exponential(size=len(ci))
    errors[~forces] = np.nan
    p = np.clip(np.exp(-errors / 0.08) + rng.normal(0, 0.05, len(ci)), 0, 1)
    p[~forces] = rng.uniform(0, 0.3, (~forces).sum())
    gamma = scale * rng.lognormal(size=len(ci))
    results = {
        "ltau_calibrated": UQResult("ltau", 1 - p, config_index=ci, extras={"p": p},
                                    threshold=0.9),
        "doptimality": UQResult("doptimality", gamma, config_index=ci, threshold=2.0),
    }
    in_domain = {name for name, inside, *_ in combo if inside}
    is_ood = ~np.isin(groups, sorted(in_domain)) if in_domain else None
    metrics = evaluate(results, config_index=ci, force_errors=errors,
                       energy_errors=0.01 * np.repeat([k[3] for k in combo], per_set),
                       groups=groups, atol=0.05, is_ood=is_ood,
                       timings={"ltau_calibrated": 1e-6, "doptimality": 2e-6},
                       forward_seconds_per_atom=1e-4)
    metrics["test_sets"] = {name: {"in_domain": inside, "has_forces": has}
                            for name, inside, has, _ in combo}
    return metrics


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(k[0] for k in c))
def test_summary_sentences_hold_for_every_combination(combo):
    metrics = build(combo)
    text = summary_text(metrics)
    names = [k[0] for k in combo]
    inside = [k[0] for k in combo if k[1]]
    outside = [k[0] for k in combo if not k[1]]
    with_forces = [k[0] for k in combo if k[2]]
    energy_only = [k[0] for k in combo if not k[2]]

    assert "nan" not in text.lower() and "None" not in text
    assert "over all test atoms" not in text and "best calibrated" not in text
    # no sentence names one set twice ("flags 100 % of the X ... and 100 % of the X ones")
    for sentence in re.split(r"(?<=\.) ", text):
        for name in names:
            assert sentence.count(name) <= 1, sentence

    # calibration: claimed only with forces, and then it names the set with the worst ECE
    if with_forces:
        ece = {g: metrics["methods"]["ltau_calibrated"]["metrics"][g]["ece"] for g in with_forces}
        worst = max(ece, key=ece.get)
        if len(with_forces) == 1:
            assert f"of {ece[worst]:.3f} on {worst}." in text
        else:
            assert f"largest calibration error on {worst} (ECE {ece[worst]:.3f})" in text
    else:
        assert "calibration error" not in text
    # ranking: judged on each method's worst set with forces
    if with_forces:
        assert "ranks atoms by force error best" in text
        worst_sets = {
            m: min(with_forces, key=lambda g, m=m: metrics["methods"][m]["metrics"][g]
                   ["spearman_atom"])
            for m in metrics["methods"]}
        assert any(f"{g}: Spearman" in text for g in worst_sets.values())
    else:
        assert "ranks atoms" not in text
    # detection: one sentence per out-of-domain set, only when in-domain sets exist,
    # with the TPR next to the in-domain FPR
    detection = re.findall(r"(\w+): [\w\- ()]+ separates it from the in-domain data best", text)
    if inside:
        assert detection == outside
        assert text.count("of the in-domain ones") == len(outside)
    else:
        assert detection == []
    # energy-only sets are said to be judged on energies
    if energy_only:
        assert f"{', '.join(energy_only)} ha" in text and "energy errors only" in text
    else:
        assert "no reference forces" not in text
    assert "is the cheapest" in text
