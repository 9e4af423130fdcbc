"""UQCalculator: NequIP energy/forces plus per-atom uncertainty from the same pass."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.backends.nequip.calculator import UQCalculator  # noqa: E402
from mlipuq.backends.nequip.features import NequIPBackend  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.method import UQMethod  # noqa: E402
from mlipuq.result import UQResult  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402
from nequip_support import make_emt_copper_frames, make_tiny_run  # noqa: E402


class NormEstimator(UQMethod):
    """A stand-in for any other method: uncertainty = |descriptor|."""

    name = "norm"

    def predict(self, X):
        descriptors = X.descriptors
        return UQResult(
            method="norm",
            atom_uncertainty=np.linalg.norm(descriptors.astype(np.float64), axis=1),
            extras={"first": descriptors[:, 0].astype(np.float64)},
        )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return RunFolder.open(make_tiny_run(tmp_path_factory.mktemp("calc"), n_models=1, epochs=2))


@pytest.fixture(scope="module")
def model_path(run):
    return run.model_path("model_0")


@pytest.fixture(scope="module")
def ltau(run, model_path):
    from mlipuq.ltau import LTAUEstimator

    train = NequIPBackend(model_path).outputs(run.train_frames())
    return LTAUEstimator(k=3).fit_arrays(run.store, train.descriptors, train.species)


@pytest.fixture(scope="module")
def test_frames():
    return make_emt_copper_frames(3, seed=11, temperature=1200.0)


@pytest.fixture(scope="module")
def calc(model_path, ltau):
    return UQCalculator.from_model(
        model_path, estimators={"ltau": ltau, "norm": NormEstimator()}, keep_descriptors=True
    )


def evaluate(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    return atoms, energy, atoms.get_forces().copy(), dict(calc.results)


def test_energy_and_forces_equal_nequip(model_path, calc, test_frames):
    from nequip.integrations.ase import NequIPCalculator

    reference = NequIPCalculator._from_saved_model(
        str(model_path), chemical_species_to_atom_type_map=True
    )
    for atoms in test_frames:
        _, energy, forces, _ = evaluate(atoms, calc)
        _, ref_energy, ref_forces, _ = evaluate(atoms, reference)
        assert energy == pytest.approx(ref_energy, rel=1e-6)
        np.testing.assert_allclose(forces, ref_forces, rtol=1e-6, atol=1e-9)


def test_descriptors_equal_batched_features(model_path, calc, test_frames):
    batched = NequIPBackend(model_path, batch_size=3).outputs(test_frames)
    for number, atoms in enumerate(test_frames):
        _, _, forces, results = evaluate(atoms, calc)
        rows = batched.config_index == number
        assert results["descriptors"].shape == (len(atoms), batched.descriptors.shape[1])
        np.testing.assert_allclose(results["descriptors"], batched.descriptors[rows], atol=1e-5)
        np.testing.assert_allclose(forces, batched.forces[rows], atol=1e-5)


def test_ltau_uncertainty_equals_estimator(calc, ltau, test_frames):
    atoms, _, _, results = evaluate(test_frames[1], calc)
    expected = ltau.predict_arrays(results["descriptors"], atoms.get_chemical_symbols())
    assert results["ltau_uncertainty"].shape == (len(atoms),)
    np.testing.assert_allclose(results["ltau_uncertainty"], expected.atom_uncertainty)
    for name in ("p", "expected_error", "knn_distance"):
        np.testing.assert_allclose(results[f"ltau_{name}"], expected.extras[name])
    np.testing.assert_allclose(results["ltau_p"], 1.0 - results["ltau_uncertainty"])
    assert results["ltau_uncertainty_max"] == pytest.approx(expected.atom_uncertainty.max())
    assert results["ltau_uncertainty_mean"] == pytest.approx(expected.atom_uncertainty.mean())


def test_any_estimator_plugs_in(calc, test_frames):
    _, _, _, results = evaluate(test_frames[0], calc)
    norms = np.linalg.norm(results["descriptors"].astype(np.float64), axis=1)
    np.testing.assert_allclose(results["norm_uncertainty"], norms)
    np.testing.assert_allclose(results["norm_first"], results["descriptors"][:, 0])
    assert results["norm_uncertainty_max"] == pytest.approx(norms.max())


def test_results_follow_the_atoms(calc, test_frames):
    """Moving the atoms gives new uncertainties (no stale results)."""
    atoms = test_frames[2].copy()
    atoms.calc = calc
    atoms.get_forces()
    first = calc.results["norm_uncertainty"].copy()
    atoms.positions[0] += [0.3, -0.2, 0.1]
    atoms.get_forces()
    assert not np.allclose(first, calc.results["norm_uncertainty"])


def test_store_arrays_writes_atoms_arrays(model_path, ltau, test_frames):
    calc = UQCalculator.from_model(model_path, estimators={"ltau": ltau}, store_arrays=True)
    atoms = test_frames[0].copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    np.testing.assert_array_equal(atoms.arrays["ltau_uncertainty"],
                                  calc.results["ltau_uncertainty"])
    assert "ltau_uncertainty_max" not in atoms.arrays


def test_get_property_of_uncertainty(calc, test_frames):
    atoms = test_frames[0].copy()
    values = calc.get_property("ltau_uncertainty", atoms)
    assert values.shape == (len(atoms),)


def test_without_estimators_only_energy_and_forces(model_path, test_frames):
    calc = UQCalculator.from_model(model_path)
    _, _, _, results = evaluate(test_frames[0], calc)
    assert not any(key.endswith("_uncertainty") for key in results)
    assert "descriptors" not in results


def test_from_run_auto_without_fit_has_no_estimator(run, test_frames):
    calc = UQCalculator.from_run(run.path)
    assert calc.estimators == {}


def test_bad_estimators(model_path):
    with pytest.raises(InputError, match="estimators: 'ltau' is a str, not a UQMethod"):
        UQCalculator.from_model(model_path, estimators={"ltau": "x"})
    with pytest.raises(InputError, match="estimators: expected a dict"):
        UQCalculator.from_model(model_path, estimators=[NormEstimator()])


def test_bad_model_id(run):
    with pytest.raises(InputError, match="model_id: 'model_9' is not a member"):
        UQCalculator.from_run(run.path, model_id="model_9")


def test_missing_model(tmp_path):
    with pytest.raises(InputError, match="not found"):
        UQCalculator.from_model(tmp_path / "nothing.nequip.zip")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MLIPUQ_SKIP_COMPILE") == "1",
                    reason="MLIPUQ_SKIP_COMPILE=1: AOTInductor compile (~2 min) skipped")
def test_compiled_model_keeps_descriptors(model_path, ltau, calc, test_frames, tmp_path):
    from mlipuq.backends.nequip.compile import compile_model

    started = time.perf_counter()
    compiled = compile_model(model_path, tmp_path / "m.nequip.pt2")
    print(f"compile took {time.perf_counter() - started:.0f} s")
    fast = UQCalculator.from_compiled(compiled, estimators={"ltau": ltau}, keep_descriptors=True)
    _, energy, forces, results = evaluate(test_frames[1], fast)
    _, ref_energy, ref_forces, ref = evaluate(test_frames[1], calc)
    assert energy == pytest.approx(ref_energy, rel=1e-6)
    np.testing.assert_allclose(forces, ref_forces, atol=1e-5)
    np.testing.assert_allclose(results["descriptors"], ref["descriptors"], atol=1e-5)
    np.testing.assert_allclose(results["ltau_uncertainty"], ref["ltau_uncertainty"], atol=1e-6)
