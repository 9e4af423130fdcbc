"""Allegro models (``nequip-allegro``) as an mlipuq backend, through NequIP.

Allegro is trained, packaged and run by NequIP's own tools, so this backend is
:class:`~mlipuq.backends.nequip.features.NequIPBackend` with two differences: it trains
with Allegro presets (:data:`mlipuq.backends.nequip.config.ALLEGRO_PRESETS`, the same
``nequip-train`` subprocess and :class:`~mlipuq.backends.nequip.callback.ErrorTrajectoryCallback`)
and it defines the per-atom descriptors, which an Allegro model does not have.

Descriptors
-----------
Allegro is strictly local and its latents live on edges (ordered pairs ``i -> j``
within the cutoff). The energy is read out per edge: an MLP ``E_ij = w . h_ij`` whose
last layer is linear without bias, on top of the hidden activations ``h_ij`` (width
``readout_mlp_hidden_layers_width``) of the final edge latent; the atom energy is the
normalised sum over the centre atom's edges, ``E_i = s_Z (c_i / sqrt(2)) sum_j E_ij +
b_Z`` (``c_i = 1 / sqrt(avg_num_neighbors)``, ``s_Z``, ``b_Z`` per-type scale and
shift). The descriptor of atom ``i`` is that same sum applied to the readout's input::

    x_i = (c_i / sqrt(2)) * sum_{j in N(i)} h_ij          # shape (D,), D = readout width

so ``E_i = s_Z (w . x_i) + b_Z`` exactly: like NequIP's ``node_features`` it is the
input of a linear per-atom energy readout, which is what LLPR's last-layer covariance
and D-optimality's linear-readout argument assume, and it is invariant (built from
edge scalars only) and permutation invariant over neighbours. LTAU's k-NN distances
are taken in this space too. (The alternative, summing the 'edge_features' that enter
the readout MLP, is wider (``num_scalar_features * (num_layers + 1)``) and the energy
is not linear in it.)

The descriptors come from the same forward pass as energy and forces: two forward
hooks on the loaded model (:func:`install_descriptor_hooks`) keep ``h_ij`` at the
readout's last linear layer and, after Allegro's edge-to-atom sum, put ``x`` in the
model's output under ``node_features`` (a scratch key Allegro otherwise leaves holding
the unscaled atom energy). Everything downstream (:meth:`NequIPBackend.outputs`, the
calculator's ``save_extra_outputs``) then reads it as for NequIP. Hooks need an eager
model: packages and checkpoints, not AOTInductor-compiled files.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from mlipuq.backends.nequip.features import NequIPBackend
from mlipuq.exceptions import InputError

if TYPE_CHECKING:
    from mlipuq.run_folder import RunFolder

ARCHITECTURE = "allegro"


def _find_readout(model: Any) -> tuple[Any, Any]:
    """The edge-energy readout MLP and the edge-to-atom energy sum of an Allegro model.

    Found by their data fields (``edge_features -> edge_energy`` and ``edge_energy ->
    atomic_energy``), not by class: packaged models carry their own copies of the
    classes.
    """
    from nequip.data import AtomicDataDict

    readouts, sums = [], []
    for module in model.modules():
        field, out_field = getattr(module, "field", None), getattr(module, "out_field", None)
        if (field == AtomicDataDict.EDGE_FEATURES_KEY
                and out_field == AtomicDataDict.EDGE_ENERGY_KEY
                and hasattr(module, "mlp_module")):
            readouts.append(module)
        elif (field == AtomicDataDict.EDGE_ENERGY_KEY
              and out_field == AtomicDataDict.PER_ATOM_ENERGY_KEY
              and hasattr(module, "norm_module")):
            sums.append(module)
    if len(readouts) != 1 or len(sums) != 1:
        raise InputError(
            "model: not an Allegro model (expected one edge-energy readout MLP and one "
            f"edge-to-atom energy sum, found {len(readouts)} and {len(sums)}; descriptors "
            "need the eager model of a .nequip.zip or .ckpt, not a compiled one)"
        )
    return readouts[0], sums[0]


class DescriptorHooks:
    """Forward hooks that make an Allegro model return per-atom descriptors.

    After :func:`install_descriptor_hooks`, every forward pass of the model returns
    ``out["node_features"]`` of shape (n_atoms, D): the readout's hidden activations
    summed over each atom's edges and normalised as the model normalises edge energies
    (see the module docstring). The tensor is detached: forces are unchanged.

    Attributes
    ----------
    n_features : int
        D, the input width of the readout's last (linear) layer.
    handles : list of torch.utils.hooks.RemovableHandle
        Call :meth:`remove` to take the hooks off again.
    """

    def __init__(self, model: Any) -> None:
        import torch

        readout, energy_sum = _find_readout(model)
        layers = getattr(readout.mlp_module, "mlp", None)
        if not isinstance(layers, torch.nn.Sequential) or not len(layers):
            raise InputError(
                "model: the Allegro edge readout has no final linear layer to read "
                "descriptors from (a readout MLP without nonlinearity is merged into one "
                "matrix by NequIP; use readout_mlp_nonlinearity: silu)"
            )
        last = layers[-1]
        self.n_features = int(readout.mlp_module.dims[-2])
        self._energy_sum = energy_sum
        self._hidden = None
        self.handles = [
            last.register_forward_pre_hook(self._keep_hidden),
            energy_sum.register_forward_hook(self._write_descriptors),
        ]

    def _keep_hidden(self, module: Any, args: tuple) -> None:
        self._hidden = args[0]

    def _write_descriptors(self, module: Any, args: tuple, data: dict) -> dict:
        from nequip.data import AtomicDataDict
        from nequip.nn import scatter

        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("Allegro edge readout did not run before the energy sum")
        summed = scatter(
            hidden.detach(),
            data[AtomicDataDict.EDGE_INDEX_KEY][0],
            dim=0,
            dim_size=AtomicDataDict.num_nodes(data),
        )
        # the model's own normalisation of edge sums (per-type avg_num_neighbors)
        scratch = {AtomicDataDict.NODE_FEATURES_KEY: summed,
                   AtomicDataDict.ATOM_TYPE_KEY: data[AtomicDataDict.ATOM_TYPE_KEY]}
        norm = data.get(AtomicDataDict.FEATURE_NORM_FACTOR_KEY)
        if norm is not None:
            scratch[AtomicDataDict.FEATURE_NORM_FACTOR_KEY] = norm.detach()
        scaled = module.norm_module(scratch)[AtomicDataDict.NODE_FEATURES_KEY]
        data[AtomicDataDict.NODE_FEATURES_KEY] = scaled / math.sqrt(2.0)
        return data

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def install_descriptor_hooks(model: Any) -> DescriptorHooks:
    """Make ``model`` (an eager Allegro model) return descriptors as ``node_features``.

    Parameters
    ----------
    model : torch.nn.Module
        Allegro model loaded by NequIP (package or checkpoint).

    Returns
    -------
    DescriptorHooks
        Keep it to :meth:`~DescriptorHooks.remove` the hooks.

    Raises
    ------
    InputError
        ``model`` is not an Allegro model with a nonlinear edge readout.
    """
    return DescriptorHooks(model)


class AllegroBackend(NequIPBackend):
    """An Allegro model as an mlipuq backend (``"allegro"``): energies, forces, descriptors.

    Same parameters and attributes as
    :class:`~mlipuq.backends.nequip.features.NequIPBackend`; the descriptors are the
    Allegro edge-readout inputs summed over each atom's edges (module docstring), D =
    the readout's hidden width.

    Attributes
    ----------
    hooks_ : DescriptorHooks
        The forward hooks installed on ``model_``.

    Examples
    --------
    >>> backend = AllegroBackend("run/models/model_0.nequip.zip")  # doctest: +SKIP
    >>> backend.outputs(frames).descriptors.shape                  # doctest: +SKIP
    (N, 16)
    """

    name = "allegro"

    def _load(self) -> None:
        if getattr(self, "model_", None) is not None:
            return
        super()._load()
        self.hooks_ = install_descriptor_hooks(self.model_)

    @classmethod
    def calculator_class(cls) -> type:
        """:class:`AllegroUQCalculator` (NequIP's calculator plus the descriptor hooks);
        ``uq_calculator`` is NequIP's."""
        return allegro_calculator_class()

    @classmethod
    def train(cls, train_file: str | os.PathLike, run_dir: str | os.PathLike,
              **options: Any) -> RunFolder:
        """:func:`~mlipuq.backends.nequip.training.train_ensemble` with the Allegro
        presets (``preset="tiny" | "small" | "paper"``; ``config=`` an Allegro YAML);
        ``run.json["backend"]`` is ``"allegro"``."""
        from mlipuq.backends.nequip.training import train_ensemble

        architecture = options.pop("architecture", ARCHITECTURE)
        if architecture != ARCHITECTURE:
            raise InputError(f"architecture: the allegro backend trains 'allegro', got "
                             f"{architecture!r}")
        return train_ensemble(train_file, run_dir, architecture=ARCHITECTURE, **options)


_CALCULATOR: list[type] = []


def allegro_calculator_class() -> type:
    """:class:`AllegroUQCalculator`, defined on first use (it imports NequIP's ASE
    calculator, so importing this module stays light)."""
    if not _CALCULATOR:
        from mlipuq.backends.nequip.calculator import UQCalculator

        class AllegroUQCalculator(UQCalculator):
            """NequIP's ASE calculator on an Allegro model, with uncertainty.

            :class:`~mlipuq.backends.nequip.calculator.UQCalculator` (same constructors
            and result keys) whose model carries :class:`DescriptorHooks`, so the
            attached estimators see the Allegro descriptors of the same forward pass.
            Without estimators or ``keep_descriptors`` no hooks are installed.
            """

            def __init__(self, model: Any, device: Any = "cpu", *,
                         estimators: dict[str, Any] | None = None,
                         keep_descriptors: bool = False, **kwargs: Any) -> None:
                super().__init__(model, device, estimators=estimators,
                                 keep_descriptors=keep_descriptors, **kwargs)
                self.hooks_ = (install_descriptor_hooks(self.model)
                               if estimators or keep_descriptors else None)

        AllegroUQCalculator.__module__ = __name__
        AllegroUQCalculator.__qualname__ = "AllegroUQCalculator"
        _CALCULATOR.append(AllegroUQCalculator)
    return _CALCULATOR[0]


def __getattr__(name: str) -> Any:
    if name == "AllegroUQCalculator":
        return allegro_calculator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
