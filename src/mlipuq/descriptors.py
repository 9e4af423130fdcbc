"""A simple, model-free per-atom descriptor and a calculator wrapper that adds UQ.

:func:`radial_descriptor` gives every atom a vector of Gaussian-smeared neighbour
counts per neighbour element (a radial distribution around the atom, smoothly cut
off). It needs no model, works for molecules and periodic cells, and is used by the
tests, the demo's model-free fallback and :mod:`mlipuq.selection` when no model
features are given.

:class:`DescriptorUQCalculator` wraps any ASE calculator (EMT, a foreign MLIP, ...)
and adds ``<method>_uncertainty`` per-atom arrays from any fitted estimator applied
to a descriptor: "any model through plain arrays".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mlipuq.exceptions import InputError
from mlipuq.validation import as_species


def radial_descriptor(
    atoms: Atoms,
    *,
    elements: Sequence[str] | None = None,
    cutoff: float = 5.0,
    n_radial: int = 8,
    r_min: float = 0.5,
    width: float | None = None,
) -> np.ndarray:
    """Radial Gaussian-smeared neighbour counts per neighbour element.

    For atom i, neighbour element s and radial centre r_k (``n_radial`` centres
    evenly spaced in [r_min, cutoff])::

        G_i[s, k] = sum_{j of element s, r_ij < cutoff} exp(-(r_ij - r_k)^2 / (2 w^2)) f_c(r_ij)

    with the cosine cutoff ``f_c(r) = 0.5 (cos(pi r / cutoff) + 1)``. Periodic images
    are included (ASE neighbour list). Values are dimensionless (smoothed neighbour
    counts); w and the r_k are in Å.

    Parameters
    ----------
    atoms : ase.Atoms
        A structure (molecule or periodic).
    elements : sequence of str, optional
        Neighbour elements defining the column blocks (sorted unique symbols of
        ``atoms`` by default). Pass the training elements so that all structures
        share one layout; an element of ``atoms`` not in ``elements`` is an error.
    cutoff : float
        Cutoff radius in Å.
    n_radial : int
        Number of Gaussians per element.
    r_min : float
        First Gaussian centre in Å.
    width : float, optional
        Gaussian width w in Å (default: the spacing of the centres).

    Returns
    -------
    ndarray of float64, shape (n_atoms, len(elements) * n_radial)
        Row i is atom i; block ``s`` (columns ``s*n_radial:(s+1)*n_radial``) is
        neighbour element ``elements[s]``.

    Raises
    ------
    InputError
        Unknown element, bad cutoff / n_radial.
    """
    from ase.neighborlist import neighbor_list

    if not np.isfinite(cutoff) or cutoff <= 0:
        raise InputError(f"cutoff: expected a positive length in Å, got {cutoff!r}")
    if int(n_radial) < 1:
        raise InputError(f"n_radial: expected >= 1, got {n_radial!r}")
    if not 0 <= r_min < cutoff:
        raise InputError(f"r_min: expected 0 <= r_min < cutoff ({cutoff}), got {r_min!r}")
    symbols = np.asarray(atoms.get_chemical_symbols(), dtype=str)
    elements = _check_elements(symbols, elements)
    centres = np.linspace(r_min, cutoff, int(n_radial))
    spacing = centres[1] - centres[0] if n_radial > 1 else cutoff / 2
    width = spacing if width is None else float(width)
    if not np.isfinite(width) or width <= 0:
        raise InputError(f"width: expected a positive length in Å, got {width!r}")

    n_el = len(elements)
    out = np.zeros((len(atoms), n_el * int(n_radial)))
    if len(atoms) == 0:
        return out
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    if len(i) == 0:
        return out
    element_of = {s: k for k, s in enumerate(elements)}
    block = np.array([element_of[s] for s in symbols])[j]
    fc = 0.5 * (np.cos(np.pi * d / cutoff) + 1.0)
    gauss = np.exp(-((d[:, None] - centres[None, :]) ** 2) / (2.0 * width**2)) * fc[:, None]
    flat = out.reshape(len(atoms) * n_el, int(n_radial))
    np.add.at(flat, i * n_el + block, gauss)
    return out


def _check_elements(symbols: np.ndarray, elements: Sequence[str] | None) -> list[str]:
    if elements is None:
        return sorted(set(symbols.tolist()))
    elements = list(as_species(np.asarray(list(elements)), "elements"))
    if len(set(elements)) != len(elements):
        raise InputError(f"elements: contains duplicates {elements}")
    unknown = sorted(set(symbols.tolist()) - set(elements))
    if unknown:
        raise InputError(
            f"structure: element(s) {unknown} not among the known elements {elements}"
        )
    return elements


def descriptor_matrix(
    frames: Sequence[Atoms], *, elements: Sequence[str] | None = None, **kwargs: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack :func:`radial_descriptor` over configurations.

    Parameters
    ----------
    frames : sequence of ase.Atoms
        C configurations.
    elements : sequence of str, optional
        Column layout (default: sorted union of the elements of all frames).
    **kwargs
        Passed to :func:`radial_descriptor` (cutoff, n_radial, r_min, width).

    Returns
    -------
    features : ndarray, shape (N, D)
        Per-atom descriptors of all N atoms in frame order.
    species : ndarray of str, shape (N,)
        Chemical symbol of each atom.
    config_index : ndarray of int64, shape (N,)
        Configuration of each atom.
    """
    if len(frames) == 0:
        raise InputError("frames: no configurations given")
    if elements is None:
        elements = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
    blocks = [radial_descriptor(atoms, elements=elements, **kwargs) for atoms in frames]
    species = np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str) for a in frames])
    sizes = [len(atoms) for atoms in frames]
    config_index = np.repeat(np.arange(len(frames), dtype=np.int64), sizes)
    return np.concatenate(blocks, axis=0), species, config_index


