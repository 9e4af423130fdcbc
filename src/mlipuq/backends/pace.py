"""pacemaker (python-ace) interoperability: B-projections, ``.asi`` files, test bases.

An ACE potential is linear in its B-basis functions (before the embedding), so
the per-atom *B-projections* are exactly the features D-optimality needs
(docs/methods.md). This module turns ASE frames into those projections in
atom-table order, and reads/writes pacemaker's active-set files so that an
active set built with :class:`mlipuq.doptimality.DOptimalityEstimator` can be
used by pacemaker's ``PyACECalculator.set_active_set`` (and LAMMPS ``pair_style
pace/extrapolation``), and vice versa.

What an ``.asi`` file holds (checked against python-ace 0.4.0rc1,
``pyace/activelearning.py::save_active_inverse_set`` and the C++ loader):

* an uncompressed ``.npz``, one array per element, keyed by the chemical symbol;
* each array is the *pseudo-inverse* of that element's active set,
  ``pinv(A_s)`` with shape ``(D_s, D_s)`` (``D_s`` = number of B-functions of
  element ``s``), so that ``gamma_i = max_j |(x_i @ pinv(A_s))_j|``;
* the loader requires *square* matrices and exactly the potential's elements
  (a missing, extra or foreign element is rejected or crashes it).

python-ace is an optional dependency: it is imported only inside the functions
that need it, and a clear :class:`~mlipuq.exceptions.InputError` says how to
install it when it is missing. The nonlinear ("full") projections of
python-ace 0.4.0rc1 come back as zeros (docs/pace.md), so only the linear
projections are offered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from mlipuq.backends.base import ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.io import atomic_path, load_npz

if TYPE_CHECKING:
    from mlipuq.run_folder import RunFolder

logger = logging.getLogger(__name__)

PACE_MISSING = "python-ace is not installed: pip install 'mlipuq[pace]'"

#: Parameters of the fixed, unfitted tungsten descriptor used by the W study
#: (tests/test_w_uqace.py, benchmarks/w_heterogeneity.py): 188 B-functions.
W_STUDY_BASIS: dict[str, Any] = {
    "rcut": 5.0,
    "dcut": 0.01,
    "radbase": "SBessel",
    "radparameters": (5.25,),
    "nradmax_by_orders": (10, 6, 3, 2),
    "lmax_by_orders": (0, 3, 2, 1),
}


def _import_pyace() -> Any:
    """Import python-ace's modules lazily, raising a clear InputError when it is absent."""
    try:
        import pyace  # noqa: F401
        from pyace import activelearning, asecalc, basis
    except ImportError:
        raise InputError(PACE_MISSING) from None
    return activelearning, asecalc, basis


def pace_available() -> bool:
    """True when python-ace can be imported."""
    try:
        _import_pyace()
    except InputError:
        return False
    return True


