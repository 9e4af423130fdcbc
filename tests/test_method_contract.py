"""The contract every registered UQ method passes (in the spirit of scikit-learn's
``check_estimator``): one fit/predict signature over ModelOutputs, idempotent fit,
refit equals a fresh fit, predict without side effects, save -> load predicts the
same, clear errors for NaN inputs and unknown elements, provenance checked on load,
``clone`` gives an unfitted copy, calibration sets a threshold at the stated FPR.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from sklearn.base import clone

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod, load_method, provenance_mismatch
from mlipuq.registry import method_class, method_names

N_MODELS = 3
N_FEATURES = 6


def _outputs(rng: np.random.Generator, n_configs: int, shift: float = 0.0,
             elements=("H", "O")) -> tuple[ModelOutputs, np.ndarray]:
    """Synthetic outputs of a committee (member 0 is the base model) and the force-error
    norms of member 0 (eV/Å)."""
    sizes = rng.integers(4, 9, size=n_configs)
    config_index = np.repeat(np.arange(n_configs), sizes)
    n = len(config_index)
    species = rng.choice(np.asarray(elements), size=n)
    descriptors = rng.normal(size=(n, N_FEATURES)) + shift
    reference = rng.normal(size=(n, 3))
    difficulty = 0.05 * (1.0 + np.abs(descriptors[:, 0]))
    committee_forces = reference + difficulty[None, :, None] * rng.normal(size=(N_MODELS, n, 3))
    committee_energies = rng.normal(size=(N_MODELS, n_configs))
    outputs = ModelOutputs(
        species=species, config_index=config_index, descriptors=descriptors,
        energies=committee_energies[0], forces=committee_forces[0],
        committee_energies=committee_energies, committee_forces=committee_forces,
    )
    errors = np.linalg.norm(committee_forces[0] - reference, axis=1)
    return outputs, errors


def _store(rng: np.random.Generator, errors: np.ndarray) -> list[np.ndarray]:
    """Error trajectories (epochs, N) of two models ending at ``errors``."""
    epochs = np.linspace(3.0, 1.0, 12)[:, None]
    return [errors[None, :] * epochs * rng.uniform(0.9, 1.1, size=(12, len(errors)))
            for _ in range(2)]


def _fit(method: UQMethod, X: ModelOutputs, errors: np.ndarray, rng) -> UQMethod:
    store = _store(rng, errors) if method.needs_store else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return method.fit(X, store)


def _predict(method: UQMethod, X: ModelOutputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return method.predict(X)


def _same(a, b) -> None:
    np.testing.assert_allclose(a.atom_uncertainty, b.atom_uncertainty, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.config_uncertainty, b.config_uncertainty, rtol=1e-10,
                               atol=1e-12)


def _build(name: str) -> UQMethod:
    params = {"n_clusters": 2} if name == "clustered_doptimality" else {}
    return method_class(name)(**params)


@pytest.fixture(params=method_names())
def name(request) -> str:
    return request.param


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    train, train_errors = _outputs(rng, 60)
    test, _ = _outputs(rng, 12, shift=0.5)
    return train, train_errors, test


def test_result_contract(name, data):
    train, errors, test = data
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    assert isinstance(method, UQMethod) and method.name == name
    result = _predict(method, test)
    assert result.atom_uncertainty.shape == (test.n_atoms,)
    assert result.config_uncertainty.shape == (test.n_configs,)
    low, high = method.bounds
    assert np.all(result.atom_uncertainty >= low - 1e-12)
    if high is not None:
        assert np.all(result.atom_uncertainty <= high + 1e-12)
    assert result.config_aggregate in ("max", "mean")


def test_fit_is_idempotent_and_refit_equals_fresh_fit(name, data):
    train, errors, test = data
    once = _fit(_build(name), train, errors, np.random.default_rng(1))
    twice = _fit(_fit(_build(name), train, errors, np.random.default_rng(1)), train, errors,
                 np.random.default_rng(1))
    _same(_predict(once, test), _predict(twice, test))
    small, small_errors = _outputs(np.random.default_rng(5), 25)
    refit = _fit(_build(name), small, small_errors, np.random.default_rng(1))
    _predict(refit, test)  # fill any cache of the first fit
    refit = _fit(refit, train, errors, np.random.default_rng(1))
    _same(_predict(refit, test), _predict(once, test))


def test_predict_has_no_side_effects(name, data):
    train, errors, test = data
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    state_before = copy.deepcopy(method._get_state())
    first = _predict(method, test)
    _predict(method, train)
    second = _predict(method, test)
    _same(first, second)
    state_after = method._get_state()
    assert state_before[0] == state_after[0]
    for key, value in state_before[1].items():
        np.testing.assert_array_equal(value, state_after[1][key])


def test_save_load_predicts_identically_and_checks_provenance(name, data, tmp_path):
    train, errors, test = data
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    provenance = {"backend": "arrays", "member": "model_0", "atom_table_fingerprint": "abc"}
    method.save(tmp_path / name, provenance=provenance)
    loaded = load_method(tmp_path / name)
    assert type(loaded) is type(method)
    assert loaded.get_params() == method.get_params()
    _same(_predict(method, test), _predict(loaded, test))
    assert provenance_mismatch(loaded.provenance_, provenance) is None
    assert "member" in provenance_mismatch(loaded.provenance_, {**provenance,
                                                                "member": "model_1"})
    assert provenance_mismatch(loaded.provenance_, {**provenance,
                                                    "atom_table_fingerprint": "xyz"})


def test_save_over_an_existing_method_leaves_no_temporaries(name, data, tmp_path):
    train, errors, _ = data
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    method.save(tmp_path / name)
    method.save(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_nan_inputs_and_unknown_elements_are_refused(name, data):
    train, errors, test = data
    cls = method_class(name)
    field = cls.requires[0]
    bad = np.array(getattr(train, field), dtype=float)
    bad.flat[3] = np.nan
    from dataclasses import replace

    with pytest.raises(InputError, match="NaN"):
        _fit(_build(name), replace(train, **{field: bad}), errors, np.random.default_rng(1))
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    bad_test = np.array(getattr(test, field), dtype=float)
    bad_test.flat[0] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        method.predict(replace(test, **{field: bad_test}))
    with pytest.raises(InputError, match="no descriptors|no committee_forces|no "):
        method.predict(ModelOutputs(species=test.species, config_index=test.config_index))
    if "descriptors" in cls.requires:
        species = test.species.astype("U3")
        species[0] = "Zn"
        with pytest.raises(InputError, match="Zn"):
            method.predict(replace(test, species=species))


def test_clone_gives_an_unfitted_copy_with_equal_params(name, data):
    train, errors, _ = data
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    twin = clone(method)
    assert twin.get_params() == method.get_params()
    assert not [k for k in vars(twin) if k.endswith("_") and not k.startswith("_")]
    params = twin.get_params()
    twin.set_params(**params)
    assert twin.get_params() == params


def test_calibrate_sets_the_threshold_at_the_stated_fpr(name, data):
    train, errors, _ = data
    method = _fit(_build(name), train, errors, np.random.default_rng(1))
    held, held_errors = _outputs(np.random.default_rng(9), 80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        method.calibrate(held, held_errors, fpr=0.1, source="held-out")
    result = _predict(method, held)
    assert result.threshold == pytest.approx(method.threshold_)
    flagged = np.mean(result.config_uncertainty > method.threshold_)
    assert flagged <= 0.1 + 1e-9
    assert flagged >= 0.1 - 3 / 80  # a quantile: ties aside, about the FPR
    before = method.uncalibrated()
    assert isinstance(before, UQMethod)
