"""Atom table, result type, validation, atomic writes and thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from mlipuq import AtomTable, InputError, UQResult
from mlipuq.atom_table import config_max, config_mean
from mlipuq.io import atomic_path, read_structures
from mlipuq.thresholds import tukey_fence
from mlipuq.validation import as_species, check_array, check_consistent_length


def _frame(symbols: str, forces: np.ndarray | None, config_type: str) -> Atoms:
    atoms = Atoms(symbols)
    atoms.positions = np.arange(3 * len(atoms), dtype=float).reshape(-1, 3)
    atoms.info["config_type"] = config_type
    if forces is not None:
        atoms.calc = SinglePointCalculator(atoms, forces=forces, energy=-1.0)
    return atoms


def test_atom_table_order_and_force_norms():
    forces = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    frames = [_frame("H2", forces, "bulk"), _frame("CuOH", None, "surface")]
    table = AtomTable.from_atoms(frames)
    assert table.n_atoms == 5 and table.n_configs == 2
    np.testing.assert_array_equal(table.config_index, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(table.atom_index, [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(table.species, ["H", "H", "Cu", "O", "H"])
    np.testing.assert_allclose(table.force_norm[:2], [5.0, 1.0])
    assert np.isnan(table.force_norm[2:]).all()
    np.testing.assert_array_equal(table.atom_group, ["bulk"] * 2 + ["surface"] * 3)


def test_atom_table_roundtrip_and_fingerprint(tmp_path):
    table = AtomTable.from_sizes([2, 3], ["H", "H", "O", "O", "H"], config_type=["a", "b"])
    table.save(tmp_path / "table.npz")
    loaded = AtomTable.load(tmp_path / "table.npz")
    assert loaded.fingerprint() == table.fingerprint()
    other = AtomTable.from_sizes([3, 2], ["H", "H", "O", "O", "H"])
    assert other.fingerprint() != table.fingerprint()
    with pytest.raises(InputError, match="has 4 atoms but the atom table has 5"):
        table.check_length(4, "trajectory")


def test_config_aggregates():
    values = np.array([1.0, 5.0, 2.0, 0.5])
    index = np.array([0, 0, 1, 2])
    np.testing.assert_allclose(config_max(values, index), [5.0, 2.0, 0.5])
    np.testing.assert_allclose(config_mean(values, index), [3.0, 2.0, 0.5])


def test_validation_messages():
    with pytest.raises(InputError, match="descriptors: contains 1 NaN"):
        check_array([[1.0, np.nan]], "descriptors", ndim=2)
    with pytest.raises(InputError, match="errors: contains negative"):
        check_array([1.0, -2.0], "errors", nonnegative=True)
    with pytest.raises(InputError, match="is empty"):
        check_array([], "errors")
    with pytest.raises(InputError, match=r"descriptors=3, species=2"):
        check_consistent_length(descriptors=np.zeros((3, 2)), species=["H", "O"])
    with pytest.raises(InputError, match="unknown element"):
        as_species(["H", "Xx"])
    np.testing.assert_array_equal(as_species(np.array([1, 29])), ["H", "Cu"])


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_read_structures_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_structures(tmp_path / "missing.xyz")
    bad = tmp_path / "bad.xyz"
    bad.write_text("this is not\nan xyz file\n")
    with pytest.raises(InputError, match="cannot read structures"):
        read_structures(bad)
    no_forces = tmp_path / "noforces.xyz"
    _frame("H2", None, "x").write(no_forces)
    with pytest.raises(InputError, match="configuration 0 has no reference forces"):
        read_structures(no_forces, require_forces=True)


def test_tukey_fence_against_percentiles(rng):
    values = rng.lognormal(size=1001)
    q1, q3 = np.percentile(values, [25, 75])
    assert tukey_fence(values) == pytest.approx(q3 + 1.5 * (q3 - q1))
    assert tukey_fence(values, k=3.0) == pytest.approx(q3 + 3.0 * (q3 - q1))


def test_result_as_arrays():
    result = UQResult(
        "ltau",
        np.array([0.1, 0.9]),
        atom_flags=np.array([False, True]),
        extras={"p": np.array([0.9, 0.1]), "config_energy": np.array([1.0])},
    )
    arrays = result.as_arrays()
    assert set(arrays) == {"ltau_uncertainty", "ltau_flag", "ltau_p"}