def small_test_basis(
    elements: Sequence[str] = ("W",),
    *,
    rcut: float = W_STUDY_BASIS["rcut"],
    dcut: float = W_STUDY_BASIS["dcut"],
    nradmax_by_orders: Sequence[int] = W_STUDY_BASIS["nradmax_by_orders"],
    lmax_by_orders: Sequence[int] = W_STUDY_BASIS["lmax_by_orders"],
    coefficients: str = "zero",
    functions: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    embedding: Mapping[str, Any] | None = None,
) -> Any:
    """Build an unfitted pacemaker basis (``BBasisConfiguration``) without any fitting.

    The linear B-projections do not depend on the expansion coefficients, so an
    unfitted basis is a fixed, reproducible descriptor. The defaults are the W
    study's descriptor (:data:`W_STUDY_BASIS`: rcut 5.0 Å, SBessel radial basis,
    ``nradmax_by_orders=(10, 6, 3, 2)``, ``lmax_by_orders=(0, 3, 2, 1)``,
    188 functions for one element).

    Parameters
    ----------
    elements : sequence of str
        Chemical symbols of the potential (every order of interaction is
        built with the same ``nradmax_by_orders`` / ``lmax_by_orders``).
    rcut, dcut : float
        Radial cutoff and cutoff smoothing width in Å.
    nradmax_by_orders, lmax_by_orders : sequence of int
        Radial and angular limits per body order (pacemaker's ``functions``).
    coefficients : {"zero", "random"}
        Initial expansion coefficients. ``"random"`` gives non-zero energies and
        forces (useful to test a calculator); it draws from python-ace's own
        random state, so energies are not reproducible, projections are.
    functions : mapping, optional
        pacemaker's ``functions`` block verbatim (keys ``"ALL"``, ``"UNARY"``,
        ``"BINARY"`` or an element symbol, each with ``nradmax_by_orders`` and
        ``lmax_by_orders``); overrides the two arguments above. Per-element
        entries give elements different numbers of B-functions.
    embedding : mapping, optional
        pacemaker's embedding of every element (``npot``, ``fs_parameters``,
        ``ndensity``); default ``FinnisSinclairShiftedScaled``, ``[1, 1, 1, 0.5]``,
        2 densities. :data:`mlipuq.backends.pace_fit.LINEAR_EMBEDDING` is linear.

    Returns
    -------
    pyace.basis.BBasisConfiguration
    """
    _import_pyace()
    from pyace.multispecies_basisextension import create_multispecies_basis_config

    elements = [str(e) for e in elements]
    if not elements:
        raise InputError("elements: expected at least one chemical symbol, got none")
    if coefficients not in ("zero", "random"):
        raise InputError(f"coefficients: expected 'zero' or 'random', got {coefficients!r}")
    orders = {
        "nradmax_by_orders": [int(n) for n in nradmax_by_orders],
        "lmax_by_orders": [int(n) for n in lmax_by_orders],
    }
    config = {
        "deltaSplineBins": 0.001,
        "elements": elements,
        "embeddings": {
            "ALL": {
                "npot": "FinnisSinclairShiftedScaled",
                "fs_parameters": [1, 1, 1, 0.5],
                "ndensity": 2,
            } if embedding is None else dict(embedding)
        },
        "bonds": {
            "ALL": {
                "radbase": W_STUDY_BASIS["radbase"],
                "radparameters": list(W_STUDY_BASIS["radparameters"]),
                "rcut": float(rcut),
                "dcut": float(dcut),
            }
        },
        "functions": {"ALL": orders} if functions is None else _plain(functions),
    }
    return create_multispecies_basis_config(config, func_coefs_initializer=coefficients)


def _plain(functions: Mapping[str, Mapping[str, Sequence[int]]]) -> dict:
    return {
        key: {name: [int(n) for n in values] for name, values in block.items()}
        for key, block in functions.items()
    }


