"""Model backends behind one small interface (:class:`mlipuq.backends.base.Backend`).

A run folder names its backend (``run.json["backend"]``); :mod:`.registry` resolves
the name to the class. Built in: ``"nequip"`` (:mod:`.nequip`), ``"pace"``
(:mod:`.pace`) and ``"arrays"`` (:mod:`.arrays`: predictions of any model stored as
arrays). Importing this package imports neither torch nor NequIP nor python-ace.
"""

from mlipuq.backends.base import Backend, ModelOutputs
from mlipuq.backends.registry import available, calculator, get, load, register

__all__ = ["Backend", "ModelOutputs", "available", "calculator", "get", "load", "register"]
