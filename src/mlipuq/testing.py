"""The contract every UQ method must pass, as reusable checks (in the spirit of
scikit-learn's ``check_estimator``).

A plug-in method's tests run them all with::

    from mlipuq.testing import check_method
    check_method(MyMethod())

Each check gets an unfitted prototype, works on clones of it and on synthetic
:class:`~mlipuq.backends.base.ModelOutputs` (two elements, a 3-member committee,
per-epoch error trajectories), and asserts one property of the contract of
:class:`~mlipuq.method.UQMethod`:

- ``result``: predict returns a UQResult of the right shapes, within the method's
  ``bounds``;
- ``idempotent_fit``: fitting twice equals fitting once; a refit on another training set
  equals a fresh fit (no state survives ``fit``);
- ``no_side_effects``: predict changes no fitted state and repeats exactly;
- ``persistence``: save -> :func:`~mlipuq.method.load_method` predicts identically,
  records the provenance and :func:`~mlipuq.method.provenance_mismatch` tells another
  member or training set apart; saving twice leaves no temporaries;
- ``bad_inputs``: NaN or infinite inputs, missing fields and unknown elements raise
  :class:`~mlipuq.exceptions.InputError`;
- ``clone``: :func:`sklearn.base.clone` gives an unfitted copy with equal parameters;
- ``calibration``: :meth:`~mlipuq.method.UQMethod.calibrate` sets ``threshold_`` at
  the stated in-domain false-positive rate.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.base import clone

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod, load_method, provenance_mismatch
from mlipuq.result import UQResult

__all__ = ["CHECKS", "check_method", "synthetic_outputs"]

N_MODELS = 3
N_FEATURES = 6


def synthetic_outputs(
    rng: np.random.Generator, n_configs: int, *, shift: float = 0.0,
    elements: tuple[str, ...] = ("H", "O"),
) -> tuple[ModelOutputs, np.ndarray]:
    """Outputs of a 3-member committee (member 0 is the model) on ``n_configs`` random
    configurations of 4-8 atoms, and member 0's force-error norms (eV/Å, shape (N,)).

    Errors grow with |descriptor 0| so that uncertainty can rank them.
    """
    sizes = rng.integers(4, 9, size=n_configs)
    config_index = np.repeat(np.arange(n_configs), sizes)
    n = len(config_index)
    species = rng.choice(np.asarray(elements), size=n)
    descriptors = rng.normal(size=(n, N_FEATURES)) + shift
    reference = rng.normal(size=(n, 3))
    difficulty = 0.05 * (1.0 + np.abs(descriptors[:, 0]))
    forces = reference + difficulty[None, :, None] * rng.normal(size=(N_MODELS, n, 3))
    energies = rng.normal(size=(N_MODELS, n_configs))
    outputs = ModelOutputs(
        species=species, config_index=config_index, descriptors=descriptors,
        energies=energies[0], forces=forces[0], committee_energies=energies,
        committee_forces=forces,
    )
    return outputs, np.linalg.norm(forces[0] - reference, axis=1)


def _trajectories(errors: np.ndarray) -> list[np.ndarray]:
    """Error trajectories (12 epochs, N) of two models ending near ``errors``."""
    rng = np.random.default_rng(3)
    epochs = np.linspace(3.0, 1.0, 12)[:, None]
    return [errors[None, :] * epochs * rng.uniform(0.9, 1.1, size=(12, len(errors)))
            for _ in range(2)]


def _fit(prototype: UQMethod, X: ModelOutputs, errors: np.ndarray) -> UQMethod:
    method = clone(prototype)
    return _refit(method, X, errors)


def _refit(method: UQMethod, X: ModelOutputs, errors: np.ndarray) -> UQMethod:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return method.fit(X, _trajectories(errors) if method.needs_store else None)


def _predict(method: UQMethod, X: ModelOutputs) -> UQResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return method.predict(X)


def _same(a: UQResult, b: UQResult, what: str) -> None:
    for name in ("atom_uncertainty", "config_uncertainty"):
        if not np.allclose(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12):
            raise AssertionError(f"{what}: {name} differs")


def _data() -> tuple[ModelOutputs, np.ndarray, ModelOutputs]:
    rng = np.random.default_rng(0)
    train, errors = synthetic_outputs(rng, 60)
    test, _ = synthetic_outputs(rng, 12, shift=0.5)
    return train, errors, test


def _raises(call: Callable[[], object], pattern: str, what: str) -> None:
    import re

    try:
        call()
    except InputError as error:
        if not re.search(pattern, str(error)):
            raise AssertionError(f"{what}: message {str(error)!r} does not match "
                                 f"{pattern!r}") from None
        return
    raise AssertionError(f"{what}: no InputError raised")


# ---------------------------------------------------------------------- the checks
def check_result(prototype: UQMethod) -> None:
    """predict returns a UQResult of the right shapes within the method's bounds."""
    train, errors, test = _data()
    method = _fit(prototype, train, errors)
    result = _predict(method, test)
    assert isinstance(result, UQResult), type(result)
    assert result.atom_uncertainty.shape == (test.n_atoms,)
    assert result.config_uncertainty is not None
    assert result.config_uncertainty.shape == (test.n_configs,)
    low, high = method.bounds
    assert low is None or np.all(result.atom_uncertainty >= low - 1e-12), "below bounds"
    assert high is None or np.all(result.atom_uncertainty <= high + 1e-12), "above bounds"
    assert result.config_aggregate in ("max", "mean")


