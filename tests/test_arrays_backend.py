"""The ``"arrays"`` backend: stored predictions drive fit -> evaluate -> report, no torch.

Data: rattled copper labelled with ASE's EMT (:func:`mlipuq.emt_data.labelled`): bulk
for training, validation and the in-domain test set, a vacancy and a (111) slab out of
domain. The "model" is EMT plus a smooth member-specific force field whose amplitude
grows with how far an atom's environment is from bulk (coordination deficit), so the
errors are larger out of domain and the members disagree where they err. Descriptors
are Gaussian-smeared neighbour-distance histograms (numpy only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from mlipuq.backends.arrays import ArraysBackend, write_run
from mlipuq.exceptions import InputError
from mlipuq.io import reference_energy, reference_forces
from mlipuq.run_folder import RunFolder

CUTOFF = 4.6  # Å, first three fcc shells of Cu (2.55, 3.61, 4.42 Å)
CENTRES = np.linspace(2.0, CUTOFF, 14)
N_EPOCHS = 6
TESTS_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------- fake model
def _pairs(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """(centre atom, distance) of every neighbour within ``cutoff`` Å, periodic images too."""
    cell = np.asarray(atoms.cell[:])
    reach = np.zeros(3, dtype=int)
    if atoms.pbc.any():
        volume = abs(np.linalg.det(cell))
        for axis in np.flatnonzero(atoms.pbc):
            width = volume / np.linalg.norm(np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3]))
            reach[axis] = int(np.ceil(cutoff / width))
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1)
    shifts = grid.reshape(-1, 3) @ cell
    vectors = (atoms.positions[None, :, None] + shifts[None, None]
               - atoms.positions[:, None, None])  # (i, j, shift, 3)
    distance = np.linalg.norm(vectors, axis=-1)
    keep = (distance < cutoff) & (distance > 1e-8)
    return np.nonzero(keep)[0], distance[keep]


def descriptors(frames: list[Atoms]) -> np.ndarray:
    """Per-atom smeared histograms of neighbour distances, (N, 14) float64."""
    rows = []
    for atoms in frames:
        centre, distance = _pairs(atoms, CUTOFF)
        smear = np.exp(-((distance[:, None] - CENTRES) / 0.15) ** 2)
        smear *= (0.5 * (1 + np.cos(np.pi * distance / CUTOFF)))[:, None]  # smooth cutoff
        histogram = np.zeros((len(atoms), len(CENTRES)))
        np.add.at(histogram, centre, smear)
        rows.append(histogram)
    return np.concatenate(rows)


def _amplitude(frames: list[Atoms]) -> np.ndarray:
    """Per-atom error scale in eV/Å: 0.03 in bulk, growing with the coordination deficit."""
    out = []
    for atoms in frames:
        coordination = np.bincount(_pairs(atoms, 3.0)[0], minlength=len(atoms))
        out.append(0.03 + 0.05 * np.clip(12 - coordination, 0, None))
    return np.concatenate(out)


def _field(frames: list[Atoms], member: int) -> np.ndarray:
    """A smooth unit-ish vector field of the positions, different for every member."""
    rng = np.random.default_rng(100 + member)
    k, phase = rng.normal(size=(3, 3)), rng.uniform(0, 2 * np.pi, size=3)
    positions = np.concatenate([atoms.positions for atoms in frames])
    return np.sin(positions @ k + phase)


def predictions(frames: list[Atoms], member: int, *, features: np.ndarray | None = None,
                amplitude: np.ndarray | None = None) -> ArraysBackend:
    """Member ``member`` of the fake ensemble on ``frames`` (EMT plus its error).

    ``features`` / ``amplitude``: :func:`descriptors` / :func:`_amplitude` of ``frames``
    when already computed.
    """
    forces = np.concatenate([reference_forces(atoms) for atoms in frames])
    energies = np.array([reference_energy(atoms) for atoms in frames])
    amplitude = _amplitude(frames) if amplitude is None else amplitude
    forces = forces + amplitude[:, None] * _field(frames, member)
    sizes = [len(atoms) for atoms in frames]
    shift = np.add.reduceat(0.2 * amplitude, np.cumsum([0, *sizes[:-1]]))
    return ArraysBackend(frames, energies=energies + (1 + 0.1 * member) * shift,
                         forces=forces,
                         descriptors=descriptors(frames) if features is None else features)


def trajectories(train: list[Atoms], member: int) -> np.ndarray:
    """Force-error norms (N_EPOCHS, N_train), shrinking over the epochs to the final ones."""
    final = np.linalg.norm(_amplitude(train)[:, None] * _field(train, member), axis=1)
    rng = np.random.default_rng(member)
    epochs = [final * (1 + 2.0 * np.exp(-e)) * rng.uniform(0.9, 1.1, size=final.shape)
              for e in range(N_EPOCHS - 1)]
    return np.stack([*epochs, final])


def rattled(start: Atoms, n: int, seed: int, label: str) -> list[Atoms]:
    """``n`` EMT-labelled copies of ``start`` rattled by 0.06 Å and strained by ~1 %."""
    from mlipuq.emt_data import labelled

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = start.copy()
        atoms.set_cell(atoms.cell * (1 + 0.01 * rng.standard_normal()), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.06, size=atoms.positions.shape)
        frames.append(labelled(atoms, label))
    return frames


def make_run(path: Path, n_models: int = 2):
    """An arrays run of EMT copper; returns (run, test sets)."""
    from ase.build import fcc111

    from mlipuq.emt_data import LATTICE_CONSTANT_A, bulk_copper

    cell = bulk_copper(2)
    vacancy = cell.copy()
    del vacancy[0]
    slab = fcc111("Cu", size=(2, 2, 3), a=LATTICE_CONSTANT_A, vacuum=5.0, periodic=True)
    frames = rattled(cell, 16, 0, "bulk")
    train, val = frames[:12], frames[12:]
    tests = {"bulk": rattled(cell, 8, 1, "bulk"), "vacancy": rattled(vacancy, 6, 2, "vacancy"),
             "surface": rattled(slab, 6, 3, "surface")}
    everything = train + val + [atoms for frames in tests.values() for atoms in frames]
    features, amplitude = descriptors(everything), _amplitude(everything)
    members = {f"model_{m}": predictions(everything, m, features=features, amplitude=amplitude)
               for m in range(n_models)}
    run = write_run(path, train, val, members,
                    error_trajectories={f"model_{m}": trajectories(train, m)
                                        for m in range(n_models)},
                    seeds={f"model_{m}": m for m in range(n_models)},
                    meta={"model": "EMT + smooth member-specific error (test)"})
    return run, tests


def end_to_end(out: str) -> None:
    """fit_methods -> evaluate_run -> report on an arrays run; prints a JSON summary."""
    from mlipuq.pipeline import available_methods, evaluate_run, fit_methods

    out = Path(out)
    run, tests = make_run(out / "run")
    methods = available_methods(run)
    fitted = fit_methods(run)
    metrics = evaluate_run(run, tests, out_dir=out / "report", in_domain=["bulk"],
                           calibration_set=("bulk", 0.5))
    print(json.dumps({
        "methods": list(methods),
        "fitted": sorted(fitted),
        "metrics": sorted(metrics["methods"]),
        "report": str(metrics["report"]),
        "roc_auc": {name: metrics["methods"][name]["metrics"]["all"]["roc_auc"]
                    for name in methods},
        "torch": "torch" in sys.modules,
        "nequip": any(name.startswith("nequip") for name in sys.modules),
    }))


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def arrays_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("arrays") / "run")


def test_fit_evaluate_report_without_torch(tmp_path):
    """The whole pipeline on stored predictions, in a fresh interpreter: no torch."""
    script = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); "
              f"import test_arrays_backend as t; t.end_to_end({str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"ltau", "ensemble", "doptimality"} <= set(summary["methods"])
    assert set(summary["fitted"]) == set(summary["methods"])
    assert set(summary["methods"]) <= set(summary["metrics"])  # every method evaluated
    assert Path(summary["report"]).name == "index.html" and Path(summary["report"]).is_file()
    for name in ("ltau", "ensemble", "doptimality"):  # the fake errors are detectable
        assert summary["roc_auc"][name] >= 0.75, (name, summary["roc_auc"])
    assert not summary["torch"], "the arrays pipeline imported torch"
    assert not summary["nequip"], "the arrays pipeline imported nequip"


def test_run_folder_records_the_backend(arrays_run):
    run, _ = arrays_run
    reopened = RunFolder.open(run.path)
    assert reopened.backend == "arrays" and reopened.meta["format_version"] == 2
    assert reopened.backend_class is ArraysBackend
    assert reopened.model_path("model_1") == run.path / "models" / "model_1.npz"
    assert reopened.store.model_ids() == ["model_0", "model_1"]
    assert len(reopened.store.epochs("model_0")) == N_EPOCHS
    assert reopened.seeds == [0, 1]


def test_outputs_follow_the_asked_order_and_survive_extxyz(arrays_run):
    """Frames read back from extxyz (8 decimals) find their predictions; order is kept."""
    from mlipuq.backends.registry import load

    run, tests = arrays_run
    member = load(run, "model_0")
    frames = run.train_frames()[::-1]  # read back from train.extxyz, reversed
    out = member.outputs(frames)
    direct = predictions(frames, 0)
    reference = direct.outputs(frames)
    np.testing.assert_allclose(out.forces, reference.forces, atol=1e-6)
    np.testing.assert_allclose(out.energies, reference.energies)
    np.testing.assert_allclose(out.descriptors, reference.descriptors, atol=1e-6)
    assert out.config_index[-1] == len(frames) - 1 and out.species.tolist()[0] == "Cu"
    assert set(member.known_species) == {"Cu"}


def test_a_frame_off_the_exact_grid_still_matches(arrays_run):
    """A displacement below atol finds the structure even across a rounding line."""
    run, tests = arrays_run
    frame = tests["vacancy"][0].copy()
    member = ArraysBackend([frame], forces=np.zeros((len(frame), 3)), atol=1e-4)
    moved = frame.copy()
    moved.positions[0, 0] += 0.6e-4  # crosses a 1e-4 grid line for some coordinate
    moved.positions[1, 1] -= 0.6e-4
    assert member.find(moved) == 0
    moved.positions[2, 2] += 1e-3
    assert member.find(moved) is None


def test_unknown_frame_is_one_clear_error(arrays_run):
    from mlipuq.backends.registry import load

    run, _ = arrays_run
    member = load(run, "model_0")
    stranger = run.train_frames()[0]
    stranger.positions[0] += 0.1
    with pytest.raises(InputError) as info:
        member.outputs([run.train_frames()[1], stranger])
    message = str(info.value)
    assert "\n" not in message
    assert "configuration 1 (Cu32, 32 atoms) has no stored prediction" in message
    assert "model_0.npz" in message
    with pytest.raises(InputError, match=r"element\(s\) \['O'\]"):
        member.outputs([Atoms("O", positions=[[0, 0, 0]])])


def test_save_load_round_trip(tmp_path, arrays_run):
    _, tests = arrays_run
    frames = tests["surface"]
    member = predictions(frames, 3)
    again = ArraysBackend.load(member.save(tmp_path / "m.npz"))
    a, b = member.outputs(frames), again.outputs(frames)
    for field in ("energies", "forces", "descriptors", "config_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    only_forces = ArraysBackend(frames, forces=a.forces)
    assert only_forces.outputs(frames).energies is None


def test_bad_inputs(tmp_path, arrays_run):
    run, tests = arrays_run
    frames = tests["bulk"][:2]
    with pytest.raises(InputError, match=r"forces: expected shape \(64, 3\)"):
        ArraysBackend(frames, forces=np.zeros((10, 3)))
    with pytest.raises(InputError, match="at least one of energies, forces, descriptors"):
        ArraysBackend(frames)
    with pytest.raises(InputError, match="not mlipuq stored predictions"):
        np.savez(tmp_path / "x.npz", a=np.zeros(2))
        ArraysBackend.load(tmp_path / "x.npz")
    train = run.train_frames()
    member = ArraysBackend(train[:3], forces=np.zeros((96, 3)))
    with pytest.raises(InputError, match=r"members\['model_0'\] on train_frames: .*"
                                         r"configuration 3 .*no stored prediction"):
        write_run(tmp_path / "r", train, [], {"model_0": member})
    full = ArraysBackend(train, forces=np.zeros((len(train) * 32, 3)))
    with pytest.raises(InputError, match=r"error_trajectories\['model_0'\]: expected shape"):
        write_run(tmp_path / "r", train, [], {"model_0": full},
                  error_trajectories={"model_0": np.zeros((2, 5))})
    with pytest.raises(InputError, match="'model_9' is not a member"):
        write_run(tmp_path / "r", train, [], {"model_0": full},
                  error_trajectories={"model_9": np.zeros((2, 5))})


def test_without_validation_frames_or_trajectories(tmp_path, arrays_run):
    run, _ = arrays_run
    train = run.train_frames()
    member = ArraysBackend(train, forces=np.zeros((len(train) * 32, 3)))
    bare = write_run(tmp_path / "bare", train, None, {"m0": member})
    assert not bare.val_path.exists() and not bare.store_path.exists()
    assert RunFolder.open(bare.path).model_ids == ["m0"]
