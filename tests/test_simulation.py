"""Simulation with per-step uncertainty logging, stop rules, the descriptor and its calculator."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import read, write

from mlipuq.cli import main
from mlipuq.descriptors import DescriptorUQCalculator, descriptor_matrix, radial_descriptor
from mlipuq.doptimality import DOptimalityEstimator
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod
from mlipuq.simulation import run_simulation, summarise

ELEMENTS = ["Cu"]


def _descriptor(atoms):
    return radial_descriptor(atoms, elements=ELEMENTS, cutoff=4.5, n_radial=6)


@pytest.fixture(scope="module")
def cu_calc():
    """EMT + D-optimality on the radial descriptor, fitted on rattled bulk copper."""
    rng = np.random.default_rng(7)
    frames = []
    for _ in range(8):
        atoms = bulk("Cu", cubic=True).repeat(2)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(atoms)
    features, species, _ = descriptor_matrix(frames, elements=ELEMENTS, cutoff=4.5, n_radial=6)
    estimator = DOptimalityEstimator().fit_arrays(features, species)
    return DescriptorUQCalculator(EMT(), {"doptimality": estimator}, _descriptor)


@pytest.fixture
def cu_start():
    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.rattle(0.02, seed=3)
    return atoms


# --------------------------------------------------------------------------- descriptor


def test_radial_descriptor_matches_brute_force():
    rng = np.random.default_rng(0)
    atoms = bulk("Cu", cubic=True).repeat(3)
    atoms.symbols[[1, 5, 9]] = "Au"
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    cutoff, n_radial = 4.0, 5
    got = radial_descriptor(atoms, elements=["Au", "Cu"], cutoff=cutoff, n_radial=n_radial)
    centres = np.linspace(0.5, cutoff, n_radial)
    width = centres[1] - centres[0]
    # the cell (10.8 Å) exceeds 2 * cutoff: one image per pair, minimum-image distances
    distances = atoms.get_all_distances(mic=True)
    expected = np.zeros((len(atoms), 2 * n_radial))
    for i in range(len(atoms)):
        for j in range(len(atoms)):
            d = distances[i, j]
            if i == j or d >= cutoff:
                continue
            block = 0 if atoms.symbols[j] == "Au" else 1
            g = np.exp(-((d - centres) ** 2) / (2 * width**2)) * 0.5 * (np.cos(np.pi * d / cutoff)
                                                                       + 1)
            expected[i, block * n_radial:(block + 1) * n_radial] += g
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_radial_descriptor_unknown_element():
    atoms = Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(InputError, match=r"element\(s\) \['Au'\] not among the known elements"):
        radial_descriptor(atoms, elements=["Cu"])


def test_descriptor_calculator_adds_estimator_arrays(cu_calc, cu_start):
    atoms = cu_start.copy()
    atoms.calc = cu_calc
    energy = atoms.get_potential_energy()
    reference = cu_start.copy()
    reference.calc = EMT()
    assert energy == pytest.approx(reference.get_potential_energy(), abs=1e-12)
    gamma = cu_calc.estimators["doptimality"].gamma(_descriptor(atoms), atoms.symbols)
    np.testing.assert_allclose(cu_calc.results["doptimality_uncertainty"], gamma)


# --------------------------------------------------------------------------- MD logging


def test_md_log_equals_reevaluated_frames(cu_calc, cu_start, tmp_path):
    traj, table = tmp_path / "md.extxyz", tmp_path / "md.csv"
    log = run_simulation(cu_start, cu_calc, kind="md", steps=12, temperature_K=600,
                         timestep_fs=2.0, seed=1, log_path=traj, table_path=table)
    assert log.n_frames == 13 and log.steps.tolist() == list(range(13))
    np.testing.assert_allclose(log.times_fs, 2.0 * np.arange(13))
    frames = read(traj, ":")
    assert len(frames) == 13
    key = "doptimality_uncertainty"
    stored = [f.arrays[key] for f in frames]
    for number, frame in enumerate(frames):
        assert frame.info["step"] == number
        # what the file says equals the log
        # (extxyz stores per-atom floats with 8 decimals)
        assert stored[number].max() == pytest.approx(log.uncertainty_max[key][number], abs=1e-8)
        assert stored[number].mean() == pytest.approx(log.uncertainty_mean[key][number],
                                                      abs=1e-8)
        assert frame.get_potential_energy() == pytest.approx(log.energies[number], rel=1e-12)
        # re-evaluating the saved positions gives the logged uncertainty (extxyz: 8 decimals)
        fresh = frame.copy()
        fresh.calc = cu_calc
        fresh.get_potential_energy()
        np.testing.assert_allclose(cu_calc.results[key], stored[number], rtol=1e-5)
        np.testing.assert_allclose(fresh.get_forces(), frame.get_forces(), atol=1e-6)
    # the trajectory moved away from the training set: uncertainty is not constant
    assert np.ptp(log.uncertainty_max[key]) > 1e-3
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 13
    np.testing.assert_allclose([float(r[f"max_{key}"]) for r in rows], log.uncertainty_max[key])
    np.testing.assert_allclose([float(r["energy_eV"]) for r in rows], log.energies)
    np.testing.assert_allclose([float(r["time_fs"]) for r in rows], log.times_fs)


def test_md_is_reproducible_with_seed(cu_calc, cu_start):
    first = run_simulation(cu_start, cu_calc, steps=5, seed=11, temperature_K=300)
    second = run_simulation(cu_start, cu_calc, steps=5, seed=11, temperature_K=300)
    other = run_simulation(cu_start, cu_calc, steps=5, seed=12, temperature_K=300)
    np.testing.assert_array_equal(first.energies, second.energies)
    assert not np.allclose(first.energies[1:], other.energies[1:])


def test_summary_and_atom_mask(cu_calc, cu_start, tmp_path):
    mask = [0, 3, 7]
    log = run_simulation(cu_start, cu_calc, steps=6, seed=2, aggregate="mean", atoms_mask=mask,
                         log_path=tmp_path / "t.extxyz")
    key = "doptimality_uncertainty"
    frames = read(tmp_path / "t.extxyz", ":")
    per_frame_mean = np.array([f.arrays[key][mask].mean() for f in frames])
    np.testing.assert_allclose(log.uncertainty(key), per_frame_mean, atol=1e-8)
    stats = summarise(log)["uncertainty"][key]
    series = log.uncertainty(key)
    assert stats["initial"] == series[0] and stats["final"] == series[-1]
    assert stats["max"] == series.max() and stats["mean"] == pytest.approx(series.mean())
    assert stats["argmax_step"] == int(np.argmax(series))
    assert stats["max"] == pytest.approx(per_frame_mean.max(), abs=1e-8)


def test_relaxation_converges_and_logs(cu_calc, tmp_path):
    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.rattle(0.1, seed=4)
    log = run_simulation(atoms, cu_calc, kind="relax", steps=200, fmax=0.02,
                         log_path=tmp_path / "r.extxyz")
    assert log.converged and not log.stopped
    assert log.fmax[-1] < 0.02 <= log.fmax[0]
    assert np.all(np.isnan(log.times_fs))
    frames = read(tmp_path / "r.extxyz", ":")
    assert len(frames) == log.n_frames
    final = np.sqrt((frames[-1].get_forces() ** 2).sum(axis=1)).max()
    assert final == pytest.approx(log.fmax[-1], rel=1e-6)


# --------------------------------------------------------------------------- stop rules


class ZeroForce(Calculator):
    """No forces: atoms fly at constant velocity, so positions are known at every step."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


