"""``mlipuq fit --run RUN``: every method from a run folder, saved atomically in RUN/methods."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.cli import main  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402
from mlipuq.run_methods import method_dir  # noqa: E402
from nequip_support import make_emt_copper_frames, make_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny 2-member run after ``mlipuq fit --run RUN --k 3``; returns (run, stdout)."""
    run_dir = make_tiny_run(tmp_path_factory.mktemp("fit"), n_models=2, epochs=3)
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        status = main(["fit", "--run", str(run_dir), "--k", "3"])
    finally:
        capture.undo()
    assert status == 0
    return RunFolder.open(run_dir), buffer.getvalue()


@pytest.fixture(scope="module")
def train_outputs(fitted):
    from mlipuq.backends.nequip.features import NequIPBackend

    run, _ = fitted
    return NequIPBackend(run.model_path("model_0")).outputs(run.train_frames())


def _no_check():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def quiet():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a bound is possible on 3 epochs
            yield

    return quiet()


def test_fit_writes_loadable_estimator(fitted, train_outputs):
    from mlipuq.confidence import default_atol
    from mlipuq.ltau import LTAUEstimator

    run, output = fitted
    estimator = LTAUEstimator.load(method_dir(run, "ltau"))
    assert estimator.k == 3
    assert estimator.n_train_atoms_ == run.atom_table.n_atoms
    # default atol: training MAE of the final epoch, averaged over both members
    assert estimator.atol_ == pytest.approx(default_atol(run.store))
    finals = [run.store.final_errors(m, norm=True).mean() for m in run.store.model_ids()]
    assert len(finals) == 2
    assert estimator.atol_ == pytest.approx(np.mean(finals))
    # pooled distributions: every training atom has E epochs x M models samples
    n_samples = sum(len(run.store.epochs(m)) for m in run.store.model_ids())
    np.testing.assert_array_equal(estimator.distributions_.n_samples, n_samples)
    assert f"{estimator.atol_:.4g} eV/Å" in output
    assert f"{run.atom_table.n_atoms} training atoms" in output
    assert "Cu=flat" in output
    assert estimator.provenance_["member"] == "model_0"
    assert estimator.provenance_["backend"] == "nequip"
    assert set(estimator.provenance_["models"]) == {"model_0"}


def test_fitted_estimator_predicts_like_a_direct_fit(fitted, train_outputs):
    from mlipuq.ltau import LTAUEstimator

    run, _ = fitted
    loaded = LTAUEstimator.load(method_dir(run, "ltau"))
    direct = LTAUEstimator(k=3).fit_arrays(
        run.store, train_outputs.descriptors, train_outputs.species
    )
    # fit calibrated the estimator on the run's validation frames: same s and threshold
    from mlipuq.backends.nequip.features import NequIPBackend
    from mlipuq.io import read_structures

    val = read_structures(run.val_path)
    val_out = NequIPBackend(run.model_path("model_0")).outputs(val)
    val_errors = np.linalg.norm(
        np.concatenate([a.get_forces() for a in val]) - val_out.forces, axis=1
    )
    with _no_check():
        direct.calibrate_arrays(
            val_out.descriptors, val_out.species, val_errors, config_index=val_out.config_index
        )
    assert loaded.calibration_["n_configs"] == len(val)
    assert loaded.scale_ == pytest.approx(direct.scale_)
    assert loaded.threshold_ == pytest.approx(direct.threshold_)
    a = loaded.predict_arrays(train_outputs.descriptors, train_outputs.species)
    b = direct.predict_arrays(train_outputs.descriptors, train_outputs.species)
    assert a.atom_uncertainty.shape == (run.atom_table.n_atoms,)
    np.testing.assert_allclose(a.atom_uncertainty, b.atom_uncertainty)
    # a training atom is its own nearest neighbour: distance 0 at k=1
    own = loaded.predict_arrays(train_outputs.descriptors, train_outputs.species, k=1)
    np.testing.assert_allclose(own.extras["knn_distance"], 0.0, atol=1e-3)


