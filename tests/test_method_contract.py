"""Every registered UQ method passes the contract checks of :mod:`mlipuq.testing`."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.method import UQMethod
from mlipuq.registry import method_class, method_names
from mlipuq.result import UQResult
from mlipuq.testing import CHECKS, check_method


def _prototype(name: str) -> UQMethod:
    params = {"n_clusters": 2} if name == "clustered_doptimality" else {}
    return method_class(name)(**params)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", method_names())
def test_registered_method_passes(name, check):
    CHECKS[check](_prototype(name))


class _Leaky(UQMethod):
    """Keeps a cache across fits and changes state in predict: fails two checks."""

    name = "leaky"

    def fit(self, X, store=None):
        self.check_inputs(X)
        self.scale_ = getattr(self, "scale_", float(np.abs(X.descriptors).mean()))
        self.calls_ = 0
        return self

    def predict(self, X):
        self.check_inputs(X)
        self.calls_ += 1
        u = np.abs(X.descriptors).mean(axis=1) / self.scale_ + self.calls_
        return UQResult("leaky", u, np.bincount(X.config_index, u), X.config_index)

    def _get_state(self):
        return {"scale": self.scale_, "calls": self.calls_}, {}

    def _set_state(self, state, arrays, directory):
        self.scale_, self.calls_ = state["scale"], state["calls"]


@pytest.mark.parametrize("check", ["idempotent_fit", "no_side_effects"])
def test_the_checks_catch_a_broken_method(check):
    with pytest.raises(AssertionError):
        CHECKS[check](_Leaky())
    with pytest.raises(AssertionError, match=f"check '{check}'|check 'idempotent_fit'"):
        check_method(_Leaky())