def _flying_pair(speed_A_per_fs=0.1):
    atoms = Atoms("H2", positions=[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    atoms.set_velocities([[0.0, 0.0, 0.0], [speed_A_per_fs / units.fs, 0.0, 0.0]])
    # uncertainty of each atom = its x coordinate in Å: grows linearly with the step
    calc = DescriptorUQCalculator(ZeroForce(), {"x": lambda f, s: f[:, 0]},
                                  descriptor_fn=lambda a: a.positions[:, :1].copy())
    return atoms, calc


def test_stop_at_first_crossing(tmp_path):
    atoms, calc = _flying_pair()
    # x of atom 1 at step n is 5 + 0.1 * 0.5 * n Å: first above 5.3375 at n = 7
    log = run_simulation(atoms, calc, kind="md", thermostat="nve", set_velocities=False,
                         steps=50, timestep_fs=0.5, stop_on="x_uncertainty",
                         stop_threshold=5.3375, log_path=tmp_path / "s.extxyz")
    assert log.stopped and log.stop_step == 7
    assert log.n_frames == 8
    x = log.uncertainty("x_uncertainty")
    np.testing.assert_allclose(x, 5 + 0.05 * np.arange(8), rtol=1e-12)
    assert np.all(x[:-1] <= 5.3375) and x[-1] > 5.3375
    frames = read(tmp_path / "s.extxyz", ":")
    assert len(frames) == 8 and frames[-1].info["step"] == 7  # the crossing frame is logged


class _XWithThreshold(UQMethod):
    """A method whose result carries a fitted threshold (as LTAU after calibrate)."""

    name = "x"

    def predict(self, X):
        from mlipuq.result import UQResult

        features = X.descriptors
        return UQResult("x", features[:, 0], threshold=5.3375,
                        extras={"knn_distance_normalised": features[:, 0] / 5.0})


def test_fitted_threshold_is_the_default_stop_level(tmp_path):
    atoms = Atoms("H2", positions=[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    atoms.set_velocities([[0.0, 0.0, 0.0], [0.1 / units.fs, 0.0, 0.0]])
    calc = DescriptorUQCalculator(ZeroForce(), {"x": _XWithThreshold()},
                                  descriptor_fn=lambda a: a.positions[:, :1].copy())
    log = run_simulation(atoms, calc, thermostat="nve", set_velocities=False, steps=50,
                         timestep_fs=0.5, stop_on="x_uncertainty",
                         table_path=tmp_path / "t.csv")
    assert log.stopped and log.stop_step == 7  # as with stop_threshold=5.3375 given
    # the out-of-domain score is logged beside the uncertainty, per frame
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert "max_x_knn_distance_normalised" in header
    np.testing.assert_allclose(log.uncertainty_max["x_knn_distance_normalised"],
                               log.uncertainty_max["x_uncertainty"] / 5.0)
    summary = summarise(log)
    assert summary["stop_threshold"] == 5.3375 and summary["threshold_source"] == "fitted"
    with pytest.raises(InputError, match="fitted x threshold is on the max over the atoms"):
        run_simulation(atoms, calc, thermostat="nve", set_velocities=False, steps=5,
                       stop_on="x_uncertainty", aggregate="mean")
    with pytest.raises(InputError, match="required with atoms_mask"):
        run_simulation(atoms, calc, thermostat="nve", set_velocities=False, steps=5,
                       stop_on="x_uncertainty", atoms_mask=[1],
                       log_path=tmp_path / "never.extxyz")
    assert not (tmp_path / "never.extxyz").exists()  # refused before anything is written


def test_snapshot_mode_saves_crossings_and_continues(tmp_path):
    atoms, calc = _flying_pair()
    log = run_simulation(atoms, calc, kind="md", thermostat="nve", set_velocities=False,
                         steps=10, timestep_fs=0.5, stop_on="x", stop_threshold=5.3375,
                         stop_mode="snapshot", log_path=tmp_path / "s.extxyz")
    assert not log.stopped and log.n_frames == 11
    assert log.snapshot_steps == [7, 8, 9, 10]
    snapshots = read(tmp_path / "s_snapshots.extxyz", ":")
    assert [f.info["step"] for f in snapshots] == [7, 8, 9, 10]
    np.testing.assert_allclose([f.positions[1, 0] for f in snapshots],
                               5 + 0.05 * np.arange(7, 11), rtol=1e-7)


def test_break_threshold_ends_a_snapshot_run_at_its_first_crossing(tmp_path):
    atoms, calc = _flying_pair()
    # x(n) = 5 + 0.05 n: snapshots above 5.3375 from n = 7, break above 5.4375 at n = 9
    log = run_simulation(atoms, calc, kind="md", thermostat="nve", set_velocities=False,
                         steps=50, timestep_fs=0.5, stop_on="x", stop_threshold=5.3375,
                         stop_mode="snapshot", break_threshold=5.4375,
                         log_path=tmp_path / "s.extxyz")
    assert log.stopped and log.stop_step == 9 and log.n_frames == 10
    assert log.snapshot_steps == [7, 8, 9]
    snapshots = read(tmp_path / "s_snapshots.extxyz", ":")
    assert [f.info["step"] for f in snapshots] == [7, 8, 9]  # the break frame is saved too
    assert summarise(log)["break_threshold"] == 5.4375


@pytest.mark.parametrize("mode", ["stop", "snapshot"])
def test_min_steps_delays_the_stop_rule(mode, tmp_path):
    atoms, calc = _flying_pair()
    # x(n) = 5 + 0.05 n is above 5.3375 from n = 7; the rule applies from n = 12 on
    log = run_simulation(atoms, calc, kind="md", thermostat="nve", set_velocities=False,
                         steps=15, timestep_fs=0.5, stop_on="x", stop_threshold=5.3375,
                         stop_mode=mode, min_steps=12, log_path=tmp_path / "s.extxyz")
    np.testing.assert_allclose(log.uncertainty("x_uncertainty")[:8], 5 + 0.05 * np.arange(8))
    if mode == "stop":
        assert log.stopped and log.stop_step == 12 and log.n_frames == 13
        assert log.snapshot_steps == [12]
    else:
        assert not log.stopped and log.n_frames == 16
        assert log.snapshot_steps == [12, 13, 14, 15]
        snapshots = read(tmp_path / "s_snapshots.extxyz", ":")
        assert [f.info["step"] for f in snapshots] == [12, 13, 14, 15]
    assert summarise(log)["min_steps"] == 12


def test_min_steps_zero_is_the_plain_rule():
    atoms, calc = _flying_pair()
    log = run_simulation(atoms, calc, kind="md", thermostat="nve", set_velocities=False,
                         steps=50, timestep_fs=0.5, stop_on="x", stop_threshold=5.3375,
                         min_steps=0)
    assert log.stop_step == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_steps": 11}, r"min_steps: expected 0 <= min_steps <= steps \(10\), got 11"),
        ({"min_steps": -1}, r"min_steps: expected 0 <= min_steps <= steps \(10\), got -1"),
        ({"min_steps": 2.5}, "min_steps: expected an integer, got 2.5"),
        ({"min_steps": 3, "stop_on": None, "stop_threshold": None},
         "min_steps: given without stop_on"),
    ],
)
def test_bad_min_steps(kwargs, match):
    atoms, calc = _flying_pair()
    options = {"stop_on": "x", "stop_threshold": 5.3375, **kwargs}
    with pytest.raises(InputError, match=match):
        run_simulation(atoms, calc, steps=10, **options)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stop_mode": "stop", "break_threshold": 6.0}, "only with stop_mode='snapshot'"),
        ({"stop_mode": "snapshot", "break_threshold": 5.0}, r"expected > stop_threshold"),
        ({"stop_mode": "snapshot", "break_threshold": float("inf")},
         "break_threshold: expected a finite"),
    ],
)
def test_bad_break_threshold(kwargs, match):
    atoms, calc = _flying_pair()
    with pytest.raises(InputError, match=match):
        run_simulation(atoms, calc, steps=2, stop_on="x", stop_threshold=5.3375, **kwargs)


