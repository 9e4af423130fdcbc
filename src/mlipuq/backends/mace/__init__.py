"""MACE backend (``"mace"``): training with per-epoch error logging, features, calculator.

Import-light: importing this package imports neither torch nor mace. mace-torch pins
e3nn 0.4.4, which NequIP cannot use, so it lives in its own virtual environment
(``pip install 'mlipuq[mace]'``, see docs/mace.md). The modules are

- :mod:`~mlipuq.backends.mace.model`: build/save/load models, invariant features;
- :mod:`~mlipuq.backends.mace.training`: ``train_ensemble`` (``mlipuq train``);
- :mod:`~mlipuq.backends.mace.backend`: :class:`MaceBackend`;
- :mod:`~mlipuq.backends.mace.calculator`: the ASE calculator with uncertainty.
"""

from mlipuq.backends.mace.backend import MaceBackend

__all__ = ["MaceBackend"]
