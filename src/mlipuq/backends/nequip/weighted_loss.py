"""Per-atom weighted force loss for NequIP 0.19 (``mlipuq train --reweight``).

NequIP has no per-atom loss weights (see ``docs/active_learning.md``). This module
adds them with NequIP's own extension points, without patching it:

1. the per-atom field ``per_atom_weight`` is registered as a node field
   (:func:`nequip.data.register_fields`) when this module is imported;
   :class:`RegisterWeightField`, an identity data transform placed first in the
   dataset's ``transforms``, makes the ``nequip-train`` process import it before
   any data are read;
2. the ASE data module gets ``include_keys: [per_atom_weight]``, so the weight
   column of the training extxyz travels with every atom of a batch;
3. the loss gets an extra entry with ``field: null``: NequIP's ``MetricsManager``
   then passes the full ``(preds, target)`` dicts to :class:`WeightedForceMSE`.

The weighted force loss is a weighted mean over force components,

    L_F = sum_i w_i |F_i,pred - F_i,ref|^2 / (3 sum_i w_i)     (eV^2/Å^2),

so with all ``w_i = 1`` it equals NequIP's ``forces_mse`` (mean over the 3N
components) and the usual ``coeffs`` keep their meaning. Weights are invariant to
a common scale factor. Atoms whose reference force has a NaN component are left
out (weight 0). A batch without the weight field (the validation set) counts every
atom with weight 1.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torchmetrics import Metric

WEIGHT_KEY = "per_atom_weight"
FORCE_KEY = "forces"
TRANSFORM_TARGET = "mlipuq.backends.nequip.weighted_loss.RegisterWeightField"
METRIC_TARGET = "mlipuq.backends.nequip.weighted_loss.WeightedForceMSE"
LOSS_NAME = "weighted_forces_mse"


def register_weight_field(key: str = WEIGHT_KEY) -> None:
    """Register ``key`` as a per-atom (node) field of NequIP's data dicts (idempotent)."""
    from nequip.data import _key_registry, register_fields

    if key not in _key_registry._NODE_FIELDS:
        register_fields(node_fields=[key])


register_weight_field()


class RegisterWeightField:
    """Identity NequIP data transform; constructing it registers the weight field.

    Put first in ``data.transforms`` so that Hydra imports this module (and with it
    the field registration) before the dataset parses the extxyz file.
    """

    def __init__(self, key: str = WEIGHT_KEY) -> None:
        self.key = key
        register_weight_field(key)

    def __call__(self, data: dict) -> dict:
        """Return ``data`` unchanged."""
        return data


class WeightedForceMSE(Metric):
    """Per-atom weighted force mean squared error (eV^2/Å^2) of NequIP data dicts.

    ``update(preds, target)`` takes the full AtomicDataDicts (NequIP's
    ``field: null`` mode); forces are ``preds["forces"]`` and ``target["forces"]``
    (shape (n_atoms, 3)), weights ``target[weight_key]`` (shape (n_atoms,) or
    (n_atoms, 1); all ones when absent). ``compute()`` returns
    ``sum_i w_i |dF_i|^2 / (3 sum_i w_i)`` over all atoms seen since the last reset.

    Parameters
    ----------
    weight_key : str
        Name of the per-atom weight field.
    """

    full_state_update = False
    is_differentiable = True
    higher_is_better = False

    def __init__(self, weight_key: str = WEIGHT_KEY, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weight_key = weight_key
        self.add_state("weighted_sum", default=torch.tensor(0.0, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("weight_total", default=torch.tensor(0.0, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, preds: dict, target: dict) -> None:
        """Accumulate the weighted squared force errors of one batch."""
        pred = preds[FORCE_KEY].to(torch.float64)
        ref = target[FORCE_KEY].to(torch.float64)
        weight = target.get(self.weight_key)
        if weight is None:
            weight = torch.ones(ref.shape[0], dtype=torch.float64, device=ref.device)
        else:
            weight = weight.reshape(-1).to(torch.float64)
        finite = ~torch.isnan(ref).any(dim=1)
        weight = torch.where(finite, weight, torch.zeros_like(weight))
        diff = torch.where(finite[:, None], pred - ref, torch.zeros_like(pred))
        self.weighted_sum = self.weighted_sum + (weight * diff.square().sum(dim=1)).sum()
        self.weight_total = self.weight_total + 3.0 * weight.sum()

    def compute(self) -> torch.Tensor:
        """Weighted mean squared force error (eV^2/Å^2)."""
        return self.weighted_sum / self.weight_total

    def __str__(self) -> str:
        return "weighted_mse"


def add_weighted_force_loss(config: dict, *, force_coeff: float | None = None) -> dict:
    """Make a preset-style NequIP config train with the per-atom weighted force loss.

    Returns a deep copy with: :class:`RegisterWeightField` first in
    ``data.transforms``, ``per_atom_weight`` in ``data.include_keys``, and in the
    ``EnergyForceLoss`` the plain ``forces`` coefficient set to None (``forces_mse``
    is still logged, unweighted) and an extra loss entry ``weighted_forces_mse``
    (``field: null``) with the former forces coefficient (or ``force_coeff``).

    Raises
    ------
    mlipuq.exceptions.InputError
        The loss is not ``nequip.train.EnergyForceLoss`` (user configs with other
        losses cannot be re-weighted automatically).
    """
    from mlipuq.exceptions import InputError

    config = copy.deepcopy(config)
    data = config["data"]
    transforms = [t for t in data.get("transforms") or []
                  if not (isinstance(t, dict) and t.get("_target_") == TRANSFORM_TARGET)]
    data["transforms"] = [{"_target_": TRANSFORM_TARGET}, *transforms]
    keys = list(data.get("include_keys") or [])
    if WEIGHT_KEY not in keys:
        keys.append(WEIGHT_KEY)
    data["include_keys"] = keys
    loss = config["training_module"].get("loss")
    if not isinstance(loss, dict) or "EnergyForceLoss" not in str(loss.get("_target_", "")):
        target = loss.get("_target_") if isinstance(loss, dict) else loss
        raise InputError(
            f"training_module.loss: --reweight needs nequip.train.EnergyForceLoss, got {target!r}"
        )
    coeffs = dict(loss.get("coeffs") or {"total_energy": 1.0, "forces": 1.0})
    coeff = float(coeffs.get("forces", 1.0) if force_coeff is None else force_coeff)
    coeffs["forces"] = None
    loss["coeffs"] = coeffs
    extra = [m for m in loss.get("extra_metrics") or [] if m.get("name") != LOSS_NAME]
    extra.append({"name": LOSS_NAME, "field": None, "coeff": coeff,
                  "metric": {"_target_": METRIC_TARGET}})
    loss["extra_metrics"] = extra
    return config