def check_idempotent_fit(prototype: UQMethod) -> None:
    """Fitting twice equals fitting once; a refit equals a fresh fit."""
    train, errors, test = _data()
    once = _fit(prototype, train, errors)
    twice = _refit(_fit(prototype, train, errors), train, errors)
    _same(_predict(once, test), _predict(twice, test), "fit twice")
    small, small_errors = synthetic_outputs(np.random.default_rng(5), 25)
    method = _fit(prototype, small, small_errors)
    _predict(method, test)  # fill any cache of the first fit
    _same(_predict(_refit(method, train, errors), test), _predict(once, test),
          "refit on another training set")


def check_no_side_effects(prototype: UQMethod) -> None:
    """predict changes no fitted state and repeats exactly."""
    train, errors, test = _data()
    method = _fit(prototype, train, errors)
    state, arrays = copy.deepcopy(method._get_state())
    first = _predict(method, test)
    _predict(method, train)
    _same(first, _predict(method, test), "repeated predict")
    state_after, arrays_after = method._get_state()
    assert state == state_after, "predict changed the fitted state"
    for key, value in arrays.items():
        assert np.array_equal(value, arrays_after[key]), f"predict changed {key}"


def check_persistence(prototype: UQMethod) -> None:
    """save -> load_method predicts identically; provenance recorded and compared;
    saving twice leaves no temporaries."""
    train, errors, test = _data()
    method = _fit(prototype, train, errors)
    provenance = {"backend": "arrays", "member": "model_0", "atom_table_fingerprint": "a"}
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "method"
        method.save(target, provenance=provenance)
        method.save(target, provenance=provenance)
        assert [p.name for p in Path(folder).iterdir()] == ["method"], "temporaries left"
        loaded = load_method(target)
    assert type(loaded) is type(method)
    assert loaded.get_params() == method.get_params()
    _same(_predict(method, test), _predict(loaded, test), "save -> load")
    assert provenance_mismatch(loaded.provenance_, provenance) is None
    assert provenance_mismatch(loaded.provenance_, {**provenance, "member": "model_1"})
    assert provenance_mismatch(loaded.provenance_,
                               {**provenance, "atom_table_fingerprint": "b"})


def check_bad_inputs(prototype: UQMethod) -> None:
    """NaN/inf inputs, missing fields and unknown elements raise InputError."""
    train, errors, test = _data()
    field = prototype.requires[0]
    bad = np.array(getattr(train, field), dtype=float)
    bad.flat[3] = np.nan
    _raises(lambda: _fit(prototype, replace(train, **{field: bad}), errors), "NaN",
            "fit with NaN")
    method = _fit(prototype, train, errors)
    bad = np.array(getattr(test, field), dtype=float)
    bad.flat[0] = np.inf
    _raises(lambda: method.predict(replace(test, **{field: bad})), "NaN or infinite",
            "predict with inf")
    _raises(lambda: method.predict(ModelOutputs(species=test.species,
                                                config_index=test.config_index)),
            f"no {field}", "predict without the required field")
    if "descriptors" in prototype.requires:
        species = test.species.astype("U3")
        species[0] = "Zn"
        _raises(lambda: method.predict(replace(test, species=species)), "Zn",
                "predict an unknown element")


def check_clone(prototype: UQMethod) -> None:
    """clone gives an unfitted copy with equal parameters; set_params round-trips."""
    train, errors, _ = _data()
    method = _fit(prototype, train, errors)
    twin = clone(method)
    assert twin.get_params() == method.get_params()
    fitted = [k for k in vars(twin) if k.endswith("_") and not k.startswith("_")]
    assert not fitted, f"clone kept fitted state {fitted}"
    params = twin.get_params()
    assert twin.set_params(**params).get_params() == params


def check_calibration(prototype: UQMethod) -> None:
    """calibrate sets threshold_ at the stated in-domain false-positive rate; calibrating
    a copy (as the evaluation does) leaves the original's predictions unchanged."""
    train, errors, test = _data()
    method = _fit(prototype, train, errors)
    held, held_errors = synthetic_outputs(np.random.default_rng(9), 80)
    before = _predict(method, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        copy.copy(method.uncalibrated()).calibrate(held, held_errors, fpr=0.2)
    after = _predict(method, test)
    _same(before, after, "calibrating a copy")
    assert before.threshold == after.threshold, "calibrating a copy changed the threshold"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        method.calibrate(held, held_errors, fpr=0.1, source="held-out")
    result = _predict(method, held)
    assert np.isclose(result.threshold, method.threshold_), "threshold not used by predict"
    flagged = float(np.mean(result.config_uncertainty > method.threshold_))
    assert 0.1 - 3 / 80 <= flagged <= 0.1 + 1e-9, f"flags {flagged:.3f} at FPR 0.1"
    assert isinstance(method.uncalibrated(), UQMethod)


CHECKS: dict[str, Callable[[UQMethod], None]] = {
    "result": check_result,
    "idempotent_fit": check_idempotent_fit,
    "no_side_effects": check_no_side_effects,
    "persistence": check_persistence,
    "bad_inputs": check_bad_inputs,
    "clone": check_clone,
    "calibration": check_calibration,
}
"""Every check by name, in the order :func:`check_method` runs them."""


def check_method(prototype: UQMethod) -> None:
    """Run every check of :data:`CHECKS` on ``prototype`` (an unfitted method).

    Raises
    ------
    AssertionError
        The first check that fails, with the check's name.
    """
    if not isinstance(prototype, UQMethod):
        raise TypeError(f"expected a UQMethod, got {type(prototype).__name__}")
    for name, check in CHECKS.items():
        try:
            check(prototype)
        except AssertionError as error:
            raise AssertionError(f"{type(prototype).__name__}: check {name!r}: {error}") \
                from error