def test_mean_aggregate_changes_the_stop_step():
    atoms, calc = _flying_pair()
    # mean x = (0 + 5 + 0.05 n) / 2 > 2.6 first at n = 5
    log = run_simulation(atoms, calc, kind="md", thermostat="nve", set_velocities=False,
                         steps=50, timestep_fs=0.5, stop_on="x_uncertainty", stop_threshold=2.6,
                         aggregate="mean")
    assert log.stop_step == 5


class Crashing(ZeroForce):
    """Raises on the 5th evaluation (a model blowing up mid-run)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        self.calls += 1
        if self.calls == 5:
            raise RuntimeError("model exploded")
        super().calculate(atoms, properties, system_changes)


def test_crash_leaves_the_old_output_and_complete_partial_frames(tmp_path):
    (tmp_path / "c.extxyz").write_text("previous run\n")
    atoms, _ = _flying_pair()
    calc = DescriptorUQCalculator(Crashing(), {"x": lambda f, s: f[:, 0]},
                                  descriptor_fn=lambda a: a.positions[:, :1].copy())
    with pytest.raises(RuntimeError, match="exploded"):
        run_simulation(atoms, calc, thermostat="nve", set_velocities=False, steps=20,
                       log_path=tmp_path / "c.extxyz", table_path=tmp_path / "c.csv")
    assert (tmp_path / "c.extxyz").read_text() == "previous run\n"  # untouched
    assert not (tmp_path / "c.csv").exists()
    frames = read(tmp_path / "c.extxyz.partial", ":", format="extxyz")  # complete frames
    assert len(frames) == 4
    assert [f.info["step"] for f in frames] == [0, 1, 2, 3]
    assert len((tmp_path / "c.csv.partial").read_text().splitlines()) == 5  # header + 4
    # the next run replaces both and leaves no partial file
    atoms, calc = _flying_pair()
    run_simulation(atoms, calc, thermostat="nve", set_velocities=False, steps=2,
                   log_path=tmp_path / "c.extxyz", table_path=tmp_path / "c.csv")
    assert len(read(tmp_path / "c.extxyz", ":")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.extxyz"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("key", "threshold", "match"),
    [
        ("x_uncertainty", -1.0, "threshold: expected a finite number >= 0"),
        ("x_uncertainty", float("nan"), "threshold: expected a finite number >= 0"),
        ("ltau_uncertainty", 1.5, r"ltau_uncertainty is in \[0, 1\]"),
        ("x_uncertainty", None, "the x estimator has no fitted threshold"),
        (None, 2.0, "stop_threshold: given without stop_on"),
    ],
)
def test_bad_thresholds(key, threshold, match):
    atoms, calc = _flying_pair()
    with pytest.raises(InputError, match=match):
        run_simulation(atoms, calc, steps=2, stop_on=key, stop_threshold=threshold)


def test_missing_stop_key_and_missing_uncertainty(tmp_path):
    atoms, calc = _flying_pair()
    with pytest.raises(InputError, match=r"the calculator gives no 'gamma_uncertainty'.*"
                                         r"x_uncertainty"):
        run_simulation(atoms, calc, steps=2, stop_on="gamma", stop_threshold=1.0)
    with pytest.raises(InputError, match="no per-atom '\\*_uncertainty' array"):
        run_simulation(bulk("Cu", cubic=True), EMT(), steps=2, log_path=tmp_path / "no.extxyz")
    assert not (tmp_path / "no.extxyz").exists()  # nothing written for a refused run


def test_unknown_element_in_start_structure(cu_calc):
    atoms = bulk("Cu", cubic=True)
    atoms.symbols[0] = "Au"
    with pytest.raises(InputError, match=r"\['Au'\] not among the known elements"):
        run_simulation(atoms, cu_calc, steps=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "mc"}, "kind: expected one of"),
        ({"aggregate": "median"}, "aggregate: expected one of"),
        ({"stop_mode": "pause"}, "stop_mode: expected one of"),
        ({"steps": -1}, "steps: expected >= 0"),
        ({"timestep_fs": 0.0}, "timestep_fs: expected a finite positive number"),
        ({"atoms_mask": [5]}, "atoms_mask: index out of range"),
        ({"atoms_mask": np.zeros(2, bool)}, "atoms_mask: selects no atoms"),
    ],
)
def test_bad_options(kwargs, match):
    atoms, calc = _flying_pair()
    with pytest.raises(InputError, match=match):
        run_simulation(atoms, calc, **{"steps": 2, **kwargs})


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_calc(monkeypatch, cu_calc):
    import mlipuq.cli.simulate as simulate_cli

    monkeypatch.setattr(simulate_cli, "make_calculator", lambda args: cu_calc)
    return cu_calc


@pytest.fixture
def start_file(cu_start, tmp_path):
    """The rattled copper start written as extxyz."""
    path = tmp_path / "start.xyz"
    write(path, cu_start, format="extxyz")
    return path


def test_cli_simulate(cli_calc, start_file, tmp_path, capsys):
    out = tmp_path / "traj.extxyz"
    code = main(["simulate", "--run", str(tmp_path), "--structure", str(start_file), "--steps", "4",
                 "--temperature", "300", "--stop-on", "doptimality_uncertainty",
                 "--stop-threshold", "1e6", "--out", str(out), "--seed", "5"])
    assert code == 0
    frames = read(out, ":")
    assert len(frames) == 5
    summary = json.loads((tmp_path / "traj.summary.json").read_text())
    gamma_max = np.array([f.arrays["doptimality_uncertainty"].max() for f in frames])
    stats = summary["uncertainty"]["doptimality_uncertainty"]
    assert stats["max"] == pytest.approx(gamma_max.max())
    assert stats["initial"] == pytest.approx(gamma_max[0])
    assert (tmp_path / "traj.csv").exists()
    assert "5 frames" in capsys.readouterr().out


def test_cli_simulate_break_threshold(cli_calc, start_file, tmp_path, capsys):
    out = tmp_path / "traj.extxyz"
    code = main(["simulate", "--run", str(tmp_path), "--structure", str(start_file), "--steps", "3",
                 "--stop-on", "doptimality_uncertainty", "--stop-threshold", "0",
                 "--stop-mode", "snapshot", "--break-threshold", "1e-9", "--out", str(out)])
    assert code == 0
    assert len(read(out, ":")) == 1 and len(read(tmp_path / "traj_snapshots.extxyz", ":")) == 1
    assert "stopped at step 0: doptimality_uncertainty (max) > 1e-09" in capsys.readouterr().out


def test_cli_simulate_min_steps(cli_calc, start_file, tmp_path, capsys):
    out = tmp_path / "traj.extxyz"
    code = main(["simulate", "--run", str(tmp_path), "--structure", str(start_file), "--steps", "4",
                 "--stop-on", "doptimality_uncertainty", "--stop-threshold", "0",
                 "--min-steps", "2", "--out", str(out)])
    assert code == 0
    assert [f.info["step"] for f in read(out, ":")] == [0, 1, 2]
    assert json.loads((tmp_path / "traj.summary.json").read_text())["min_steps"] == 2
    assert "stopped at step 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--stop-on", "doptimality_uncertainty", "--stop-threshold", "-1"], "threshold"),
        (["--stop-on", "ltau_uncertainty", "--stop-threshold", "2"], r"\[0, 1\]"),
        (["--index", "9"], "--index: 9 out of range"),
        (["--steps", "-5"], r"--steps: expected >= 0, got -5"),
        (["--stop-on", "doptimality_uncertainty", "--stop-threshold", "2", "--min-steps", "3"],
         r"min_steps: expected 0 <= min_steps <= steps \(2\), got 3"),
        (["--stop-on", "doptimality_uncertainty", "--stop-threshold", "2", "--stop-mode",
          "snapshot", "--break-threshold", "1"], "break_threshold: expected > stop_threshold"),
    ],
)
def test_cli_simulate_bad_input_exits_2(cli_calc, start_file, tmp_path, capsys, extra, match):
    code = main(["simulate", "--run", str(tmp_path), "--structure", str(start_file), "--steps", "2",
                 "--out", str(tmp_path / "t.extxyz"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mlipuq: error:") and len(err.strip().splitlines()) == 1
    assert re.search(match, err)


def test_cli_simulate_unknown_element_exits_2(cli_calc, tmp_path, capsys):
    atoms = bulk("Cu", cubic=True)
    atoms.symbols[1] = "Ag"
    write(tmp_path / "start.xyz", atoms, format="extxyz")
    code = main(["simulate", "--run", str(tmp_path), "--structure", str(tmp_path / "start.xyz"),
                 "--steps", "2", "--out", str(tmp_path / "t.extxyz")])
    assert code == 2
    assert "['Ag'] not among the known elements" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("nan", r"atom 2 of the start structure has a NaN or infinite position"),
        ("overlap", r"atoms 0 and 1 of the start structure are 0.01 Å apart \(overlapping"),
    ],
)
def test_cli_simulate_refuses_broken_start_structures(cli_calc, tmp_path, capsys, change, match):
    atoms = bulk("Cu", cubic=True)
    positions = atoms.get_positions()
    if change == "nan":
        positions[2, 0] = np.nan
    else:
        positions[1] = positions[0] + [0.01, 0.0, 0.0]
    atoms.set_positions(positions)
    write(tmp_path / "start.xyz", atoms, format="extxyz")
    code = main(["simulate", "--run", str(tmp_path), "--structure", str(tmp_path / "start.xyz"),
                 "--steps", "2", "--out", str(tmp_path / "t.extxyz")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "t.extxyz").exists()


def test_cli_simulate_element_not_in_the_run(tmp_path, capsys):
    """A run folder's elements are checked before the model is loaded."""
    import json

    (tmp_path / "run").mkdir()
    from mlipuq.run_folder import FORMAT_NAME, FORMAT_VERSION

    (tmp_path / "run" / "run.json").write_text(json.dumps({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_ids": ["model_0"],
        "elements": ["Cu"]}))
    atoms = bulk("Cu", cubic=True)
    atoms.symbols[1] = "Ag"
    write(tmp_path / "start.xyz", atoms, format="extxyz")
    code = main(["simulate", "--run", str(tmp_path / "run"), "--structure",
                 str(tmp_path / "start.xyz"), "--steps", "2", "--out", str(tmp_path / "t.extxyz")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "start.xyz: element(s) Ag not in the run's training set (trained on Cu)" in err
