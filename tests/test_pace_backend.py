"""pacemaker (python-ace) interoperability: projections, active sets, .asi files.

Every comparison is against python-ace's own functions on the same numbers
(``compute_B_projections``, ``compute_active_set``, ``compute_extrapolation_grade``,
``PyACECalculator.set_active_set``). Structures are small rattled W/Cu BCC cells
built here (no shared data needed).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ase.build import bulk

from mlipuq.backends import pace
from mlipuq.exceptions import InputError

pytest.importorskip("pyace", reason="python-ace is not installed (pip install 'mlipuq[pace]')")

from pyace import activelearning as al  # noqa: E402

ELEMENTS = ("Cu", "W")
SMALL_ORDERS = {"nradmax_by_orders": (6, 3, 2), "lmax_by_orders": (0, 2, 1)}
SMALL_FUNCTIONS = {  # 52 B-functions per element
    "UNARY": SMALL_ORDERS,
    "BINARY": {"nradmax_by_orders": (4, 2), "lmax_by_orders": (0, 1)},
}


def _frames(n_frames: int = 40, n_copper: int = 5, seed: int = 0) -> list:
    """Rattled 16-atom BCC W cells with ``n_copper`` random Cu substitutions."""
    rng = np.random.default_rng(seed)
    frames = []
    for number in range(n_frames):
        atoms = bulk("W", "bcc", a=3.16, cubic=True).repeat((2, 2, 2))
        symbols = atoms.get_chemical_symbols()
        for index in rng.choice(len(atoms), n_copper, replace=False):
            symbols[index] = "Cu"
        atoms.set_chemical_symbols(symbols)
        atoms.rattle(0.1, seed=seed * 1000 + number)
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def backend() -> pace.PaceBackend:
    return pace.PaceBackend(pace.small_test_basis(ELEMENTS, functions=SMALL_FUNCTIONS))


@pytest.fixture(scope="module")
def train(backend):
    frames = _frames()
    features, species, config_index = backend.projections(frames)
    return frames, features, species, config_index


def _by_type(backend, features, species):
    """Our atom-table matrix split into pyace's {species type: rows} dict."""
    index = backend.basis.elements_to_index_map
    return {
        index[e]: features[species == e, : backend.n_functions[e]].copy() for e in backend.elements
    }


def _fitted_estimator(features, species):
    from mlipuq.doptimality import DOptimalityEstimator

    return DOptimalityEstimator(tol=1.01).fit_arrays(features, species)


# --------------------------------------------------------------------------- projections


def test_projections_follow_atom_table_order(backend, train):
    frames, features, species, config_index = train
    sizes = [len(a) for a in frames]
    assert features.shape == (sum(sizes), 52) and features.dtype == np.float64
    np.testing.assert_array_equal(config_index, np.repeat(np.arange(len(frames)), sizes))
    np.testing.assert_array_equal(
        species, np.concatenate([a.get_chemical_symbols() for a in frames])
    )
    # the same rows as pyace's per-species dict, in the same order
    reference = al.compute_B_projections(backend.basis, frames)
    for element, st in backend.basis.elements_to_index_map.items():
        np.testing.assert_array_equal(features[species == element], reference[st])
    # permuting the atoms of a frame permutes its rows (each atom keeps its own row)
    permutation = np.random.default_rng(3).permutation(len(frames[0]))
    permuted, _, _ = backend.projections([frames[0][permutation]])
    np.testing.assert_allclose(permuted, features[: len(frames[0])][permutation], atol=1e-12)


def test_unequal_function_counts_are_zero_padded():
    functions = {
        "ALL": {"nradmax_by_orders": (4, 2), "lmax_by_orders": (0, 1)},
        "W": {"nradmax_by_orders": (6, 3, 2), "lmax_by_orders": (0, 2, 1)},
    }
    backend = pace.PaceBackend(pace.small_test_basis(ELEMENTS, functions=functions))
    assert backend.n_functions == {"Cu": 28, "W": 52} and backend.n_features == 52
    frames = _frames(3)
    features, species, _ = backend.projections(frames)
    by_element = backend.projections_by_element(frames)
    copper, rows = by_element["Cu"]
    assert copper.shape == (15, 28)
    np.testing.assert_array_equal(features[rows, :28], copper)
    assert np.all(features[species == "Cu", 28:] == 0.0)
    assert np.abs(features[species == "W", 28:]).max() > 0


