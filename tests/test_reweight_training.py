"""``mlipuq train --reweight {easy,hard} --from RUN``: weights, weighted loss, bad input.

One tiny 2-member source run (3 epochs, 12 frames of 8-atom EMT copper) and one
1-member hard-re-weighted run (2 epochs) are shared by the module.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

pytest.importorskip("nequip")

import torch  # noqa: E402

from mlipuq.cli import main  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402
from nequip_support import make_tiny_run  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

LAM = 1.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(source run, hard-re-weighted run) folders."""
    directory = tmp_path_factory.mktemp("reweight")
    source = make_tiny_run(directory, n_models=2, epochs=3)
    target = directory / "hard"
    status = main([
        "train", "--reweight", "hard", "--from", str(source), "--run", str(target),
        "--lam", str(LAM), "--epochs", "2", "-M", "1", "--no-package", "-q",
    ])
    assert status == 0
    return RunFolder.open(source), RunFolder.open(target)


def _numpy_weights(source: RunFolder, scheme: str, lam: float) -> np.ndarray:
    """Weights recomputed from the raw stored error norms with plain numpy."""
    store = source.store
    errors = [store.read_norms(m) for m in source.model_ids]  # each (E, N)
    atol = np.mean([e[-1].mean() for e in errors])
    p = np.stack([(e <= atol).mean(axis=0) for e in errors])
    mu, sigma = p.mean(axis=0), p.std(axis=0)
    exponent = 1.0 - mu + sigma if scheme == "hard" else mu + sigma
    return np.exp(lam * exponent)


def test_weights_follow_formula_from_source_trajectories(runs):
    source, target = runs
    frames = target.train_frames()
    stored = np.concatenate([atoms.arrays["per_atom_weight"] for atoms in frames])
    expected = _numpy_weights(source, "hard", LAM)
    assert stored.shape == expected.shape == (source.atom_table.n_atoms,)
    np.testing.assert_allclose(stored, expected, rtol=1e-8, atol=1e-8)
    assert expected.std() > 0  # the test would not notice swapped atoms otherwise
    # same training set, same order, same reference forces; same validation file
    for new, old in zip(frames, source.train_frames(), strict=True):
        np.testing.assert_allclose(new.positions, old.positions, atol=1e-8)
        np.testing.assert_allclose(new.get_forces(), old.get_forces(), atol=1e-8)
    assert target.val_path.read_bytes() == source.val_path.read_bytes()


def test_run_json_records_scheme_and_source(runs):
    source, target = runs
    info = target.meta["reweight"]
    assert info["scheme"] == "hard" and info["lam"] == LAM
    assert info["source_run"] == str(source.path.resolve())
    store = source.store
    atol = np.mean([store.read_norms(m)[-1].mean() for m in source.model_ids])
    assert info["atol"] == pytest.approx(atol, rel=1e-12)
    assert target.meta["n_models"] == 1 and target.meta["epochs"] == 2
    assert target.meta["train_frames"] == source.meta["train_frames"]


def test_easy_weights_from_same_source(runs, tmp_path):
    """The easy formula, checked through the library path without training."""
    from mlipuq.confidence import default_atol, ensemble_confidence
    from mlipuq.reweighting import loss_weights

    source, _ = runs
    mu, sigma, _ = ensemble_confidence(source.store, default_atol(source.store))
    np.testing.assert_allclose(
        loss_weights(mu, sigma, scheme="easy", lam=2.0),
        _numpy_weights(source, "easy", 2.0), rtol=1e-12,
    )


