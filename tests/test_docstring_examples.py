"""The ``>>>`` examples in the docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import numpy as np
import pytest

import mlipuq

SKIP = ("mlipuq.backends.nequip", "mlipuq.cli")  # need a trained model / a command line


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(mlipuq.__path__, "mlipuq."):
        if info.name.startswith(SKIP):
            continue
        source = importlib.util.find_spec(info.name).origin or ""
        if source.endswith(".py") and ">>> " in open(source, encoding="utf-8").read():
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"np": np}, verbose=False,
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