def test_unequal_function_counts_roundtrip_through_pacemaker(tmp_path):
    functions = {
        "ALL": {"nradmax_by_orders": (4, 2), "lmax_by_orders": (0, 1)},
        "W": {"nradmax_by_orders": (6, 3, 2), "lmax_by_orders": (0, 2, 1)},
    }
    backend = pace.PaceBackend(pace.small_test_basis(ELEMENTS, functions=functions))
    features, species, _ = backend.projections(_frames())
    with pytest.warns(UserWarning, match="numerical rank"):  # Cu: 24 zero-padded columns
        estimator = _fitted_estimator(features, species)
    path = tmp_path / "unequal.asi"
    pace.write_estimator_asi(path, estimator, backend)
    shapes = {e: m.shape for e, m in pace.read_asi(path).items()}
    assert shapes == {"Cu": (28, 28), "W": (52, 52)}
    calc = backend.calculator(active_set=path)
    atoms = _frames(1, n_copper=8, seed=21)[0]
    atoms.calc = calc
    atoms.get_potential_energy()
    test_features, test_species, _ = backend.projections([atoms])
    ours = estimator.predict_arrays(test_features, test_species).atom_uncertainty
    np.testing.assert_allclose(calc.results["gamma"], ours, rtol=1e-8, atol=1e-8)
    back = pace.estimator_from_asi(path, elements=backend.elements, n_features=52)
    np.testing.assert_allclose(
        back.predict_arrays(test_features, test_species).atom_uncertainty,
        ours,
        rtol=1e-8,
        atol=1e-8,
    )
    with pytest.raises(InputError, match="rows beyond the element's 28 B-functions"):
        pace.asi_matrices({"Cu": np.ones((52, 28))}, n_functions={"Cu": 28})


def test_potential_read_from_yaml_file(tmp_path, backend, train):
    path = tmp_path / "pot.yaml"
    backend.basis_config.save(str(path))
    frames, features, _, _ = train
    from_file, _, _ = pace.PaceBackend(path).projections(frames[:3])
    np.testing.assert_array_equal(from_file, features[: 3 * 16])


