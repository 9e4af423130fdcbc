"""MD and relaxations with per-step uncertainty logging and stop rules (docs/methods.md).

:func:`run_simulation` drives an ASE dynamics (Langevin or velocity Verlet MD, BFGS
or FIRE relaxation) with ANY ASE calculator whose ``results`` hold per-atom arrays
named ``*_uncertainty`` (shape (n_atoms,)): the mlipuq NequIP calculator, a
:class:`~mlipuq.descriptors.DescriptorUQCalculator`, or a user's own.

Every frame (step 0 included) is

- appended to an extxyz file (positions, cell, energy, forces, momenta and every
  per-atom array of the calculator that is not a standard ASE property, e.g.
  ``doptimality_uncertainty``): OVITO reads the columns as particle properties;
- summarised as one CSV row: ``step, time_fs, energy_eV, fmax_eV_per_A`` and
  ``max_<key>``, ``mean_<key>`` for every uncertainty key (over the atoms of
  ``atoms_mask``).

Write strategy: both files are opened once (truncated), each frame is formatted in
memory and written with ONE ``write`` call, then flushed and fsync-ed, so a crash or
a kill leaves a file of complete frames (at most the frame being written is lost).

Stop rule: with ``stop_on="<key>"`` and ``stop_threshold=t``, the per-frame
aggregate (``aggregate="max"`` or ``"mean"`` over the masked atoms) is compared with
t. ``stop_mode="stop"`` ends the run at the FIRST frame whose aggregate exceeds t
(that frame is logged); ``stop_mode="snapshot"`` appends every such frame to a
separate snapshot extxyz and carries on (as pacemaker's / MACE's active-learning MD
collects extrapolative structures). With ``break_threshold=b`` (> t) a snapshot run
also ends at the first frame above b (saved as a snapshot too): the two-level rule
of MLIP-3 (``select:threshold`` ~2, ``threshold-break`` ~10) and of pacemaker's
LAMMPS recipe (dump above gamma 5, halt above 25), which collects the frames between
"worth labelling" and "the dynamics can no longer be trusted". With
``min_steps=m`` the rule applies from step m on (FLARE's ``min_steps_with_model``):
the frames before are logged with their uncertainty but can neither stop the run nor
be snapshots, so that MD heated to a new temperature reaches it before the threshold
can end the run.

Without ``stop_threshold`` the rule uses the threshold the estimator fitted on
in-domain held-out data (the calculator's ``<name>_threshold``, e.g. LTAU after
``mlipuq fit`` calibrated it on the validation frames), compared with the aggregate
it was fitted on (``<name>_threshold_aggregate``: the mean over the atoms for LTAU,
the max otherwise); ``aggregate=None`` takes that one, another is refused.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipuq.exceptions import InputError

UNCERTAINTY_SUFFIX = "_uncertainty"
DISTANCE_SUFFIX = "_knn_distance_normalised"
"""Per-atom out-of-domain scores (LTAU's normalised k-NN distance) logged like uncertainties."""
KINDS = ("md", "relax")
THERMOSTATS = ("langevin", "nve")
OPTIMIZERS = ("bfgs", "fire")
AGGREGATES = ("max", "mean")
STOP_MODES = ("stop", "snapshot")
# extxyz / ASE names that per-atom arrays must not overwrite
_RESERVED = {"positions", "numbers", "momenta", "masses", "forces", "energies", "species"}
_RESERVED |= {"pos", "Z", "charges", "magmoms", "initial_magmoms", "initial_charges"}


@dataclass
class SimulationLog:
    """What :func:`run_simulation` recorded.

    Attributes
    ----------
    kind : str
        ``"md"`` or ``"relax"``.
    steps : ndarray of int, shape (F,)
        Dynamics step of each logged frame (0 = start).
    times_fs : ndarray of float, shape (F,)
        Simulation time in fs (MD) or NaN (relaxation).
    energies : ndarray of float, shape (F,)
        Potential energy in eV.
    fmax : ndarray of float, shape (F,)
        Largest atomic force norm in eV/Å.
    uncertainty_max, uncertainty_mean : dict of str -> ndarray, shape (F,)
        Per frame, max / mean over the masked atoms of each ``*_uncertainty`` key (and
        of each ``*_knn_distance_normalised`` out-of-domain score).
    aggregate : str
        Which of the two is "the" per-frame uncertainty (stop rule, summary).
    stopped : bool
        True if the stop rule ended the run early.
    stop_step : int or None
        Step of the first frame above the threshold (``stop`` mode) or above
        ``break_threshold`` (``snapshot`` mode), or None.
    stop_on, stop_threshold, break_threshold : str / float or None
        The stop rule as run.
    min_steps : int
        First step at which the stop rule applies.
    snapshot_steps : list of int
        Steps of frames above the threshold (both modes; saved in snapshot mode).
    converged : bool
        Relaxation reached ``fmax`` (always False for MD).
    log_path, table_path, snapshot_path : Path or None
        Files written.
    """

    kind: str
    steps: np.ndarray
    times_fs: np.ndarray
    energies: np.ndarray
    fmax: np.ndarray
    uncertainty_max: dict[str, np.ndarray]
    uncertainty_mean: dict[str, np.ndarray]
    aggregate: str = "max"
    stopped: bool = False
    stop_step: int | None = None
    stop_on: str | None = None
    stop_threshold: float | None = None
    threshold_source: str | None = None
    break_threshold: float | None = None
    min_steps: int = 0
    snapshot_steps: list[int] = field(default_factory=list)
    converged: bool = False
    log_path: Path | None = None
    table_path: Path | None = None
    snapshot_path: Path | None = None

    @property
    def n_frames(self) -> int:
        """Number of logged frames F."""
        return len(self.steps)

    def uncertainty(self, key: str) -> np.ndarray:
        """The aggregated per-frame uncertainty (F,) of ``key`` (``aggregate`` applied)."""
        table = self.uncertainty_max if self.aggregate == "max" else self.uncertainty_mean
        if key not in table:
            raise InputError(f"key: {key!r} not logged; available {sorted(table)}")
        return table[key]


def summarise(log: SimulationLog) -> dict:
    """Trajectory summary: initial, final, max and mean of each aggregated uncertainty.

    In the LTAU paper the initial and maximum UQ of a relaxation predicted its final
    error; the final and mean did not.

    Returns
    -------
    dict
        ``{"n_frames", "kind", "aggregate", "stopped", "stop_step", "converged",
        "uncertainty": {key: {"initial", "final", "max", "mean", "argmax_step"}}}``.
    """
    table = log.uncertainty_max if log.aggregate == "max" else log.uncertainty_mean
    stats = {}
    for key, values in table.items():
        stats[key] = {
            "initial": float(values[0]),
            "final": float(values[-1]),
            "max": float(values.max()),
            "mean": float(values.mean()),
            "argmax_step": int(log.steps[int(np.argmax(values))]),
        }
    return {
        "kind": log.kind,
        "n_frames": log.n_frames,
        "aggregate": log.aggregate,
        "stopped": log.stopped,
        "stop_on": log.stop_on,
        "stop_threshold": log.stop_threshold,
        "threshold_source": log.threshold_source,
        "break_threshold": log.break_threshold,
        "min_steps": log.min_steps,
        "stop_step": log.stop_step,
        "n_snapshots": len(log.snapshot_steps),
        "converged": log.converged,
        "uncertainty": stats,
    }


def check_stop_threshold(
    key: str | None, threshold: float | None, name: str = "threshold"
) -> float | None:
    """Validate a stop/selection threshold for the uncertainty ``key``.

    Uncertainties are non-negative, so the threshold must be a finite number >= 0,
    and within the ``bounds`` of the registered method the key names
    (``{method}_uncertainty``; LTAU's 1 - p is in [0, 1]). ``name`` is the field the
    error messages name.
    """
    if key is None:
        if threshold is not None:
            raise InputError("stop_threshold: given without stop_on (which uncertainty?)")
        return None
    if threshold is None:
        return None  # the estimator's fitted threshold, resolved at the first frame
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a number, got {threshold!r}") from None
    if not np.isfinite(value) or value < 0:
        raise InputError(f"{name}: expected a finite number >= 0, got {threshold!r}")
    upper = upper_bound(key)
    if upper is not None and value > upper:
        raise InputError(f"{name}: {key} is in [0, {upper:g}], got threshold {value:g}")
    return value


def upper_bound(key: str) -> float | None:
    """Upper bound of ``{method}_uncertainty`` (or its ``_max`` / ``_mean`` summaries)
    from its registered method's ``bounds``; None for other keys or no bound."""
    from mlipuq.registry import method_class, method_names

    for method in method_names():
        if key in {f"{method}{UNCERTAINTY_SUFFIX}{tail}" for tail in ("", "_max", "_mean")}:
            return method_class(method).bounds[1]
    return None


def run_simulation(
    atoms: Atoms,
    calculator: object,
    *,
    kind: str = "md",
    steps: int = 100,
    temperature_K: float = 300.0,
    timestep_fs: float = 0.5,
    thermostat: str = "langevin",
    friction_per_fs: float = 0.01,
    set_velocities: bool = True,
    optimizer: str = "bfgs",
    fmax: float = 0.05,
    seed: int = 0,
    log_path: str | os.PathLike | None = None,
    table_path: str | os.PathLike | None = None,
    snapshot_path: str | os.PathLike | None = None,
    stop_on: str | None = None,
    stop_threshold: float | None = None,
    stop_mode: str = "stop",
    break_threshold: float | None = None,
    min_steps: int = 0,
    aggregate: str | None = None,
    atoms_mask: np.ndarray | Sequence[int] | None = None,
) -> SimulationLog:
    """Run MD or a relaxation and log the per-atom uncertainty of every frame.

    Parameters
    ----------
    atoms : ase.Atoms
        Start structure (copied; the input is not modified).
    calculator : ase Calculator
        Any calculator whose ``results`` contain per-atom ``*_uncertainty`` arrays.
    kind : {"md", "relax"}
        Molecular dynamics or geometry optimisation.
    steps : int
        Number of MD steps / maximum number of optimiser steps.
    temperature_K : float
        MD temperature in K (initial Maxwell-Boltzmann velocities and Langevin bath).
    timestep_fs : float
        MD time step in fs.
    thermostat : {"langevin", "nve"}
        Langevin (NVT) or velocity Verlet (NVE).
    friction_per_fs : float
        Langevin friction in 1/fs.
    set_velocities : bool
        Draw Maxwell-Boltzmann velocities at ``temperature_K`` (seeded, zero total
        momentum); False keeps the momenta the atoms carry.
    optimizer : {"bfgs", "fire"}
        Relaxation algorithm.
    fmax : float
        Relaxation convergence: largest force norm in eV/Å.
    seed : int
        Seed of the velocity draw and the Langevin noise.
    log_path : path-like, optional
        Trajectory extxyz (one frame per step, every per-atom array).
    table_path : path-like, optional
        Per-frame CSV table.
    snapshot_path : path-like, optional
        Extxyz for frames above the threshold in snapshot mode (default:
        ``<log_path stem>_snapshots.extxyz``).
    stop_on : str, optional
        Uncertainty key of the stop rule, e.g. ``"doptimality_uncertainty"``.
    stop_threshold : float, optional
        Threshold in the key's unit (>= 0; <= 1 for LTAU keys). None with ``stop_on``:
        the estimator's fitted threshold (``<name>_threshold`` of the calculator).
    stop_mode : {"stop", "snapshot"}
        Stop at the first crossing, or save crossing frames and continue.
    break_threshold : float, optional
        Snapshot mode only: also stop at the first frame above this value
        (> ``stop_threshold``, same unit); that frame is saved as a snapshot too.
    min_steps : int
        The stop rule applies to frames of step >= ``min_steps`` only (0 <= min_steps
        <= steps, with ``stop_on``); earlier frames are logged, never stop the run.
    aggregate : {"max", "mean"}, optional
        Per-frame aggregate over the masked atoms used for the stop rule and summary.
        None: the aggregate of the fitted threshold when it is used, else "max".
    atoms_mask : array of bool (n_atoms,) or of int indices, optional
        Atoms over which frames are aggregated (default all).

    Returns
    -------
    SimulationLog

    Raises
    ------
    InputError
        Bad option, threshold out of range, a calculator without ``*_uncertainty``
        arrays or without the ``stop_on`` key.
    """
    _check_choice(kind, KINDS, "kind")
    if aggregate is not None:
        _check_choice(aggregate, AGGREGATES, "aggregate")
    _check_choice(stop_mode, STOP_MODES, "stop_mode")
    if int(steps) < 0:
        raise InputError(f"steps: expected >= 0, got {steps!r}")
    stop_threshold = check_stop_threshold(stop_on, stop_threshold)
    break_threshold = check_break_threshold(stop_on, stop_threshold, break_threshold, stop_mode)
    min_steps = check_min_steps(stop_on, min_steps, steps)
    if stop_on is not None and not stop_on.endswith(UNCERTAINTY_SUFFIX):
        stop_on = stop_on + UNCERTAINTY_SUFFIX
    if len(atoms) == 0:
        raise InputError("atoms: the start structure has no atoms")
    check_start_structure(atoms)
    mask = _atom_mask(atoms_mask, len(atoms))

    work = atoms.copy()
    work.calc = calculator
    source = None if stop_threshold is None else "given"
    if stop_on is not None and stop_threshold is None:  # before anything is written
        if atoms_mask is not None and not mask.all():
            raise InputError("stop_threshold: required with atoms_mask: the fitted threshold "
                             "is for whole configurations")
        work.get_forces()  # the start frame's results (reused by the dynamics)
        given = sorted(k for k, v in work.calc.results.items()
                       if k.endswith(UNCERTAINTY_SUFFIX) and np.ndim(v) == 1)
        if stop_on not in given:
            raise InputError(f"stop_on: the calculator gives no {stop_on!r}; it gives {given}")
        stop_threshold, fitted_on = _fitted_threshold(work.calc, stop_on, aggregate)
        aggregate, source = fitted_on, "fitted"
    dyn = _make_dynamics(
        work, kind, temperature_K=temperature_K, timestep_fs=timestep_fs,
        thermostat=thermostat, friction_per_fs=friction_per_fs,
        set_velocities=set_velocities, optimizer=optimizer, seed=seed,
    )
    if snapshot_path is None and log_path is not None and stop_mode == "snapshot":
        log_path_ = Path(log_path)
        snapshot_path = log_path_.with_name(f"{log_path_.stem}_snapshots.extxyz")
    logger = _FrameLogger(
        kind=kind, timestep_fs=timestep_fs, mask=mask, log_path=log_path,
        table_path=table_path, snapshot_path=snapshot_path if stop_mode == "snapshot" else None,
    )
    log = SimulationLog(
        kind=kind, steps=np.zeros(0, int), times_fs=np.zeros(0), energies=np.zeros(0),
        fmax=np.zeros(0), uncertainty_max={}, uncertainty_mean={},
        aggregate=aggregate or "max",
        stop_on=stop_on, stop_threshold=stop_threshold, break_threshold=break_threshold,
        threshold_source=source,
        min_steps=min_steps, log_path=Path(log_path) if log_path is not None else None,
        table_path=Path(table_path) if table_path is not None else None,
        snapshot_path=Path(snapshot_path) if snapshot_path and stop_mode == "snapshot" else None,
    )
    run = dyn.irun(fmax=fmax, steps=int(steps)) if kind == "relax" else dyn.irun(steps=int(steps))
    from mlipuq.log import progress_bar

    bar = progress_bar(run, total=int(steps) + 1, desc=kind, unit="step")
    try:
        for converged in bar:
            row = logger.record(work, int(dyn.nsteps))
            log.converged = bool(converged) and kind == "relax"
            if stop_on is None or dyn.nsteps < min_steps:
                continue
            if stop_on not in row["max"]:
                raise InputError(
                    f"stop_on: the calculator gives no {stop_on!r}; it gives "
                    f"{sorted(row['max'])}"
                )
            value = row[log.aggregate][stop_on]
            if value > stop_threshold:
                log.snapshot_steps.append(int(dyn.nsteps))
                if stop_mode == "snapshot":
                    logger.snapshot(work)
                if stop_mode == "stop" or (break_threshold is not None
                                           and value > break_threshold):
                    log.stopped, log.stop_step = True, int(dyn.nsteps)
                    break
    finally:
        bar.close()
        logger.close()
    logger.commit()
    logger.fill(log)
    return log


def _fitted_threshold(calculator: object, key: str, aggregate: str | None) -> tuple:
    """(threshold, aggregate) the calculator reports for uncertainty ``key``.

    The threshold was fitted on the estimator's own configuration aggregate
    (``<name>_threshold_aggregate``: "mean" for LTAU, "max" otherwise); an explicit
    other ``aggregate`` is refused.
    """
    name = key[: -len(UNCERTAINTY_SUFFIX)]
    results = getattr(calculator, "results", {})
    value = results.get(f"{name}_threshold")
    if value is None:
        raise InputError(
            f"stop_threshold: required with stop_on={key!r}: the {name} estimator has no "
            "fitted threshold (calibrate it: 'mlipuq fit --run RUN' with validation frames, "
            "or give --stop-threshold)"
        )
    fitted_on = str(results.get(f"{name}_threshold_aggregate", "max"))
    if aggregate is not None and aggregate != fitted_on:
        raise InputError(
            f"stop_threshold: the fitted {name} threshold is on the {fitted_on} over the "
            f"atoms; give --stop-threshold with aggregate={aggregate!r}"
        )
    return float(value), fitted_on


def check_break_threshold(
    key: str | None, threshold: float | None, break_threshold: float | None, mode: str
) -> float | None:
    """Validate the break threshold of a snapshot run: a number above ``threshold``."""
    if break_threshold is None:
        return None
    if mode != "snapshot":
        raise InputError(f"break_threshold: only with stop_mode='snapshot', got {mode!r}")
    if key is None:
        raise InputError("break_threshold: given without stop_on (which uncertainty?)")
    value = check_stop_threshold(key, break_threshold, name="break_threshold")
    if threshold is None:
        raise InputError("break_threshold: needs an explicit stop_threshold below it")
    if value <= threshold:
        raise InputError(
            f"break_threshold: expected > stop_threshold ({threshold}), got {break_threshold!r}"
        )
    return value


MIN_DISTANCE_A = 0.1
"""Closest approach of two atoms (Å) below which a start structure is refused."""


def check_start_structure(atoms: Atoms, name: str = "atoms") -> None:
    """Refuse a start structure with NaN/inf positions or overlapping atoms.

    Two atoms closer than :data:`MIN_DISTANCE_A` (periodic images included) make
    force fields blow up or neighbour searches hang; the message names the pair.
    """
    from ase.neighborlist import neighbor_list

    positions = atoms.get_positions()
    bad = ~np.isfinite(positions).all(axis=1)
    if np.any(bad):
        raise InputError(f"{name}: atom {int(np.flatnonzero(bad)[0])} of the start structure "
                         "has a NaN or infinite position")
    first, second, distance = neighbor_list("ijd", atoms, MIN_DISTANCE_A)
    if len(first):
        raise InputError(
            f"{name}: atoms {int(first[0])} and {int(second[0])} of the start structure are "
            f"{distance[0]:.3g} Å apart (overlapping; at least {MIN_DISTANCE_A} Å expected)"
        )


def check_min_steps(key: str | None, min_steps: int, steps: int) -> int:
    """Validate the first step of the stop rule: an integer in [0, steps], with a rule."""
    if isinstance(min_steps, bool) or not isinstance(min_steps, (int, np.integer)):
        raise InputError(f"min_steps: expected an integer, got {min_steps!r}")
    if not 0 <= int(min_steps) <= int(steps):
        raise InputError(f"min_steps: expected 0 <= min_steps <= steps ({steps}), "
                         f"got {min_steps}")
    if min_steps and key is None:
        raise InputError("min_steps: given without stop_on (which uncertainty?)")
    return int(min_steps)


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise InputError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def _atom_mask(atoms_mask: np.ndarray | Sequence[int] | None, n_atoms: int) -> np.ndarray:
    if atoms_mask is None:
        return np.ones(n_atoms, dtype=bool)
    array = np.asarray(atoms_mask)
    if array.dtype == bool:
        if array.shape != (n_atoms,):
            raise InputError(f"atoms_mask: expected {n_atoms} booleans, got shape {array.shape}")
        mask = array.copy()
    else:
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError("atoms_mask: expected booleans (n_atoms,) or integer atom indices")
        if array.size and (array.min() < -n_atoms or array.max() >= n_atoms):
            raise InputError(f"atoms_mask: index out of range for {n_atoms} atoms")
        mask = np.zeros(n_atoms, dtype=bool)
        mask[array] = True
    if not mask.any():
        raise InputError("atoms_mask: selects no atoms")
    return mask


def _make_dynamics(
    atoms: Atoms,
    kind: str,
    *,
    temperature_K: float,
    timestep_fs: float,
    thermostat: str,
    friction_per_fs: float,
    set_velocities: bool,
    optimizer: str,
    seed: int,
) -> object:
    from ase import units

    if kind == "relax":
        _check_choice(optimizer, OPTIMIZERS, "optimizer")
        from ase.optimize import BFGS, FIRE

        return (BFGS if optimizer == "bfgs" else FIRE)(atoms, logfile=None)
    _check_choice(thermostat, THERMOSTATS, "thermostat")
    for name, value in (("timestep_fs", timestep_fs), ("temperature_K", temperature_K)):
        if not np.isfinite(value) or value < 0 or (name == "timestep_fs" and value == 0):
            raise InputError(f"{name}: expected a finite positive number, got {value!r}")
    from ase.md import velocitydistribution
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    rng = np.random.default_rng(seed)
    if set_velocities:
        # thermalize_momenta is ASE >= 3.29's name of MaxwellBoltzmannDistribution
        thermalize = getattr(velocitydistribution, "thermalize_momenta", None)
        thermalize = thermalize or velocitydistribution.MaxwellBoltzmannDistribution
        thermalize(atoms, temperature_K=temperature_K, rng=rng)
        velocitydistribution.Stationary(atoms)
    timestep = timestep_fs * units.fs
    if thermostat == "nve":
        return VelocityVerlet(atoms, timestep=timestep, logfile=None)
    if not np.isfinite(friction_per_fs) or friction_per_fs < 0:
        raise InputError(f"friction_per_fs: expected >= 0, got {friction_per_fs!r}")
    return Langevin(
        atoms, timestep=timestep, temperature_K=temperature_K,
        friction=friction_per_fs / units.fs, fixcm=False, rng=rng, logfile=None,
    )


class _FrameLogger:
    """Writes frames (extxyz) and table rows (CSV) as they come, flushed per frame.

    Each file is written as ``<name>.partial`` (readable while the run goes on) and
    renamed onto ``<name>`` when the run ends (:meth:`commit`): an interrupted run
    leaves the previous output untouched and its frames so far in the ``.partial``
    files, which the next run with the same output overwrites.
    """

    def __init__(
        self,
        *,
        kind: str,
        timestep_fs: float,
        mask: np.ndarray,
        log_path: str | os.PathLike | None,
        table_path: str | os.PathLike | None,
        snapshot_path: str | os.PathLike | None,
    ) -> None:
        self.kind, self.timestep_fs, self.mask = kind, timestep_fs, mask
        self.rows: list[dict] = []
        self.keys: list[str] | None = None
        self.paths = (log_path, table_path, snapshot_path)
        self.traj = self.table = self.snapshots = None  # opened at the first valid frame
        self.frame: Atoms | None = None

    def record(self, atoms: Atoms, step: int) -> dict:
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces())
        results = atoms.calc.results
        per_atom = _per_atom_arrays(results, len(atoms))
        keys = sorted(k for k in per_atom if k.endswith(UNCERTAINTY_SUFFIX))
        if keys:  # out-of-domain scores are logged beside the uncertainties
            keys += sorted(k for k in per_atom if k.endswith(DISTANCE_SUFFIX))
        if self.keys is None:
            if not keys:
                raise InputError(
                    "calculator: its results hold no per-atom '*_uncertainty' array "
                    f"(keys: {sorted(results)})"
                )
            self.keys = keys
            try:
                self.traj, self.table, self.snapshots = (_open(p) for p in self.paths)
            except OSError:
                self.close()
                self._remove_partials()
                raise
        elif keys != self.keys:
            raise InputError(f"calculator: uncertainty keys changed from {self.keys} to {keys}")
        row = {
            "step": step,
            "time_fs": step * self.timestep_fs if self.kind == "md" else float("nan"),
            "energy": energy,
            "fmax": float(np.sqrt((forces**2).sum(axis=1)).max()),
            "max": {k: float(per_atom[k][self.mask].max()) for k in keys},
            "mean": {k: float(per_atom[k][self.mask].mean()) for k in keys},
        }
        self.rows.append(row)
        self.frame = _frame(atoms, energy, forces, results, per_atom, step)
        _append(self.traj, _extxyz_text(self.frame))
        if self.table is not None:
            _append(self.table, _csv_text(row, keys, header=len(self.rows) == 1))
        return row

    def snapshot(self, atoms: Atoms) -> None:
        if self.snapshots is not None and self.frame is not None:
            _append(self.snapshots, _extxyz_text(self.frame))

    def close(self) -> None:
        for handle in (self.traj, self.table, self.snapshots):
            if handle is not None and not handle.closed:
                handle.close()

    def commit(self) -> None:
        """Rename every ``.partial`` file onto its output (after :meth:`close`)."""
        for path in self.paths:
            if path is not None and _partial(path).exists():
                os.replace(_partial(path), path)

    def _remove_partials(self) -> None:
        for path in self.paths:
            if path is not None:
                _partial(path).unlink(missing_ok=True)

    def fill(self, log: SimulationLog) -> None:
        rows, keys = self.rows, self.keys or []
        log.steps = np.array([r["step"] for r in rows], dtype=np.int64)
        log.times_fs = np.array([r["time_fs"] for r in rows], dtype=float)
        log.energies = np.array([r["energy"] for r in rows], dtype=float)
        log.fmax = np.array([r["fmax"] for r in rows], dtype=float)
        log.uncertainty_max = {k: np.array([r["max"][k] for r in rows]) for k in keys}
        log.uncertainty_mean = {k: np.array([r["mean"][k] for r in rows]) for k in keys}