def test_calculator_from_run_attaches_fitted_ltau(fitted, train_outputs):
    from mlipuq.backends.nequip.calculator import UQCalculator
    from mlipuq.ltau import LTAUEstimator

    run, _ = fitted
    calc = UQCalculator.from_run(run.path, keep_descriptors=True)
    # every saved method one model's forward pass can drive (not the ensemble)
    assert set(calc.estimators) == {"ltau", "doptimality", "clustered_doptimality", "llpr"}
    atoms = make_emt_copper_frames(1, seed=21)[0]
    atoms.calc = calc
    atoms.get_forces()
    expected = LTAUEstimator.load(method_dir(run, "ltau")).predict_arrays(
        calc.results["descriptors"], atoms.get_chemical_symbols()
    )
    np.testing.assert_allclose(calc.results["ltau_uncertainty"], expected.atom_uncertainty)
    # the stored calibration reaches the calculator: scale, threshold and the frame's flag
    fitted_threshold = LTAUEstimator.load(method_dir(run, "ltau")).threshold_
    assert calc.results["ltau_threshold"] == pytest.approx(fitted_threshold)
    assert calc.results["ltau_threshold_aggregate"] == "mean"
    assert calc.results["ltau_config_flag"] == bool(
        expected.atom_uncertainty.mean() > fitted_threshold
    )
    assert "ltau_flag" not in calc.results  # the threshold is per configuration
    assert "ltau_knn_distance_normalised" in calc.results
    with pytest.raises(InputError, match="fitted with member 'model_0', not 'model_1'"):
        UQCalculator.from_run(run.path, model_id="model_1")


def test_refit_replaces_atomically(fitted, tmp_path, capsys):
    from mlipuq.ltau import LTAUEstimator

    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    assert main(["fit", "--run", str(copy), "--k", "2", "--atol", "0.05"]) == 0
    estimator = LTAUEstimator.load(copy / "methods" / "ltau")
    assert (estimator.k, estimator.atol_) == (2, 0.05)
    leftovers = [p.name for p in (copy / "methods").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    captured = capsys.readouterr()  # one line per method written on stdout, progress on stderr
    ltau_line = f"ltau: {copy / 'methods' / 'ltau'} ("
    assert any(line.startswith(ltau_line) for line in captured.out.splitlines())
    assert "(given)" in captured.out and "(given)" not in captured.err
    assert "fitting ltau on" in captured.err and "fitting" not in captured.out


def test_a_changed_model_file_makes_the_saved_ltau_stale(fitted, tmp_path):
    """After retraining (here: another checkpoint in place of the model file) the saved
    estimator no longer describes the model: the calculator refuses it, evaluate refits."""
    from mlipuq.backends.nequip.calculator import UQCalculator
    from mlipuq.pipeline import load_methods
    from mlipuq.run_folder import RunFolder

    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    moved = RunFolder.open(copy)
    assert set(load_methods(moved, ["ltau"], model_id="model_0")[0]) == {"ltau"}
    model = moved.model_path("model_0")
    meta = json.loads((copy / "methods" / "ltau" / "estimator.json").read_text())
    assert meta["provenance"]["models"]["model_0"]["file"] == str(model.relative_to(copy))
    with open(model, "ab") as handle:  # same path, other bytes
        handle.write(b"\0")
    loaded, reasons = load_methods(moved, ["ltau"], model_id="model_0")
    assert loaded == {} and "other model files" in reasons["ltau"]
    with pytest.raises(InputError, match=r"fitted on other model files.*mlipuq fit"):
        UQCalculator.from_run(copy)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_run_folder(tmp_path, capsys):
    assert main(["fit", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in one_error_line(capsys)


def test_not_a_run_folder(tmp_path, capsys):
    assert main(["fit", "--run", str(tmp_path)]) == 2
    assert "not an mlipuq run folder (no run.json)" in one_error_line(capsys)


def test_run_folder_from_another_version(fitted, tmp_path, capsys):
    run, _ = fitted
    folder = tmp_path / "old"
    folder.mkdir()
    meta = dict(run.meta, format_version=99)
    (folder / "run.json").write_text(json.dumps(meta))
    assert main(["fit", "--run", str(folder)]) == 2
    line = one_error_line(capsys)
    assert "format_version 99" in line and "supports format_version 1" in line


def test_unknown_model_id(fitted, capsys):
    run, _ = fitted
    assert main(["fit", "--run", str(run.path), "--model-id", "model_7"]) == 2
    assert "--model-id: 'model_7' is not a member" in one_error_line(capsys)


class _Planted:
    """Unpickling this runs os.mkdir(marker): what a foreign pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind", ["foreign", "truncated"])
def test_fit_never_unpickles_a_foreign_or_broken_checkpoint(fitted, tmp_path, capsys, kind):
    import torch

    from mlipuq.run_folder import RunFolder

    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    model = RunFolder.open(copy).model_path("model_0")
    if model.suffix != ".ckpt":
        pytest.skip("the tiny run is packaged: no checkpoint is loaded")
    marker = tmp_path / "planted"
    if kind == "foreign":
        torch.save({"epoch": 1, "payload": _Planted(marker)}, model)
    else:
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    assert main(["fit", "--run", str(copy)]) == 2
    err = one_error_line(capsys)
    expected = "not a plain checkpoint" if kind == "foreign" else "truncated or corrupt"
    assert str(model) in err and expected in err
    assert not marker.exists()  # nothing was run
