"""The estimator's gamma equals the grouped kernel and the direct per-element formula."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.doptimality import DOptimalityEstimator
from mlipuq.exceptions import InputError
from mlipuq.maxvol import extrapolation_grade_by_group


@pytest.mark.parametrize("elements", [["Cu"], ["Cu", "O"], ["O", "Cu", "H"]])
def test_estimator_gamma_equals_grouped_kernel_and_direct_formula(rng, elements):
    d = 6
    inverses = {el: rng.normal(size=(d, d)) for el in elements}
    est = DOptimalityEstimator.from_active_sets(
        {el: np.linalg.inv(b) for el, b in inverses.items()}, inverses=inverses
    )
    x = rng.normal(size=(2500, d))
    species = rng.choice(elements, size=2500)
    direct = np.empty(2500)
    for el in elements:
        mask = species == el
        direct[mask] = np.abs(x[mask] @ inverses[el]).max(axis=1)
    np.testing.assert_allclose(est.gamma(x, species), direct, rtol=1e-12)
    np.testing.assert_allclose(
        extrapolation_grade_by_group(x, species, est.active_inverse_), direct, rtol=1e-12
    )


def test_estimator_gamma_rejects_unfitted_element(rng):
    inverse = rng.normal(size=(3, 3))
    est = DOptimalityEstimator.from_active_sets({"Cu": np.linalg.inv(inverse)})
    with pytest.raises(InputError, match=r"\['Zn'\]"):
        est.gamma(rng.normal(size=(2, 3)), ["Cu", "Zn"])
