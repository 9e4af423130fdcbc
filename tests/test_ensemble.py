"""EnsembleEstimator and the max-deviation metrics against direct numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest

from mlipuq.ensemble import (
    EnsembleEstimator,
    energy_error,
    energy_max_deviation,
    force_error,
    force_max_deviation,
)
from mlipuq.exceptions import InputError, NotFittedError


@pytest.fixture
def ensemble(rng):
    sizes = np.array([3, 5, 2, 4, 6, 3, 5, 4])
    index = np.repeat(np.arange(len(sizes)), sizes)
    n_models, n_atoms = 5, int(sizes.sum())
    ref_forces = rng.normal(size=(n_atoms, 3))
    forces = ref_forces + rng.normal(scale=0.1, size=(n_models, n_atoms, 3))
    ref_energies = rng.normal(size=len(sizes)) * 10
    energies = ref_energies + rng.normal(scale=0.05, size=(n_models, len(sizes)))
    return forces, energies, index, ref_forces, ref_energies, sizes


def _loop_force_deviation(forces):
    mean = forces.mean(axis=0)
    return np.array(
        [
            max(np.sqrt(np.sum((forces[k, i] - mean[i]) ** 2)) for k in range(len(forces)))
            for i in range(forces.shape[1])
        ]
    )


def _fence(values, k=1.5):
    q1, q3 = np.percentile(values, [25, 75])
    return q3 + k * (q3 - q1)


def test_pure_functions_match_direct_formulas(ensemble):
    forces, energies, _, ref_forces, ref_energies, _ = ensemble
    np.testing.assert_allclose(force_max_deviation(forces), _loop_force_deviation(forces))
    direct_e = np.max(np.abs(energies - energies.mean(axis=0)), axis=0)
    np.testing.assert_allclose(energy_max_deviation(energies), direct_e)
    np.testing.assert_allclose(
        force_error(forces, ref_forces),
        [np.linalg.norm(ref_forces[i] - forces[:, i].mean(axis=0)) for i in range(len(ref_forces))],
    )
    np.testing.assert_allclose(
        energy_error(energies, ref_energies), np.abs(ref_energies - energies.mean(axis=0))
    )
    two = np.zeros((2, 1, 3))
    two[0, 0] = [3.0, 4.0, 0.0]
    assert force_max_deviation(two)[0] == pytest.approx(2.5)


def test_fit_predict_uncertainty_fences(ensemble):
    forces, energies, index, ref_forces, ref_energies, sizes = ensemble
    est = EnsembleEstimator().fit_arrays(forces, energies, index)
    u_atom = _loop_force_deviation(forces)
    u_cfg = np.array([u_atom[index == c].max() for c in range(len(sizes))])
    u_energy = np.max(np.abs(energies - energies.mean(axis=0)), axis=0)
    assert est.threshold_source_ == "uncertainty"
    assert est.thresholds_["atom_force"] == pytest.approx(_fence(u_atom))
    assert est.thresholds_["config_force"] == pytest.approx(_fence(u_cfg))
    assert est.thresholds_["config_energy"] == pytest.approx(_fence(u_energy))
    test_forces = forces * np.linspace(0.5, 2.0, forces.shape[1])[None, :, None]
    result = est.predict_arrays(
        test_forces, energies * 1.01, index, ref_forces=ref_forces, ref_energies=ref_energies
    )
    u_test = _loop_force_deviation(test_forces)
    np.testing.assert_allclose(result.atom_uncertainty, u_test)
    np.testing.assert_array_equal(result.atom_flags, u_test > _fence(u_atom))
    cfg = np.array([u_test[index == c].max() for c in range(len(sizes))])
    np.testing.assert_allclose(result.config_uncertainty, cfg)
    np.testing.assert_array_equal(result.config_flags, cfg > _fence(u_cfg))
    e_unc = np.max(np.abs(energies * 1.01 - (energies * 1.01).mean(axis=0)), axis=0)
    np.testing.assert_allclose(result.extras["config_energy_uncertainty"], e_unc)
    np.testing.assert_array_equal(result.extras["config_energy_flag"], e_unc > _fence(u_energy))
    err = np.linalg.norm(ref_forces - test_forces.mean(axis=0), axis=1)
    np.testing.assert_allclose(result.extras["force_error"], err)
    np.testing.assert_allclose(
        result.extras["config_force_error"], [err[index == c].max() for c in range(len(sizes))]
    )
    np.testing.assert_allclose(
        result.extras["config_energy_error"], np.abs(ref_energies - (energies * 1.01).mean(axis=0))
    )
    assert result.method == "ensemble" and result.unit == "eV/Å"
    assert result.threshold == pytest.approx(_fence(u_atom))


def test_threshold_on_error_and_energy_per_atom(ensemble):
    forces, energies, index, ref_forces, ref_energies, sizes = ensemble
    est = EnsembleEstimator(threshold_on="error", energy_per_atom=True, fence_k=3.0).fit_arrays(
        forces, energies, index, ref_forces=ref_forces, ref_energies=ref_energies
    )
    err = np.linalg.norm(ref_forces - forces.mean(axis=0), axis=1)
    e_err = np.abs(ref_energies - energies.mean(axis=0)) / sizes
    assert est.threshold_source_ == "error"
    assert est.thresholds_["atom_force"] == pytest.approx(_fence(err, 3.0))
    assert est.thresholds_["config_energy"] == pytest.approx(_fence(e_err, 3.0))
    result = est.predict_arrays(forces, energies, index)
    np.testing.assert_allclose(
        result.extras["config_energy_uncertainty"], energy_max_deviation(energies) / sizes
    )
    assert "force_error" not in result.extras


def test_forces_only_and_save_load(tmp_path, ensemble):
    forces, _, index, _, _, _ = ensemble
    est = EnsembleEstimator(fence_k=2.0).fit_arrays(forces, None, index)
    assert set(est.thresholds_) == {"atom_force", "config_force"}
    est.save(tmp_path / "ens.json")
    loaded = EnsembleEstimator.load(tmp_path / "ens.json")
    assert loaded.thresholds_ == pytest.approx(est.thresholds_)
    assert loaded.fence_k == 2.0 and loaded.n_models_ == 5
    a, b = est.predict_arrays(forces, None, index), loaded.predict_arrays(forces, None, index)
    np.testing.assert_array_equal(a.atom_flags, b.atom_flags)


def test_bad_inputs(ensemble):
    forces, energies, index, ref_forces, ref_energies, _ = ensemble
    with pytest.raises(InputError, match="ref_forces: required by threshold_on='error'"):
        EnsembleEstimator(threshold_on="error").fit_arrays(forces, energies, index)
    with pytest.raises(InputError, match="ref_energies: required by threshold_on='error'"):
        EnsembleEstimator(threshold_on="error").fit_arrays(
            forces, energies, index, ref_forces=ref_forces
        )
    with pytest.raises(InputError, match="threshold_on: expected one of"):
        EnsembleEstimator(threshold_on="mean").fit_arrays(forces, energies, index)
    with pytest.raises(NotFittedError):
        EnsembleEstimator().predict_arrays(forces, energies, index)
    with pytest.raises(InputError, match=r"forces: expected shape \(K >= 2 models"):
        EnsembleEstimator().fit_arrays(forces[:1], None, index)
    with pytest.raises(InputError, match="config_index: expected 32 entries"):
        EnsembleEstimator().fit_arrays(forces, None, index[:-1])
    with pytest.raises(InputError, match="energies: expected 5 models"):
        EnsembleEstimator().fit_arrays(forces, energies[:3], index)
    with pytest.raises(InputError, match="energies: expected 8 configurations"):
        EnsembleEstimator().fit_arrays(forces, energies[:, :4], index)
    bad = forces.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="forces: contains 1 NaN"):
        EnsembleEstimator().fit_arrays(bad, None, index)
    with pytest.raises(InputError, match=r"ref_forces: expected shape \(32, 3\)"):
        EnsembleEstimator().fit_arrays(forces, None, index, ref_forces=ref_forces[:5])
    with pytest.raises(InputError, match="ref_energies: given without ensemble energies"):
        EnsembleEstimator().fit_arrays(forces, None, index, ref_energies=ref_energies)
