"""Loss weights of the NequIP presets: ``energy_weight`` / ``force_weight``
(``mlipuq train --energy-weight / --force-weight``)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nequip")

import torch  # noqa: E402

from mlipuq.backends.nequip import config as cfg  # noqa: E402
from mlipuq.cli import main  # noqa: E402
from mlipuq.exceptions import InputError  # noqa: E402
from mlipuq.run_folder import RunFolder  # noqa: E402
from nequip_support import cli_error, make_emt_copper_frames, write_frames  # noqa: E402


def _config(**overrides) -> dict:
    return cfg.preset_config(
        "tiny", elements=["Cu"], train_file="a.xyz", val_file="b.xyz",
        isolated_energies={"Cu": -1.0}, epochs=1, seed=0, overrides=overrides,
    )


def _batch(rng, n_atoms: int) -> dict:
    return {
        "forces": torch.tensor(rng.normal(size=(n_atoms, 3))),
        "total_energy": torch.tensor(rng.normal(scale=n_atoms, size=(1, 1))),
        "num_atoms": torch.tensor([n_atoms]),
        "batch": torch.zeros(n_atoms, dtype=torch.long),
        "atom_types": torch.zeros(n_atoms, dtype=torch.long),
    }


@pytest.mark.parametrize(("energy_weight", "force_weight"), [(1.0, 1.0), (0.1, 1.0), (0.0, 2.0)])
def test_nequip_loss_combines_terms_with_the_weights(energy_weight, force_weight):
    """NequIP's own loss, built from the preset config: the weighted sum is
    (w_E MSE(E/N) + w_F MSE(F)) / (w_E + w_F) (NequIP normalises the coefficients)."""
    from hydra.utils import instantiate

    rng = np.random.default_rng(4)
    config = _config(energy_weight=energy_weight, force_weight=force_weight)
    loss = instantiate(config["training_module"]["loss"], type_names=["Cu"])
    n_atoms = 6
    preds, target = _batch(rng, n_atoms), _batch(rng, n_atoms)
    values = loss(preds, target)
    energy_mse = float(((preds["total_energy"] - target["total_energy"]) / n_atoms) ** 2)
    force_mse = float(((preds["forces"] - target["forces"]) ** 2).mean())
    assert values["per_atom_energy_mse"].item() == pytest.approx(energy_mse, rel=1e-6)
    assert values["forces_mse"].item() == pytest.approx(force_mse, rel=1e-6)
    expected = (energy_weight * energy_mse + force_weight * force_mse) / (
        energy_weight + force_weight)
    assert values["weighted_sum"].item() == pytest.approx(expected, rel=1e-6)


def test_checkpoint_metric_uses_the_same_weights():
    metrics = _config(energy_weight=0.25)["training_module"]["val_metrics"]["coeffs"]
    assert metrics["per_atom_energy_mae"] == 0.25 and metrics["forces_mae"] == 1.0
    assert cfg.preset_params("small")["energy_weight"] == 1.0


def test_reweighting_keeps_the_energy_weight():
    from mlipuq.backends.nequip.weighted_loss import add_weighted_force_loss

    loss = add_weighted_force_loss(_config(energy_weight=0.1))["training_module"]["loss"]
    assert loss["coeffs"]["total_energy"] == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"energy_weight": -0.1}, "energy_weight: expected a finite number >= 0"),
        ({"energy_weight": float("nan")}, "energy_weight: expected a finite number >= 0"),
        ({"force_weight": 0.0}, "force_weight: expected > 0"),
        ({"force_weight": "heavy"}, "force_weight: expected a number >= 0, got 'heavy'"),
        ({"energy_wieght": 0.1}, "unknown field 'energy_wieght'"),
    ],
)
def test_bad_weights_are_refused(overrides, message):
    with pytest.raises(InputError, match=message):
        cfg.preset_params("tiny", overrides)


def test_cli_energy_weight_reaches_the_trained_config(tmp_path, capsys):
    data = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(6, seed=2))
    run_dir = tmp_path / "run"
    argv = ["train", str(data), "--run", str(run_dir), "--preset", "tiny", "--epochs", "1",
            "--energy-weight", "0.2", "--no-package", "-q", "--val-fraction", "0.34"]
    assert main(argv) == 0
    folder = RunFolder.open(run_dir)
    assert folder.meta["preset_overrides"] == {"energy_weight": 0.2}
    used = cfg.load_yaml(folder.config_path("model_0"))["training_module"]["loss"]
    assert used["coeffs"] == {"total_energy": 0.2, "forces": 1.0}
    resume = [a if a != "0.2" else "0.5" for a in argv] + ["--resume"]
    err = cli_error(capsys, resume)
    assert "energy_weight" in err and "0.2" in err and "0.5" in err


def test_cli_bad_weights_exit_2_and_leave_no_run(tmp_path, capsys):
    data = write_frames(tmp_path / "cu.extxyz", make_emt_copper_frames(3, seed=1))
    run_dir = tmp_path / "run"
    err = cli_error(capsys, ["train", str(data), "--run", str(run_dir), "--energy-weight", "-1"])
    assert "energy_weight" in err and "-1" in err
    assert not run_dir.exists()
    yaml = cfg.write_yaml(tmp_path / "user.yaml", _config())
    err = cli_error(capsys, ["train", str(data), "--run", str(run_dir), "--config", str(yaml),
                              "--force-weight", "2"])
    assert "presets only" in err and "user.yaml" in err
    err = cli_error(capsys, ["train", "--run", str(run_dir), "--reweight", "easy", "--from",
                              str(tmp_path), "--energy-weight", "0.1"])
    assert "--energy-weight" in err
