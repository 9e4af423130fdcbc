"""A UQ method as a plug-in: subclass UQMethod, register it, run the contract checks.

Run: ``python examples/custom_method.py`` (a few seconds). The same class registered
through the ``mlipuq.methods`` entry point of another package would appear in
``mlipuq fit``, ``mlipuq evaluate``, the report, the calculator, ``simulate`` and
``select`` with no edits there.
"""

import numpy as np

from mlipuq.atom_table import config_max
from mlipuq.method import UQMethod
from mlipuq.registry import method_names, register_method
from mlipuq.result import UQResult
from mlipuq.testing import check_method


@register_method
class FeatureNorm(UQMethod):
    """Uncertainty = descriptor norm over the training mean norm (a toy method)."""

    name = "feature_norm"  # registry key and prefix of every output array
    display_name = "Feature norm"
    requires = ("descriptors",)  # ModelOutputs fields fit/predict read

    def __init__(self, *, power: float = 1.0):
        self.power = power

    def fit(self, X, store=None):
        self.check_inputs(X)  # ModelOutputs with finite required fields
        self.species_ = sorted(set(X.species.tolist()))
        self.mean_norm_ = float(np.linalg.norm(X.descriptors, axis=1).mean())
        self.threshold_ = None
        return self

    def predict(self, X):
        self.check_inputs(X, known_species=self.species_)  # unknown elements: one line
        u = (np.linalg.norm(X.descriptors, axis=1) / self.mean_norm_) ** self.power
        configs = X.config_index
        return UQResult(self.name, u, config_max(u, configs), configs,
                        threshold=self.threshold_)

    def _get_state(self):  # JSON dict + named arrays: the persistence format
        state = {"species": self.species_, "mean_norm": self.mean_norm_,
                 "threshold": self.threshold_}
        return state, {}

    def _set_state(self, state, arrays, directory):
        self.species_, self.mean_norm_ = state["species"], state["mean_norm"]
        self.threshold_ = state["threshold"]


if __name__ == "__main__":
    check_method(FeatureNorm())  # raises AssertionError naming the first failed check
    print(f"FeatureNorm passes every contract check; registered methods: {method_names()}")
