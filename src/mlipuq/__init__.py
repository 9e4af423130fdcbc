"""mlipuq: where a machine-learning interatomic potential can be trusted.

Estimators share one shape: ``fit(train arrays)`` then ``predict(test arrays) ->
UQResult``. Heavy modules (FAISS, torch, NequIP) are imported lazily.
"""

from mlipuq.atom_table import AtomTable
from mlipuq.exceptions import InputError, MlipuqError, NotFittedError
from mlipuq.result import UQResult

__version__ = "0.1.0"

__all__ = ["AtomTable", "InputError", "MlipuqError", "NotFittedError", "UQResult", "__version__"]