class PaceBackend:
    """Per-atom B-projections (and energies/forces) from a pacemaker B-basis potential.

    Implements :class:`mlipuq.backends.base.Backend` as ``"pace"``: a run folder of
    this backend keeps member ``model_i``'s potential as ``RUN/models/model_i.yaml``:
    your own pacemaker potentials (:meth:`import_models`, ``mlipuq train --backend
    pace --potential a.yaml ...``) or a linear ACE fitted by :meth:`train`
    (:mod:`mlipuq.backends.pace_train`). Optional capabilities: :meth:`train`,
    :meth:`import_models`, :meth:`uq_calculator` (pacemaker's calculator with the
    run's methods attached) and :meth:`export_method` (``.asi`` files beside the
    fitted D-optimality methods).

    Parameters
    ----------
    potential : path-like or pyace.basis.BBasisConfiguration
        A pacemaker potential ``.yaml`` (B-basis; ``.yace`` files have no
        B-projections) or a ``BBasisConfiguration`` such as
        :func:`small_test_basis` returns.

    Attributes
    ----------
    elements : list of str
        The potential's elements, in pacemaker's species-type order (sorted).
    n_functions : dict of str -> int
        Number of B-functions ``D_s`` per element.
    n_features : int
        ``max_s D_s``: the width of :meth:`projections`' feature matrix.

    Notes
    -----
    Elements may have different numbers of B-functions. :meth:`projections`
    returns one (N, max D_s) matrix whose columns beyond ``D_s`` are zero for
    atoms of element ``s``. Since every estimator works per element, those
    columns are constant zero within an element: an estimator that drops
    dependent columns gives the same gamma as on the unpadded matrix, and
    :func:`write_asi` cuts each inverse back to ``(D_s, D_s)``.
    :meth:`projections_by_element` gives the unpadded per-element matrices.
    """

    name = "pace"

    def __init__(self, potential: str | os.PathLike | Any) -> None:
        _, _, basis = _import_pyace()
        if isinstance(potential, basis.BBasisConfiguration):
            config = potential
        else:
            path = Path(potential)
            if not path.is_file():
                raise InputError(f"potential: file not found: {path}")
            if path.suffix not in (".yaml", ".yml"):
                raise InputError(
                    f"potential: expected a pacemaker B-basis .yaml file, got {path.name}"
                )
            try:
                config = basis.BBasisConfiguration(str(path))
            except Exception as exc:  # pyace raises RuntimeError/ValueError on bad yaml
                raise InputError(f"potential: cannot read {path} ({exc})") from None
        self.basis_config = config
        self.basis = basis.ACEBBasisSet(config)
        self.elements = [str(e) for e in self.basis.elements_name]
        activelearning, _, _ = _import_pyace()
        counts = activelearning.compute_number_of_functions(self.basis)
        index = self.basis.elements_to_index_map
        self.n_functions = {element: int(counts[index[element]]) for element in self.elements}
        self.n_features = max(self.n_functions.values())
        self.cutoff = float(self.basis.cutoffmax)

    @property
    def known_species(self) -> list[str]:
        """The potential's elements (chemical symbols)."""
        return list(self.elements)

    @classmethod
    def model_path(cls, run: RunFolder, model_id: str) -> Path:
        """``RUN/models/<model_id>.yaml``: the member's pacemaker B-basis potential.

        Raises
        ------
        InputError
            The file is missing.
        """
        path = run.models_dir / f"{run.model_dir(model_id).name}.yaml"
        if not path.is_file():
            raise InputError(f"{path}: no pacemaker potential for {model_id!r} (expected a "
                             "B-basis .yaml)")
        return path

    @classmethod
    def from_run(
        cls,
        run: RunFolder,
        model_id: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        threads: int | None = 1,
    ) -> PaceBackend:
        """Member ``model_id`` of ``run`` (``device``, ``batch_size``, ``threads`` unused)."""
        return cls(cls.model_path(run, model_id))

    def _check_frames(self, frames: Sequence[Atoms]) -> list[Atoms]:
        if isinstance(frames, Atoms):
            frames = [frames]
        frames = list(frames)
        if not frames:
            raise InputError("frames: expected at least one configuration, got none")
        known = set(self.elements)
        for number, atoms in enumerate(frames):
            if not isinstance(atoms, Atoms):
                raise InputError(
                    f"frames: item {number} is a {type(atoms).__name__}, expected ase.Atoms"
                )
            unknown = sorted(set(atoms.get_chemical_symbols()) - known)
            if unknown:
                raise InputError(
                    f"frames: configuration {number} has element(s) {unknown} "
                    f"that the potential does not know (it has {self.elements})"
                )
            pbc = atoms.get_pbc()
            if pbc.any() and not pbc.all():
                raise InputError(
                    f"frames: configuration {number} has mixed periodicity {pbc.tolist()}; "
                    "pacemaker supports only fully periodic or non-periodic cells"
                )
        return frames

    def projections_by_element(
        self, frames: Sequence[Atoms]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Unpadded per-element B-projections.

        Returns
        -------
        dict of str -> (ndarray (n_s, D_s) float64, ndarray (n_s,) int)
            For each element of the potential: its atoms' projections and their
            row numbers in the atom table (config-major, atom order within a
            configuration). Elements absent from ``frames`` give (0, D_s).
        """
        frames = self._check_frames(frames)
        activelearning, _, _ = _import_pyace()
        species = np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str) for a in frames])
        by_type = activelearning.compute_B_projections(self.basis, frames)
        index = self.basis.elements_to_index_map
        out = {}
        for element in self.elements:
            rows = np.flatnonzero(species == element)
            values = np.asarray(by_type[index[element]], dtype=np.float64)
            # pyace fills each species' matrix in config-major, atom order: same as `rows`.
            if values.shape[0] != rows.size:
                raise RuntimeError(
                    f"pyace returned {values.shape[0]} rows for {element}, expected {rows.size}"
                )
            out[element] = (values, rows)
        return out

    def projections(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-atom linear B-projections in atom-table order.

        Parameters
        ----------
        frames : sequence of ase.Atoms
            Configurations (fully periodic or fully non-periodic).

        Returns
        -------
        features : ndarray of float64, shape (N, n_features)
            B-projections (unitless basis-function values); zero-padded beyond
            ``n_functions[element]`` (see the class notes).
        species : ndarray of str, shape (N,)
        config_index : ndarray of int, shape (N,)
        """
        frames = self._check_frames(frames)
        sizes = [len(a) for a in frames]
        species = np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str) for a in frames])
        config_index = np.repeat(np.arange(len(frames)), sizes)
        features = np.zeros((len(species), self.n_features), dtype=np.float64)
        for values, rows in self.projections_by_element(frames).values():
            features[rows, : values.shape[1]] = values
        return features, species, config_index

    def calculator(self, active_set: str | os.PathLike | None = None, **kwargs: Any) -> Any:
        """A pacemaker ``PyACECalculator`` for this potential, optionally with an ``.asi``.

        With ``active_set``, ``calc.results["gamma"]`` holds per-atom gamma.
        Extra keyword arguments go to ``PyACECalculator``.
        """
        _, asecalc, _ = _import_pyace()
        calc = asecalc.PyACECalculator(self.basis_config, **kwargs)
        if active_set is not None:
            read_asi(active_set, elements=self.elements, n_functions=self.n_functions)
            calc.set_active_set(str(active_set))
        return calc

    def evaluate(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One ``PyACECalculator`` evaluation per configuration.

        Returns
        -------
        energies : ndarray, shape (C,)
            eV.
        forces : ndarray, shape (N, 3)
            eV/Å.
        features : ndarray of float64, shape (N, n_features)
            The same evaluation's linear B-projections (as :meth:`projections`).
        """
        from mlipuq.backends.pace_calculator import PaceUQCalculator

        frames = self._check_frames(frames)
        calc = PaceUQCalculator(self.basis_config, n_features=self.n_features)
        energies = np.empty(len(frames))
        forces, features = [], []
        for number, atoms in enumerate(frames):
            atoms = atoms.copy()
            atoms.calc = calc
            energies[number] = atoms.get_potential_energy()
            forces.append(np.asarray(atoms.get_forces(), dtype=np.float64))
            features.append(calc.padded_projections())
        return energies, np.concatenate(forces, axis=0), np.concatenate(features, axis=0)

    def energies_forces(self, frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray]:
        """Energies (C,) in eV and forces (N, 3) in eV/Å from ``PyACECalculator``."""
        energies, forces, _ = self.evaluate(frames)
        return energies, forces

    def outputs(self, frames: Sequence[Atoms], *, batch_size: int | None = None
                ) -> ModelOutputs:
        """Energies, forces and B-projections of one evaluation, in one :class:`ModelOutputs`.

        ``batch_size`` is accepted for the :class:`~mlipuq.backends.base.Backend`
        protocol and ignored. Descriptors stay float64 (D-optimality needs it).
        """
        frames = self._check_frames(frames)
        energies, forces, features = self.evaluate(frames)
        sizes = [len(a) for a in frames]
        return ModelOutputs(
            energies=energies,
            forces=forces,
            descriptors=features,
            species=np.concatenate([np.asarray(a.get_chemical_symbols(), dtype=str)
                                    for a in frames]),
            config_index=np.repeat(np.arange(len(frames)), sizes),
        )

    # ------------------------------------------------------------ optional capabilities
    @classmethod
    def train(cls, train_file: str | os.PathLike, run_dir: str | os.PathLike,
              **options: Any) -> RunFolder:
        """A pace run folder: your potentials (``potentials=[...]``) or a linear ACE fit.

        See :func:`mlipuq.backends.pace_train.train_pace` for the options.
        """
        from mlipuq.backends.pace_train import train_pace

        return train_pace(train_file, run_dir, **options)

    @classmethod
    def import_models(cls, potentials: Sequence[str | os.PathLike],
                      train_file: str | os.PathLike, run_dir: str | os.PathLike,
                      **options: Any) -> RunFolder:
        """A pace run folder of your pacemaker potentials (one member each), not trained
        (``mlipuq train --backend pace --potential a.yaml ...``; same as
        :meth:`train` with ``potentials``)."""
        from mlipuq.backends.pace_train import train_pace

        if not potentials:
            raise InputError("potentials: expected at least one pacemaker .yaml file")
        return train_pace(train_file, run_dir, potentials=potentials, **options)

    @classmethod
    def uq_calculator(
        cls,
        run: RunFolder,
        model_id: str = "model_0",
        *,
        estimators: dict[str, Any] | str | None = "auto",
        device: str = "cpu",
        **kwargs: Any,
    ) -> Any:
        """:class:`~mlipuq.backends.pace_calculator.PaceUQCalculator` of member ``model_id``.

        ``estimators="auto"`` attaches the methods ``mlipuq fit`` saved for this
        member that one evaluation can drive. ``device`` is unused (CPU code);
        other keyword arguments go to the calculator (``keep_descriptors``,
        ``store_arrays``, ``PyACECalculator`` options).
        """
        from mlipuq.backends.pace_calculator import PaceUQCalculator
        from mlipuq.run_methods import check_member
        from mlipuq.uq_calculator import run_estimators

        check_member(run, model_id)
        backend = cls.from_run(run, model_id)
        return PaceUQCalculator(str(cls.model_path(run, model_id)),
                                n_features=backend.n_features,
                                estimators=run_estimators(run, model_id, estimators), **kwargs)

    @classmethod
    def export_method(cls, run: RunFolder, model_id: str | None, method: Any,
                      directory: str | os.PathLike) -> list[Path]:
        """Write a fitted method's active sets as pacemaker ``.asi`` files in ``directory``.

        A method with per-element active-set inverses (``active_inverse_`` keyed by
        element, D-optimality) gives ``active_set.asi``; one keyed by (cluster,
        element) (clustered D-optimality) gives ``active_set_cluster<c>.asi`` per
        cluster that has every element of the potential (pacemaker needs all of
        them; the min over these files' gamma is the method's gamma). Other
        methods, and committee methods (``model_id`` None), give nothing.

        Returns
        -------
        list of Path
            The files written (each atomically).
        """
        inverses = getattr(method, "active_inverse_", None)
        if model_id is None or not isinstance(inverses, Mapping) or not inverses:
            return []
        backend = cls.from_run(run, model_id)
        directory = Path(directory)
        if all(isinstance(key, str) for key in inverses):
            path = directory / "active_set.asi"
            write_asi(path, inverses, elements=backend.elements,
                      n_functions=backend.n_functions)
            return [path]
        by_cluster: dict[Any, dict[str, np.ndarray]] = {}
        for key, inverse in inverses.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                return []
            by_cluster.setdefault(key[0], {})[str(key[1])] = inverse
        written = []
        for cluster, matrices in sorted(by_cluster.items()):
            if sorted(matrices) != sorted(backend.elements):
                logger.info("%s: cluster %s has no active set for %s; no .asi written for it",
                            directory, cluster,
                            sorted(set(backend.elements) - set(matrices)))
                continue
            path = directory / f"active_set_cluster{cluster}.asi"
            write_asi(path, matrices, elements=backend.elements,
                      n_functions=backend.n_functions)
            written.append(path)
        return written


def _check_elements(found: Sequence[str], elements: Sequence[str] | None, source: str) -> None:
    if elements is None:
        return
    expected, got = sorted(str(e) for e in elements), sorted(found)
    if expected != got:
        raise InputError(f"{source}: active set is for elements {got}, expected exactly {expected}")


def read_asi(
    path: str | os.PathLike,
    *,
    elements: Sequence[str] | None = None,
    n_functions: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Read a pacemaker ``.asi`` file: element -> pseudo-inverse of the active set.

    Parameters
    ----------
    path : path-like
        The ``.asi`` (npz) file.
    elements : sequence of str, optional
        The elements it must hold (those of the potential or estimator); a
        file for other elements raises :class:`InputError`.
    n_functions : mapping of str -> int, optional
        Expected ``D_s`` per element: each matrix must be ``(D_s, D_s)``.

    Returns
    -------
    dict of str -> ndarray of float64, shape (D_s, D_s)
        ``pinv(A_s)``: gamma of a projection row ``x`` is ``max |x @ M|``.
    """
    from ase.data import chemical_symbols

    data = load_npz(path)
    if not data:
        raise InputError(f"{path}: .asi file holds no active set")
    unknown = sorted(set(data) - set(chemical_symbols[1:]))
    if unknown:
        raise InputError(f"{path}: keys {unknown} are not element symbols (not an .asi file?)")
    _check_elements(list(data), elements, str(path))
    out = {}
    for element, matrix in data.items():
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InputError(f"{path}: {element} matrix must be square, got shape {matrix.shape}")
        if n_functions is not None and matrix.shape[0] != n_functions[element]:
            expected = n_functions[element]
            raise InputError(
                f"{path}: {element} matrix is {matrix.shape}, the potential has "
                f"{expected} B-functions (expected ({expected}, {expected}))"
            )
        if not np.all(np.isfinite(matrix)):
            raise InputError(f"{path}: {element} matrix contains NaN or infinite values")
        out[element] = matrix
    return out


def asi_matrices(
    active_inverse: Mapping[str, np.ndarray],
    *,
    n_functions: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Turn per-element active-set inverses (D, r) into pacemaker's square (D_s, D_s) form.

    Zero columns are appended when ``r < D`` (a rank-deficient active set):
    gamma, a maximum of absolute values, is unchanged. Rows beyond ``D_s``
    (zero padding of :meth:`PaceBackend.projections`) are cut off; they must be
    zero-effect, i.e. belong to padding columns.
    """
    out = {}
    for element, inverse in active_inverse.items():
        inverse = np.asarray(inverse, dtype=np.float64)
        if inverse.ndim != 2:
            raise InputError(
                f"active_inverse[{element!r}]: expected a 2-d array, got {inverse.ndim}-d"
            )
        d = inverse.shape[0] if n_functions is None else int(n_functions[element])
        if inverse.shape[0] < d:
            raise InputError(
                f"active_inverse[{element!r}]: has {inverse.shape[0]} feature rows, "
                f"the potential has {d} B-functions"
            )
        dropped = inverse[d:]
        if dropped.size and np.abs(dropped).max() > 1e-8 * max(np.abs(inverse).max(), 1e-300):
            raise InputError(
                f"active_inverse[{element!r}]: rows beyond the element's {d} B-functions "
                "are not zero (features were not zero-padded projections of this potential)"
            )
        inverse = inverse[:d]
        if inverse.shape[1] > d:
            raise InputError(
                f"active_inverse[{element!r}]: {inverse.shape[1]} active rows exceed D={d}"
            )
        square = np.zeros((d, d), dtype=np.float64)
        square[:, : inverse.shape[1]] = inverse
        out[element] = square
    return out


def write_asi(
    path: str | os.PathLike,
    active_inverse: Mapping[str, np.ndarray],
    *,
    elements: Sequence[str] | None = None,
    n_functions: Mapping[str, int] | None = None,
) -> None:
    """Write per-element active-set inverses as a pacemaker ``.asi`` file (atomically).

    Parameters
    ----------
    path : path-like
        Target file (conventionally ``<potential>.asi``).
    active_inverse : mapping of str -> ndarray, shape (D, r)
        E.g. ``DOptimalityEstimator.active_inverse_`` or :func:`read_asi` output.
    elements : sequence of str, optional
        The potential's elements: pacemaker needs exactly one matrix per element.
    n_functions : mapping of str -> int, optional
        ``D_s`` per element (``PaceBackend.n_functions``): matrices are cut /
        padded to ``(D_s, D_s)`` (see :func:`asi_matrices`).
    """
    if not active_inverse:
        raise InputError("active_inverse: no element given")
    _check_elements(list(active_inverse), elements, "active_inverse")
    matrices = asi_matrices(active_inverse, n_functions=n_functions)
    with atomic_path(path, suffix=".asi") as tmp:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
            np.savez(handle, **matrices)


def active_sets_from_asi(
    asi: Mapping[str, np.ndarray], *, rtol: float = 1e-12
) -> dict[str, np.ndarray]:
    """Recover active-set rows ``A_s`` (r, D_s) from ``.asi`` pseudo-inverses.

    ``pinv(pinv(A)) = A`` (what pacemaker's ``pace_augment`` does). Rows that
    come back zero (from zero columns appended by :func:`asi_matrices`) are
    dropped.
    """
    return {element: pair[0] for element, pair in _split_asi(asi, rtol).items()}


def _split_asi(
    asi: Mapping[str, np.ndarray], rtol: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """element -> (active rows (r, D_s), matching inverse columns (D_s, r))."""
    out = {}
    for element, inverse in asi.items():
        inverse = np.asarray(inverse, dtype=np.float64)
        rows = np.linalg.pinv(inverse)
        norms = np.linalg.norm(rows, axis=1)
        keep = norms > rtol * max(float(norms.max(initial=0.0)), np.finfo(float).tiny)
        out[element] = (rows[keep], inverse[:, keep])
    return out


def estimator_from_asi(
    path: str | os.PathLike,
    *,
    elements: Sequence[str] | None = None,
    n_functions: Mapping[str, int] | None = None,
    n_features: int | None = None,
    **params: Any,
) -> Any:
    """A :class:`~mlipuq.doptimality.DOptimalityEstimator` from a pacemaker ``.asi`` file.

    The estimator keeps pacemaker's matrices as its inverses, so its gamma is
    exactly pacemaker's. Elements with fewer B-functions than ``n_features``
    (default: the largest ``D_s`` in the file, as :meth:`PaceBackend.projections`
    pads) get zero-padded rows/columns.

    Parameters
    ----------
    path : path-like
        The ``.asi`` file.
    elements, n_functions
        Checks, as in :func:`read_asi`.
    n_features : int, optional
        Feature width of the estimator (``PaceBackend.n_features``).
    **params
        Constructor parameters of ``DOptimalityEstimator`` (``threshold``, ...).
    """
    asi = read_asi(path, elements=elements, n_functions=n_functions)
    from mlipuq.doptimality import DOptimalityEstimator

    width = max(m.shape[0] for m in asi.values()) if n_features is None else int(n_features)
    if width < max(m.shape[0] for m in asi.values()):
        raise InputError(f"n_features: {width} is smaller than the .asi matrices of {path}")
    active_sets, inverses = {}, {}
    for element, (rows, inverse) in _split_asi(asi, 1e-12).items():
        d, r = inverse.shape
        active_sets[element] = np.zeros((r, width))
        active_sets[element][:, :d] = rows
        inverses[element] = np.zeros((width, r))
        inverses[element][:d] = inverse
    return DOptimalityEstimator.from_active_sets(active_sets, inverses=inverses, **params)


def write_estimator_asi(
    path: str | os.PathLike, estimator: Any, backend: PaceBackend | None = None
) -> None:
    """Write a fitted D-optimality estimator's active sets as a pacemaker ``.asi`` file.

    With ``backend``, the file is checked against and shaped for its potential
    (all of its elements, ``(D_s, D_s)`` each), so ``PyACECalculator`` accepts it.
    """
    from mlipuq.validation import check_is_fitted

    check_is_fitted(estimator, "active_inverse_")
    if backend is None:
        write_asi(path, estimator.active_inverse_)
    else:
        write_asi(
            path,
            estimator.active_inverse_,
            elements=backend.elements,
            n_functions=backend.n_functions,
        )
