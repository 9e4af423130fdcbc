"""mlipuq: where a machine-learning interatomic potential can be trusted.

Every uncertainty method is a :class:`mlipuq.method.UQMethod` (scikit-learn's
estimator contract) with ``fit(X, store=None)`` and ``predict(X) -> UQResult`` over a
backend's :class:`~mlipuq.backends.base.ModelOutputs`; :mod:`mlipuq.registry` lists
them. Heavy modules (FAISS, torch, NequIP) are imported lazily.
"""

from mlipuq.atom_table import AtomTable
from mlipuq.exceptions import InputError, MlipuqError, NotFittedError
from mlipuq.result import UQResult

__version__ = "0.2.0"

__all__ = ["AtomTable", "InputError", "MlipuqError", "NotFittedError", "UQResult", "__version__"]
