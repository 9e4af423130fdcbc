"""Ensemble (committee) uncertainty: maximum deviation from the ensemble mean (uq-ace eqs. 1-7).

For K models, configuration j and atom i (docs/methods.md):

- U_F,atom = max_k |F_i^k - <F_i>|  (vector norm, eV/Å)
- U_F,cfg  = max over the atoms of j of U_F,atom
- U_E,cfg  = max_k |E_j^k - <E_j>|  (eV; eV/atom with ``energy_per_atom``)

True errors use the ensemble mean: e_F,atom = |F_ref - <F>|, e_F,cfg = max over
atoms, e_E,cfg = |E_ref - <E>|. Thresholds are Tukey fences Q3 + k IQR over the
training set, of the uncertainties (default) or of the true errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlipuq.atom_table import config_max
from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.method import UQMethod
from mlipuq.result import UQResult
from mlipuq.thresholds import tukey_fence
from mlipuq.validation import check_array, check_config_index, check_is_fitted

THRESHOLD_SOURCES = ("uncertainty", "error")


# ---------------------------------------------------------------------- pure functions


def force_max_deviation(forces: np.ndarray) -> np.ndarray:
    """U_F,atom = max_k |F_i^k - <F_i>|, the largest deviation of a model from the mean.

    Parameters
    ----------
    forces : ndarray, shape (K, N, 3)
        Forces of K models on N atoms, eV/Å.

    Returns
    -------
    ndarray, shape (N,)
        eV/Å.

    Examples
    --------
    >>> f = np.zeros((2, 1, 3)); f[0, 0, 0] = 1.0
    >>> force_max_deviation(f).tolist()
    [0.5]
    """
    deviation = forces - forces.mean(axis=0, keepdims=True)
    return np.sqrt(np.einsum("kni,kni->kn", deviation, deviation)).max(axis=0)


def energy_max_deviation(energies: np.ndarray) -> np.ndarray:
    """U_E,cfg = max_k |E_j^k - <E_j>|.

    Parameters
    ----------
    energies : ndarray, shape (K, C)
        Energies of K models for C configurations, eV.

    Returns
    -------
    ndarray, shape (C,)
        eV.
    """
    return np.abs(energies - energies.mean(axis=0, keepdims=True)).max(axis=0)


def force_error(forces: np.ndarray, ref_forces: np.ndarray) -> np.ndarray:
    """e_F,atom = |F_ref,i - <F_i>| (vector norm), shape (N,), eV/Å."""
    return np.linalg.norm(ref_forces - forces.mean(axis=0), axis=1)


def energy_error(energies: np.ndarray, ref_energies: np.ndarray) -> np.ndarray:
    """e_E,cfg = |E_ref,j - <E_j>|, shape (C,), eV."""
    return np.abs(ref_energies - energies.mean(axis=0))


# ---------------------------------------------------------------------- estimator


class EnsembleEstimator(UQMethod):
    """Committee uncertainty with Tukey-fence thresholds learned on the training set.

    Parameters
    ----------
    threshold_on : {"uncertainty", "error"}
        Fences from the training uncertainties (default) or the training true
        errors (the uq-ace paper's wording; needs reference forces/energies in fit).
    fence_k : float
        Fence multiplier: Q3 + fence_k * IQR.
    energy_per_atom : bool
        Divide energy uncertainties and errors by the number of atoms (eV/atom).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> forces = rng.normal(size=(4, 6, 3)); idx = np.repeat([0, 1], 3)
    >>> est = EnsembleEstimator().fit_arrays(forces, None, idx)
    >>> est.predict_arrays(forces, None, idx).atom_uncertainty.shape
    (6,)
    """

    name = "ensemble"
    display_name = "Ensemble"
    requires = ("committee_forces",)
    min_members = 2
    errors_from = "committee mean"

    def __init__(
        self,
        *,
        threshold_on: str = "uncertainty",
        fence_k: float = 1.5,
        energy_per_atom: bool = False,
    ) -> None:
        self.threshold_on = threshold_on
        self.fence_k = fence_k
        self.energy_per_atom = energy_per_atom

    def fit(self, X: ModelOutputs, store: Any = None) -> EnsembleEstimator:
        """Learn the fences from the committee's training outputs
        (``X.committee_forces`` (M, N, 3), optional ``X.committee_energies`` (M, C));
        ``store`` is not used."""
        self.check_inputs(X)
        return self.fit_arrays(X.committee_forces, X.committee_energies, X.config_index)

    def predict(self, X: ModelOutputs) -> UQResult:
        """Committee uncertainty of ``X`` (see :meth:`predict_arrays`)."""
        self.check_inputs(X)
        return self.predict_arrays(X.committee_forces, X.committee_energies, X.config_index)

    def set_threshold(self, value: float, source: str) -> None:
        """Use ``value`` (eV/Å) as the atom and configuration force threshold; the
        energy fence stays the training set's."""
        check_is_fitted(self, "thresholds_")
        self.thresholds_ = {**self.thresholds_, "atom_force": float(value),
                            "config_force": float(value)}  # a copy's change stays its own
        self.threshold_ = float(value)
        self.threshold_source_ = (f"forces: {source}; energy: Tukey fence of the training "
                                  f"{self.threshold_on}")

    def fit_arrays(
        self,
        forces: np.ndarray,
        energies: np.ndarray | None,
        config_index: np.ndarray,
        *,
        ref_forces: np.ndarray | None = None,
        ref_energies: np.ndarray | None = None,
    ) -> EnsembleEstimator:
        """Learn the Tukey-fence thresholds on the training set.

        Parameters
        ----------
        forces : ndarray, shape (K, N, 3)
            Ensemble forces on the training atoms, eV/Å (K >= 2).
        energies : ndarray, shape (K, C), or None
            Ensemble energies of the training configurations, eV.
        config_index : ndarray of int, shape (N,)
            Configuration of each atom.
        ref_forces : ndarray, shape (N, 3), optional
            Reference forces (required with ``threshold_on="error"``).
        ref_energies : ndarray, shape (C,), optional
            Reference energies (required with ``threshold_on="error"`` and energies).

        Returns
        -------
        self
        """
        if self.threshold_on not in THRESHOLD_SOURCES:
            raise InputError(
                f"threshold_on: expected one of {THRESHOLD_SOURCES}, got {self.threshold_on!r}"
            )
        if self.threshold_on == "error":
            if ref_forces is None:
                raise InputError("ref_forces: required by threshold_on='error' (training errors)")
            if energies is not None and ref_energies is None:
                raise InputError("ref_energies: required by threshold_on='error' with energies")
        values = self._metrics(forces, energies, config_index, ref_forces, ref_energies)
        source = {
            "atom_force": "force_error" if self.threshold_on == "error" else "atom_uncertainty",
            "config_force": (
                "config_force_error" if self.threshold_on == "error" else "config_uncertainty"
            ),
            "config_energy": (
                "config_energy_error"
                if self.threshold_on == "error"
                else "config_energy_uncertainty"
            ),
        }
        self.thresholds_ = {
            name: tukey_fence(values[key], self.fence_k)
            for name, key in source.items()
            if key in values
        }
        self.threshold_source_ = self.threshold_on
        self.threshold_ = float(self.thresholds_["config_force"])
        self.n_models_ = int(np.shape(forces)[0])
        return self

    def predict_arrays(
        self,
        forces: np.ndarray,
        energies: np.ndarray | None,
        config_index: np.ndarray,
        *,
        ref_forces: np.ndarray | None = None,
        ref_energies: np.ndarray | None = None,
    ) -> UQResult:
        """Per-atom and per-configuration ensemble uncertainty, flagged against the fences.

        Parameters are as in :meth:`fit`.

        Returns
        -------
        UQResult
            ``method="ensemble"``, ``atom_uncertainty`` = U_F,atom (eV/Å),
            ``config_uncertainty`` = U_F,cfg, flags against the fitted fences;
            extras ``"config_energy_uncertainty"`` / ``"config_energy_flag"`` (with
            energies) and, with references, ``"force_error"``,
            ``"config_force_error"``, ``"config_energy_error"``.
        """
        check_is_fitted(self, "thresholds_")
        values = self._metrics(forces, energies, config_index, ref_forces, ref_energies)
        atom_u, config_u = values.pop("atom_uncertainty"), values.pop("config_uncertainty")
        index = values.pop("config_index")
        extras = dict(values)
        if "config_energy_uncertainty" in extras and "config_energy" in self.thresholds_:
            extras["config_energy_flag"] = (
                extras["config_energy_uncertainty"] > self.thresholds_["config_energy"]
            )
        return UQResult(
            method=self.name,
            atom_uncertainty=atom_u,
            config_uncertainty=config_u,
            config_index=index,
            atom_flags=atom_u > self.thresholds_["atom_force"],
            config_flags=config_u > self.thresholds_["config_force"],
            threshold=float(self.thresholds_["atom_force"]),
            unit="eV/Å",
            extras=extras,
        )

    def _metrics(
        self,
        forces: np.ndarray,
        energies: np.ndarray | None,
        config_index: np.ndarray,
        ref_forces: np.ndarray | None,
        ref_energies: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Validate inputs and compute every per-atom / per-configuration quantity."""
        forces = check_array(forces, "forces", ndim=3)
        if forces.shape[2] != 3 or forces.shape[0] < 2:
            raise InputError(
                f"forces: expected shape (K >= 2 models, N atoms, 3), got {forces.shape}"
            )
        n_atoms = forces.shape[1]
        index = check_config_index(config_index, n_atoms)
        n_configs = int(index.max()) + 1
        if energies is not None:
            energies = check_array(energies, "energies", ndim=2)
            if energies.shape[0] != forces.shape[0]:
                raise InputError(
                    f"energies: expected {forces.shape[0]} models (as forces), "
                    f"got {energies.shape[0]}"
                )
            if energies.shape[1] < n_configs:
                raise InputError(
                    f"energies: expected {n_configs} configurations (config_index), "
                    f"got {energies.shape[1]}"
                )
            n_configs = energies.shape[1]
        sizes = np.bincount(index, minlength=n_configs)
        atom_u = force_max_deviation(forces)
        out = {
            "config_index": index,
            "atom_uncertainty": atom_u,
            "config_uncertainty": config_max(atom_u, index, n_configs),
        }
        per = np.maximum(sizes, 1) if self.energy_per_atom else np.ones(n_configs)
        if energies is not None:
            out["config_energy_uncertainty"] = energy_max_deviation(energies) / per
        if ref_forces is not None:
            ref_forces = check_array(ref_forces, "ref_forces", ndim=2)
            if ref_forces.shape != (n_atoms, 3):
                raise InputError(
                    f"ref_forces: expected shape {(n_atoms, 3)}, got {ref_forces.shape}"
                )
            out["force_error"] = force_error(forces, ref_forces)
            out["config_force_error"] = config_max(out["force_error"], index, n_configs)
        if ref_energies is not None:
            if energies is None:
                raise InputError("ref_energies: given without ensemble energies")
            ref_energies = check_array(ref_energies, "ref_energies", ndim=1)
            if len(ref_energies) != n_configs:
                raise InputError(
                    f"ref_energies: expected {n_configs} configurations, got {len(ref_energies)}"
                )
            out["config_energy_error"] = energy_error(energies, ref_energies) / per
        return out

    def _get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        check_is_fitted(self, "thresholds_")
        return {"thresholds": self.thresholds_, "threshold_source": self.threshold_source_,
                "n_models": self.n_models_, "units": {"thresholds": "eV/Å (energy: eV)"}}, {}

    def _set_state(self, state: dict, arrays: Any, directory: Any) -> None:
        self.thresholds_ = {k: float(v) for k, v in state["thresholds"].items()}
        self.threshold_source_ = state["threshold_source"]
        self.threshold_ = float(self.thresholds_["config_force"])
        self.n_models_ = int(state["n_models"])