def _partial(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.partial")


def _open(path: str | os.PathLike | None) -> io.TextIOBase | None:
    if path is None:
        return None
    path = _partial(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by _FrameLogger.close


def _append(handle: io.TextIOBase | None, text: str) -> None:
    if handle is None:
        return
    handle.write(text)
    handle.flush()
    os.fsync(handle.fileno())


def _per_atom_arrays(results: dict, n_atoms: int) -> dict[str, np.ndarray]:
    from ase.calculators.calculator import all_properties

    arrays = {}
    for key, value in results.items():
        if key in all_properties or key in _RESERVED:
            continue
        array = np.asarray(value)
        if array.ndim >= 1 and array.shape[0] == n_atoms and array.dtype.kind in "biuf":
            arrays[key] = array
    return arrays


def _frame(
    atoms: Atoms,
    energy: float,
    forces: np.ndarray,
    results: dict,
    per_atom: dict[str, np.ndarray],
    step: int,
) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    for key, values in per_atom.items():
        frame.arrays[key] = np.array(values, copy=True)
    frame.info["step"] = step
    for key, value in results.items():  # fitted thresholds travel with the frames
        if key.endswith("_threshold") and np.ndim(value) == 0:
            frame.info[key] = float(value)
        elif key.endswith("_threshold_aggregate"):
            frame.info[key] = str(value)
    extra = {k: results[k] for k in ("stress", "energies", "free_energy") if k in results}
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=np.copy(forces), **extra)
    return frame


def _extxyz_text(frame: Atoms) -> str:
    from ase.io import write

    buffer = io.StringIO()
    write(buffer, frame, format="extxyz")
    return buffer.getvalue()


def _csv_text(row: dict, keys: list[str], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        columns = ["step", "time_fs", "energy_eV", "fmax_eV_per_A"]
        for key in keys:
            columns += [f"max_{key}", f"mean_{key}"]
        writer.writerow(columns)
    values = [row["step"], _fmt(row["time_fs"]), _fmt(row["energy"]), _fmt(row["fmax"])]
    for key in keys:
        values += [_fmt(row["max"][key]), _fmt(row["mean"][key])]
    writer.writerow(values)
    return buffer.getvalue()


def _fmt(value: float) -> str:
    return repr(float(value))
