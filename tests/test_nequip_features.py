"""NequIPBackend: energies, forces and node_features in atom-table order."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.atom_table import AtomTable  # noqa: E402
from mlipuq.backends.nequip.features import (  # noqa: E402
    NequIPBackend,
    load_model,
    predict_features,
)
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402
from nequip_support import make_emt_copper_frames, make_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    run_dir = make_tiny_run(tmp_path_factory.mktemp("features"), n_models=1, epochs=2)
    return RunFolder.open(run_dir).model_path("model_0")


@pytest.fixture(scope="module")
def frames():
    """Frames of two sizes (8 and 16 atoms), so batches mix graph sizes."""
    small = make_emt_copper_frames(5, seed=3)
    large = make_emt_copper_frames(4, seed=4, repeat=(2, 2, 1))
    return [small[0], large[0], small[1], small[2], large[1], small[3], large[2], small[4],
            large[3]]


@pytest.fixture(scope="module")
def backend(model_path):
    return NequIPBackend(model_path, batch_size=16, threads=1)


@pytest.fixture(scope="module")
def reference(backend, frames):
    return backend.outputs(frames, batch_size=1)


def readout_width(model) -> int:
    """Input width of the linear energy readout (``num_features`` of the last layer)."""
    readout = model.get_submodule("model.func.per_atom_energy_readout")
    return readout.irreps_in["node_features"].dim


def test_shapes_and_atom_table_order(backend, frames, reference):
    table = AtomTable.from_atoms(frames)
    n_atoms = sum(len(a) for a in frames)
    width = readout_width(backend.model_)
    assert reference.descriptors.shape == (n_atoms, width)
    assert reference.descriptors.dtype == np.float32
    assert reference.forces.shape == (n_atoms, 3)
    assert reference.energies.shape == (len(frames),)
    np.testing.assert_array_equal(reference.config_index, table.config_index)
    np.testing.assert_array_equal(reference.species, table.species)


def test_batch_size_does_not_change_results(backend, frames, reference):
    batched = backend.outputs(frames, batch_size=7)
    np.testing.assert_allclose(batched.descriptors, reference.descriptors, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.forces, reference.forces, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.energies, reference.energies, rtol=1e-7)


def test_frame_alone_equals_its_rows_in_a_batch(backend, frames, reference):
    alone = backend.outputs([frames[4]])
    rows = reference.config_index == 4
    np.testing.assert_allclose(alone.descriptors, reference.descriptors[rows], atol=1e-5)
    np.testing.assert_allclose(alone.forces, reference.forces[rows], atol=1e-5)


def test_rows_follow_atom_order_within_a_frame(backend, frames):
    """Reversing the atoms of one frame reverses its descriptor rows (and nothing else)."""
    reversed_frame = frames[1][::-1]
    out = backend.outputs([frames[0], frames[1], reversed_frame], batch_size=3)
    second = out.descriptors[out.config_index == 1]
    third = out.descriptors[out.config_index == 2]
    np.testing.assert_allclose(third, second[::-1], atol=1e-5)
    forces = out.forces[out.config_index == 1]
    np.testing.assert_allclose(out.forces[out.config_index == 2], forces[::-1], atol=1e-5)


def test_energy_is_affine_in_descriptors_per_species(model_path, frames):
    """The descriptors are the readout input: per-atom energy = a_s * x.w + b_s exactly."""
    from nequip.integrations.ase import NequIPCalculator

    calc = NequIPCalculator._from_saved_model(
        str(model_path), chemical_species_to_atom_type_map=True
    )
    energies = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
        energies.append(calc.results["energies"])
    per_atom = np.concatenate(energies)
    desc = predict_features(model_path, frames).descriptors.astype(np.float64)
    design = np.hstack([desc, np.ones((len(desc), 1))])
    coef, *_ = np.linalg.lstsq(design, per_atom, rcond=None)
    residual = per_atom - design @ coef
    assert len(desc) > desc.shape[1] + 1
    assert np.abs(residual).max() < 1e-4 * max(np.abs(per_atom - per_atom.mean()).max(), 1e-3)


def test_forces_match_nequip_calculator(model_path, frames, reference):
    from nequip.integrations.ase import NequIPCalculator

    calc = NequIPCalculator._from_saved_model(
        str(model_path), chemical_species_to_atom_type_map=True
    )
    for number in (0, 1):
        atoms = frames[number].copy()
        atoms.calc = calc
        rows = reference.config_index == number
        np.testing.assert_allclose(reference.forces[rows], atoms.get_forces(), atol=1e-6)
        assert reference.energies[number] == pytest.approx(
            atoms.get_potential_energy(), rel=1e-9
        )


def test_threads_are_restored(backend, frames):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backend.outputs(frames[:1])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_load_model_is_in_eval_mode(model_path):
    assert not load_model(model_path).training


def test_missing_model(tmp_path):
    with pytest.raises(InputError, match="model: .*missing.nequip.zip not found"):
        NequIPBackend(tmp_path / "missing.nequip.zip").outputs(make_emt_copper_frames(1))


def test_not_a_model_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("x")
    with pytest.raises(InputError, match="not a NequIP saved model"):
        predict_features(path, make_emt_copper_frames(1))


def test_unknown_element(backend, frames):
    atoms = frames[0].copy()
    atoms[0].symbol = "Ag"
    with pytest.raises(InputError, match=r"configuration 1 has element\(s\) \['Ag'\]"):
        backend.outputs([frames[0], atoms])


def test_no_frames_and_bad_batch_size(backend, frames):
    with pytest.raises(InputError, match="at least one configuration"):
        backend.outputs([])
    with pytest.raises(InputError, match="batch_size: expected a positive integer"):
        backend.outputs(frames, batch_size=0)