def test_trained_loss_used_the_weights(runs):
    """Logged weighted and unweighted force MSE differ (they coincide if w were all 1)."""
    _, target = runs
    config = target.config_path("model_0").read_text()
    assert "WeightedForceMSE" in config and "per_atom_weight" in config
    with open(target.metrics_path("model_0"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    weighted = [k for k in rows[0] if k.endswith("weighted_forces_mse") and "epoch" in k]
    plain = [k.replace("weighted_forces_mse", "forces_mse") for k in weighted]
    assert weighted and all(k in rows[0] for k in plain)
    for row in rows:
        w, u = float(row[weighted[0]]), float(row[plain[0]])
        assert np.isfinite(w) and abs(w - u) > 1e-6 * u
    assert target.store.model_ids() == ["model_0"]
    assert len(target.store.epochs("model_0")) == 2


# ---------------------------------------------------------------- the metric itself
def _batch(rng, n_atoms, weights=None):
    pred = torch.tensor(rng.normal(size=(n_atoms, 3)))
    ref = torch.tensor(rng.normal(size=(n_atoms, 3)))
    target = {"forces": ref}
    if weights is not None:
        target["per_atom_weight"] = torch.tensor(weights)
    return {"forces": pred}, target


def test_weighted_metric_matches_formula(rng):
    from mlipuq.backends.nequip.weighted_loss import WeightedForceMSE

    metric = WeightedForceMSE()
    batches = [_batch(rng, n, rng.uniform(0.5, 20.0, size=n)) for n in (5, 9)]
    numerators, denominators = [], []
    for preds, target in batches:
        d2 = ((preds["forces"] - target["forces"]).numpy() ** 2).sum(axis=1)
        w = target["per_atom_weight"].numpy()
        value = metric(preds, target)  # the batch value (what is back-propagated)
        assert float(value) == pytest.approx((w * d2).sum() / (3 * w.sum()), rel=1e-12)
        numerators.append((w * d2).sum())
        denominators.append(3 * w.sum())
    assert float(metric.compute()) == pytest.approx(
        sum(numerators) / sum(denominators), rel=1e-12
    )


def test_weighted_metric_nan_atoms_left_out(rng):
    from mlipuq.backends.nequip.weighted_loss import WeightedForceMSE

    preds, target = _batch(rng, 6, np.arange(1.0, 7.0))
    target["forces"][2, 1] = float("nan")
    keep = np.array([0, 1, 3, 4, 5])
    d2 = ((preds["forces"] - target["forces"]).numpy()[keep] ** 2).sum(axis=1)
    w = np.arange(1.0, 7.0)[keep]
    assert float(WeightedForceMSE()(preds, target)) == pytest.approx(
        (w * d2).sum() / (3 * w.sum()), rel=1e-12
    )


def test_weighted_loss_equals_nequip_force_mse_for_unit_weights(rng):
    """Through NequIP's own MetricsManager (field: null mode) on a real AtomicDataDict."""
    from hydra.utils import instantiate

    from mlipuq.backends.nequip.config import preset_config
    from mlipuq.backends.nequip.weighted_loss import add_weighted_force_loss

    config = preset_config(
        "tiny", elements=["Cu"], train_file="a.xyz", val_file="b.xyz",
        isolated_energies={"Cu": -1.0}, epochs=1, seed=0,
    )
    loss_cfg = add_weighted_force_loss(config)["training_module"]["loss"]
    n_atoms = 7
    preds, target = _batch(rng, n_atoms, np.ones(n_atoms))
    for data in (preds, target):
        data["total_energy"] = torch.tensor(rng.normal(size=(1, 1)))
        data["num_atoms"] = torch.tensor([n_atoms])
        data["batch"] = torch.zeros(n_atoms, dtype=torch.long)
        data["atom_types"] = torch.zeros(n_atoms, dtype=torch.long)
    loss = instantiate(loss_cfg, type_names=["Cu"])
    values = loss(preds, target)
    assert values["weighted_forces_mse"].item() == pytest.approx(
        values["forces_mse"].item(), abs=1e-6, rel=1e-9
    )
    # and the weighted sum uses the weighted term, not the plain one
    assert loss.entries["forces_mse"].coeff is None
    loss.reset()
    target["per_atom_weight"] = torch.tensor(np.arange(1.0, n_atoms + 1))
    values = loss(preds, target)
    d2 = ((preds["forces"] - target["forces"]).numpy() ** 2).sum(axis=1)
    w = np.arange(1.0, n_atoms + 1)
    assert values["weighted_forces_mse"].item() == pytest.approx(
        (w * d2).sum() / (3 * w.sum()), rel=1e-12
    )


# ---------------------------------------------------------------- bad input
def test_from_not_a_run_folder_exit_2(tmp_path, capsys):
    status = main([
        "train", "--reweight", "easy", "--from", str(tmp_path), "--run", str(tmp_path / "new"),
    ])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "not an mlipuq run folder" in err
    assert not (tmp_path / "new").exists()


def test_invalid_scheme_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--reweight", "medium", "--from", str(tmp_path), "--run", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice: 'medium'" in capsys.readouterr().err
    from mlipuq.backends.nequip.training import train_reweighted

    with pytest.raises(InputError, match="reweight: expected 'easy' or 'hard', got 'medium'"):
        train_reweighted(tmp_path, tmp_path / "new", scheme="medium")


@pytest.mark.parametrize("lam", ["0", "-1", "nan"])
def test_non_positive_lambda_rejected(tmp_path, capsys, lam):
    status = main([
        "train", "--reweight", "hard", "--from", str(tmp_path), "--run", str(tmp_path / "x"),
        "--lam", lam,
    ])
    assert status == 2
    assert f"--lam: expected a number > 0, got {float(lam)}" in capsys.readouterr().err
    from mlipuq.backends.nequip.training import train_reweighted

    with pytest.raises(InputError, match="lam: expected a finite number > 0"):
        train_reweighted(tmp_path, tmp_path / "new", scheme="hard", lam=float(lam))


def test_reweight_needs_from_and_no_train_file(tmp_path, capsys):
    assert main(["train", "--reweight", "hard", "--run", str(tmp_path / "x")]) == 2
    assert "--reweight and --from: both are needed" in capsys.readouterr().err
    assert main(["train", "data.xyz", "--reweight", "hard", "--from", str(tmp_path),
                 "--run", str(tmp_path / "x")]) == 2
    assert "do not give train_file" in capsys.readouterr().err
    assert main(["train", "--run", str(tmp_path / "x")]) == 2
    assert "train_file: expected an extxyz training set" in capsys.readouterr().err


def test_reweight_into_source_folder_refused(runs):
    from mlipuq.backends.nequip.training import train_reweighted

    source, _ = runs
    with pytest.raises(InputError, match="must differ from --from"):
        train_reweighted(source.path, source.path, scheme="hard", overwrite=True)
    assert RunFolder.open(source.path).model_ids == ["model_0", "model_1"]


def test_existing_target_refused_without_overwrite(runs):
    source, target = runs
    status = main(["train", "--reweight", "easy", "--from", str(source.path),
                   "--run", str(target.path)])
    assert status == 2
    assert target.meta["reweight"]["scheme"] == "hard"  # untouched