class DescriptorUQCalculator(Calculator):
    """ASE calculator: a base calculator plus per-atom uncertainties from estimators.

    Energy, forces (and whatever else) come from ``base_calc``; for every entry
    ``name -> estimator`` the per-atom arrays of
    ``estimator.predict(ModelOutputs of descriptor_fn(atoms))`` (a
    :class:`~mlipuq.result.UQResult`) are added to ``results`` as
    ``<name>_uncertainty`` (n_atoms,) and ``<name>_<extra>``. An "estimator" may
    also be a plain function ``f(features (n, D), species (n,)) -> (n,)``.

    Parameters
    ----------
    base_calc : ase Calculator
        Supplies energy (eV) and forces (eV/Å).
    estimators : mapping of str -> estimator or callable
        Fitted UQ estimators, keyed by the method name used in the result keys.
    descriptor_fn : callable, optional
        ``f(atoms) -> (n_atoms, D)`` features; default :func:`radial_descriptor`.

    Examples
    --------
    >>> from ase.build import bulk
    >>> from ase.calculators.emt import EMT
    >>> calc = DescriptorUQCalculator(EMT(), {"norm": lambda x, s: np.linalg.norm(x, axis=1)})
    >>> atoms = bulk("Cu", cubic=True)
    >>> atoms.calc = calc
    >>> energy = atoms.get_potential_energy()  # EMT, eV
    >>> calc.results["norm_uncertainty"].shape
    (4,)
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies", "stress"]

    def __init__(
        self,
        base_calc: Calculator,
        estimators: Mapping[str, object],
        descriptor_fn: Callable[[Atoms], np.ndarray] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if not estimators:
            raise InputError("estimators: give at least one name -> estimator")
        self.base_calc = base_calc
        self.estimators = dict(estimators)
        self.descriptor_fn = radial_descriptor if descriptor_fn is None else descriptor_fn

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy", "forces"),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        work = self.atoms.copy()
        work.calc = self.base_calc
        wanted = [p for p in properties if p in ("energy", "forces", "stress", "energies")]
        for prop in sorted(set(wanted) | {"energy", "forces"}):
            try:
                work.calc.get_property(prop, work)
            except Exception:  # optional properties the base model lacks (stress, energies)
                if prop in ("energy", "forces"):
                    raise
        self.results = {k: np.copy(v) for k, v in self.base_calc.results.items()}
        self.results.setdefault("free_energy", self.results["energy"])
        features = np.asarray(self.descriptor_fn(self.atoms), dtype=float)
        species = np.asarray(self.atoms.get_chemical_symbols(), dtype=str)
        for name, estimator in self.estimators.items():
            self.results.update(_uncertainty_arrays(name, estimator, features, species))


def _uncertainty_arrays(
    name: str, estimator: object, features: np.ndarray, species: np.ndarray
) -> dict[str, np.ndarray]:
    from mlipuq.method import UQMethod

    if not isinstance(estimator, UQMethod):
        values = np.asarray(estimator(features, species), dtype=float)
        if values.shape != (len(species),):
            raise InputError(
                f"estimator {name!r}: expected {len(species)} per-atom values, got {values.shape}"
            )
        return {f"{name}_uncertainty": values}
    from mlipuq.backends.base import ModelOutputs

    result = estimator.predict(ModelOutputs(
        species=np.asarray(species), descriptors=features,
        config_index=np.zeros(len(species), dtype=np.int64)))  # one configuration
    arrays = result.as_arrays(prefix=name)
    if result.threshold is not None:  # a fitted threshold travels with the results
        arrays[f"{name}_threshold"] = float(result.threshold)
        arrays[f"{name}_threshold_aggregate"] = result.config_aggregate
    return arrays