def test_energies_forces_match_finite_differences():
    backend = pace.PaceBackend(pace.small_test_basis(("W",), coefficients="random", **SMALL_ORDERS))
    atoms = _frames(1, n_copper=0)[0]
    energies, forces = backend.energies_forces([atoms])
    assert energies.shape == (1,) and forces.shape == (16, 3)
    assert abs(energies[0]) > 0  # random coefficients: a non-trivial potential
    step, (atom, axis) = 1e-4, (3, 1)
    shifted = []
    for sign in (+1, -1):
        moved = atoms.copy()
        moved.positions[atom, axis] += sign * step
        shifted.append(backend.energies_forces([moved])[0][0])
    numeric = -(shifted[0] - shifted[1]) / (2 * step)
    assert forces[atom, axis] == pytest.approx(numeric, rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- active sets


def test_gamma_equals_pacemaker_on_our_active_set(backend, train):
    _, features, species, config_index = train
    estimator = _fitted_estimator(features, species)
    test_frames = _frames(6, n_copper=8, seed=7)  # more Cu: some extrapolation
    test_features, test_species, test_index = backend.projections(test_frames)
    ours = estimator.predict_arrays(test_features, test_species, config_index=test_index)

    index = backend.basis.elements_to_index_map
    inverse = al.compute_A_active_inverse(
        {index[e]: rows[:, : backend.n_functions[e]] for e, rows in estimator.active_sets_.items()}
    )
    reference = al.compute_extrapolation_grade(
        _by_type(backend, test_features, test_species), inverse
    )
    for element, st in index.items():
        np.testing.assert_allclose(
            ours.atom_uncertainty[test_species == element], reference[st], rtol=1e-8, atol=1e-8
        )
    assert ours.atom_uncertainty.max() > 1.0  # the comparison covers extrapolation too
    per_config = np.array(
        [ours.atom_uncertainty[test_index == c].max() for c in range(len(test_frames))]
    )
    np.testing.assert_allclose(ours.config_uncertainty, per_config)


def test_our_maxvol_volume_at_least_pacemakers(backend, train):
    from mlipuq.maxvol import maxvol

    _, features, species, _ = train
    reference = al.compute_active_set(_by_type(backend, features, species), tol=1.01)
    for element, st in backend.basis.elements_to_index_map.items():
        matrix = features[species == element]
        result = maxvol(matrix, tol=1.01)
        assert result.projection is None  # full rank here: no reduction
        ours = np.linalg.slogdet(matrix[result.indices])
        theirs = np.linalg.slogdet(reference[st])
        # same LU start, same swap rule: the log-volumes agree up to rounding
        assert ours.logabsdet >= theirs.logabsdet - 1e-9 * abs(theirs.logabsdet)
        # and ours is a MaxVol fixed point: no training row has a coefficient > tol
        coefficients = matrix @ np.linalg.inv(matrix[result.indices])
        assert np.abs(coefficients).max() <= 1.01 + 1e-9


# --------------------------------------------------------------------------- .asi files


def test_asi_roundtrip_and_pyace_reads_it(tmp_path, backend, train, rng):
    matrices = {e: rng.standard_normal((d, d)) for e, d in backend.n_functions.items()}
    path = tmp_path / "pot.asi"
    pace.write_asi(path, matrices, elements=backend.elements, n_functions=backend.n_functions)
    assert path.is_file() and not (tmp_path / "pot.asi.npz").exists()
    back = pace.read_asi(path, elements=backend.elements, n_functions=backend.n_functions)
    assert sorted(back) == sorted(matrices)
    for element in matrices:
        np.testing.assert_array_equal(back[element], matrices[element])
    # pyace's reader (sorted element order = species types) sees the same matrices
    loaded = al.load_active_inverse_set(str(path))
    for element, st in backend.basis.elements_to_index_map.items():
        np.testing.assert_array_equal(loaded[st], matrices[element])


def test_rank_deficient_inverse_is_padded_without_changing_gamma(rng):
    inverse = rng.standard_normal((6, 4))  # (D, r) with r < D
    square = pace.asi_matrices({"W": inverse})["W"]
    assert square.shape == (6, 6)
    x = rng.standard_normal((10, 6))
    np.testing.assert_allclose(
        np.abs(x @ square).max(axis=1), np.abs(x @ inverse).max(axis=1), rtol=1e-14
    )
    rows = pace.active_sets_from_asi({"W": square})["W"]
    assert rows.shape == (4, 6)


def test_our_asi_in_pyace_calculator_gives_our_gamma(tmp_path, backend, train):
    _, features, species, _ = train
    estimator = _fitted_estimator(features, species)
    path = tmp_path / "ours.asi"
    pace.write_estimator_asi(path, estimator, backend)
    calc = backend.calculator(active_set=path)
    for atoms in _frames(3, n_copper=8, seed=11):
        atoms.calc = calc
        atoms.get_potential_energy()
        test_features, test_species, _ = backend.projections([atoms])
        ours = estimator.predict_arrays(test_features, test_species).atom_uncertainty
        np.testing.assert_allclose(calc.results["gamma"], ours, rtol=1e-8, atol=1e-8)


def test_pacemaker_asi_becomes_our_estimator(tmp_path, backend, train):
    _, features, species, _ = train
    reference_sets = al.compute_active_set(_by_type(backend, features, species), tol=1.01)
    inverse = al.compute_A_active_inverse(reference_sets)
    path = tmp_path / "theirs.asi"
    al.save_active_inverse_set(str(path), inverse, elements_name=backend.elements)
    estimator = pace.estimator_from_asi(path, elements=backend.elements)
    test_features, test_species, _ = backend.projections(_frames(4, n_copper=8, seed=5))
    ours = estimator.predict_arrays(test_features, test_species).atom_uncertainty
    reference = al.compute_extrapolation_grade(
        _by_type(backend, test_features, test_species), inverse
    )
    for element, st in backend.basis.elements_to_index_map.items():
        np.testing.assert_allclose(
            ours[test_species == element], reference[st], rtol=1e-8, atol=1e-8
        )


# --------------------------------------------------------------------------- bad input


def test_foreign_element_asi_is_rejected(tmp_path, backend, rng):
    path = tmp_path / "fe.asi"
    pace.write_asi(path, {"Fe": np.eye(52), "Cu": np.eye(52)})
    with pytest.raises(InputError, match=r"active set is for elements \['Cu', 'Fe'\]"):
        pace.read_asi(path, elements=backend.elements)
    with pytest.raises(InputError, match="expected exactly"):
        backend.calculator(active_set=path)
    with pytest.raises(InputError, match="expected exactly"):
        pace.estimator_from_asi(path, elements=["Cu", "W"])
    with pytest.raises(InputError, match="expected exactly"):
        pace.write_asi(tmp_path / "x.asi", {"W": np.eye(52)}, elements=backend.elements)


def test_bad_asi_files(tmp_path, backend):
    wrong_size = tmp_path / "small.asi"
    pace.write_asi(wrong_size, {"Cu": np.eye(10), "W": np.eye(10)})
    with pytest.raises(InputError, match=r"Cu matrix is \(10, 10\), the potential has 52"):
        pace.read_asi(wrong_size, n_functions=backend.n_functions)
    not_square = tmp_path / "rect.asi"
    with open(not_square, "wb") as handle:
        np.savez(handle, W=np.ones((3, 2)))
    with pytest.raises(InputError, match="must be square"):
        pace.read_asi(not_square)
    not_elements = tmp_path / "keys.asi"
    with open(not_elements, "wb") as handle:
        np.savez(handle, features=np.ones((3, 3)))
    with pytest.raises(InputError, match="not element symbols"):
        pace.read_asi(not_elements)
    with pytest.raises(InputError, match="file not found"):
        pace.read_asi(tmp_path / "missing.asi")


def test_bad_frames_and_potentials(tmp_path, backend):
    iron = bulk("Fe", "bcc", a=2.87)
    with pytest.raises(InputError, match=r"element\(s\) \['Fe'\] that the potential"):
        backend.projections([iron])
    slab = bulk("W", "bcc", a=3.16)
    slab.pbc = (True, True, False)
    with pytest.raises(InputError, match="mixed periodicity"):
        backend.projections([slab])
    with pytest.raises(InputError, match="at least one configuration"):
        backend.projections([])
    with pytest.raises(InputError, match="file not found"):
        pace.PaceBackend(tmp_path / "nope.yaml")
    other = tmp_path / "pot.yace"
    other.write_text("x")
    with pytest.raises(InputError, match="expected a pacemaker B-basis .yaml"):
        pace.PaceBackend(other)


def test_missing_pyace_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyace", None)  # makes `import pyace` fail
    with pytest.raises(
        InputError, match=r"python-ace is not installed: pip install 'mlipuq\[pace\]'"
    ):
        pace.PaceBackend("pot.yaml")
    assert not pace.pace_available()


# --------------------------------------------------------------------------- linear ACE fit


def _labelled_by(potential, n_frames: int, seed: int) -> list:
    """Rattled 32-atom Cu cells labelled by ``potential`` (pyace's own calculator)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from pyace.asecalc import PyACECalculator

    calc = PyACECalculator(str(potential))
    frames = []
    for number in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.08, seed=seed + number)
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    return frames


def test_linear_fit_design_is_pyace_and_recovers_a_linear_potential(tmp_path):
    from mlipuq.backends import pace_fit

    basis = pace_fit.linear_basis(["Cu"], r_max=4.0, preset="tiny")
    n_coefficients = PaceBackend_n(basis)
    truth = np.random.default_rng(0).normal(size=n_coefficients) * 0.05
    path = pace_fit.write_potential(tmp_path / "truth.yaml", basis, truth)
    frames = _labelled_by(path, 6, seed=10)
    data = pace_fit.design(basis, frames)
    energies, forces = data.predict(truth)  # the design reproduces pyace's evaluation
    np.testing.assert_allclose(energies, data.ref_energy, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(forces, data.ref_forces, atol=1e-10)
    h, b = pace_fit.normal_equations(data, ridge=0.0)
    steps = []
    # the normal equations are ill-conditioned (~1e10 after Jacobi scaling): many epochs
    fitted = pace_fit.conjugate_gradient(h, b, 1000, callback=lambda i, c: steps.append(i))
    assert steps == list(range(1000))  # one callback per epoch
    np.testing.assert_allclose(data.predict(fitted)[1], data.ref_forces, atol=1e-8)
    np.testing.assert_allclose(fitted, truth, atol=1e-5)


def PaceBackend_n(basis) -> int:
    return pace.PaceBackend(basis).n_functions["Cu"]
