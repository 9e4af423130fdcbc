"""Per-atom error distributions on shared bins (LTAU step 3, the reference code's form).

For every training atom i, a histogram of all its logged force errors (all epochs in
the window, all models) on bins shared by all atoms, normalised to a probability
**mass** per bin. Keeping the histograms (not only p_i at one ``atol``) lets a user
change ``atol`` or the scale factor ``s`` after the fact.

Conventions
-----------
- Bin ``b`` is ``[edges[b], edges[b+1])``; the last bin also holds ``edges[-1]``.
  Errors below ``edges[0]`` go into the first bin, errors above ``edges[-1]`` into the
  last bin (nothing is dropped, so each row sums to 1).
- :meth:`ErrorDistributions.cdf` at x is the cumulative mass of all bins left of the
  bin containing x plus that bin's mass times the fraction of the bin below x
  (linear interpolation in x). It is exact at the bin edges: ``cdf(edges[k])`` is
  the mass of bins ``0..k-1``; ``cdf(x) = 0`` for ``x <= edges[0]`` and 1 for
  ``x >= edges[-1]``.
- :meth:`ErrorDistributions.expected_error` uses the arithmetic bin midpoints
  ``(edges[b] + edges[b+1]) / 2``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlipuq.exceptions import InputError
from mlipuq.io import load_npz, save_npz
from mlipuq.trajectory_store import TrajectoryStore, Window, check_trajectories, window_slice
from mlipuq.validation import check_array

LOG_FLOOR = 1e-8  # eV/Å: lowest first edge of log-spaced bins
_ROW_BLOCK = 65_536  # rows per block in (N, B) operations, bounds temporaries


@dataclass(frozen=True)
class ErrorDistributions:
    """Histograms of per-atom errors on shared bins.

    Attributes
    ----------
    bin_edges : ndarray of float64, shape (B+1,)
        Increasing bin edges in eV/Å.
    mass : ndarray of float32, shape (N, B)
        Probability mass per bin; each row sums to 1.
    n_samples : ndarray of int64, shape (N,)
        Number of errors behind each row (epochs x models; for :meth:`mean_over`, the
        sum over the averaged rows).
    """

    bin_edges: np.ndarray
    mass: np.ndarray
    n_samples: np.ndarray

    def __post_init__(self) -> None:
        edges = check_array(self.bin_edges, "bin_edges", ndim=1)
        if len(edges) < 2 or np.any(np.diff(edges) <= 0):
            raise InputError("bin_edges: expected at least 2 strictly increasing edges")
        mass = check_array(
            self.mass, "mass", ndim=2, dtype=np.float32, allow_empty=True, finite=False
        )
        for rows in _row_blocks(len(mass)):  # blockwise: no (N, B) boolean temporary
            if not np.all(np.isfinite(mass[rows])):
                raise InputError("mass: contains NaN or infinite values")
        if mass.shape[1] != len(edges) - 1:
            raise InputError(
                f"mass: has {mass.shape[1]} bins but bin_edges define {len(edges) - 1}"
            )
        counts = check_array(self.n_samples, "n_samples", ndim=1, dtype=np.int64, allow_empty=True)
        if len(counts) != len(mass):
            raise InputError(f"n_samples: has {len(counts)} rows, mass has {len(mass)}")
        object.__setattr__(self, "bin_edges", edges)
        object.__setattr__(self, "mass", mass)
        object.__setattr__(self, "n_samples", counts)

    @property
    def n_atoms(self) -> int:
        """Number of rows N."""
        return len(self.mass)

    @property
    def n_bins(self) -> int:
        """Number of bins B."""
        return len(self.bin_edges) - 1

    @property
    def midpoints(self) -> np.ndarray:
        """Arithmetic bin midpoints in eV/Å, shape (B,)."""
        return 0.5 * (self.bin_edges[:-1] + self.bin_edges[1:])

    def cdf(self, x: float | np.ndarray) -> np.ndarray:
        """Cumulative probability mass up to ``x`` (eV/Å) for every row.

        Parameters
        ----------
        x : float or ndarray of shape (N,)
            One threshold for all rows, or one per row (e.g. ``atol + rtol * |F_ref|``
            or ``atol * s``).

        Returns
        -------
        ndarray of float64, shape (N,)
            Linear interpolation inside the bin containing x (exact at edges).
        """
        edges = self.bin_edges
        if np.ndim(x) == 0:
            value = float(check_array(x, "x", ndim=0))
            k, fraction = _bin_position(edges, np.array([value]))
            k, fraction = int(k[0]), float(fraction[0])
            out = np.empty(self.n_atoms)
            for rows in _row_blocks(self.n_atoms):
                block = self.mass[rows]
                out[rows] = block[:, :k].sum(axis=1, dtype=np.float64) + fraction * block[:, k]
            return out
        values = check_array(x, "x", ndim=1)
        if len(values) != self.n_atoms:
            raise InputError(
                f"x: has {len(values)} values but the distributions have {self.n_atoms} rows"
            )
        k, fraction = _bin_position(edges, values)
        out = np.empty(self.n_atoms)
        bins = np.arange(self.n_bins)
        for rows in _row_blocks(self.n_atoms):
            block = self.mass[rows]
            below = bins[None, :] < k[rows, None]
            inside = block[np.arange(len(block)), k[rows]]
            out[rows] = np.where(below, block, 0).sum(axis=1, dtype=np.float64) + (
                fraction[rows] * inside
            )
        return out

    def cdf_at(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """CDF of row ``rows[m]`` at ``x[m]`` for every m (same rule as :meth:`cdf`).

        Reads a cumulative-mass table (N, B+1) float32 built on first use and kept:
        O(1) per (row, x) pair instead of O(B), for the per-atom scales of LTAU.

        Parameters
        ----------
        rows : ndarray of int, shape (m,)
            Row of each pair.
        x : ndarray of float, shape (m,)
            Threshold of each pair in eV/Å.

        Returns
        -------
        ndarray of float64, shape (m,)
        """
        table = self.__dict__.get("_cumulative")
        if table is None:
            table = np.zeros((self.n_atoms, self.n_bins + 1), dtype=np.float32)
            for block in _row_blocks(self.n_atoms):
                np.cumsum(self.mass[block], axis=1, out=table[block, 1:])
            object.__setattr__(self, "_cumulative", table)
        k, fraction = _bin_position(self.bin_edges, np.asarray(x, dtype=np.float64))
        below = table[rows, k].astype(np.float64)
        return np.minimum(below + fraction * self.mass[rows, k], 1.0)

    def expected_error(self) -> np.ndarray:
        """Expected error sum_b mass_b * midpoint_b in eV/Å, float64 array of shape (N,)."""
        return self.mass @ self.midpoints

    def take(self, rows: np.ndarray | Sequence[int] | slice) -> ErrorDistributions:
        """The distributions of a subset of rows (indices, boolean mask or slice)."""
        return ErrorDistributions(self.bin_edges, self.mass[rows], self.n_samples[rows])

    def mean_over(self, neighbours: np.ndarray) -> ErrorDistributions:
        """Mean histogram over groups of rows (LTAU transfer to test atoms).

        Parameters
        ----------
        neighbours : ndarray of int, shape (n, k)
            Row indices of the k neighbours of each of n test atoms.

        Returns
        -------
        ErrorDistributions
            n rows: the mean mass over each row's neighbours; ``n_samples`` is the sum
            of the neighbours' sample counts.
        """
        index = check_array(neighbours, "neighbours", ndim=2, dtype=None)
        if not np.issubdtype(index.dtype, np.integer):
            raise InputError(f"neighbours: expected integer row indices, got {index.dtype}")
        if index.size and (index.min() < 0 or index.max() >= self.n_atoms):
            raise InputError(
                f"neighbours: row indices must lie in [0, {self.n_atoms}), got "
                f"[{index.min()}, {index.max()}]"
            )
        mass = np.empty((len(index), self.n_bins), dtype=np.float32)
        for rows in _row_blocks(len(index), max(_ROW_BLOCK // max(index.shape[1], 1), 1)):
            mass[rows] = self.mass[index[rows]].mean(axis=1, dtype=np.float64)
        return ErrorDistributions(self.bin_edges, mass, self.n_samples[index].sum(axis=1))

    def save(self, path: str | os.PathLike) -> None:
        """Save as .npz (no pickle), atomically."""
        save_npz(path, bin_edges=self.bin_edges, mass=self.mass, n_samples=self.n_samples)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ErrorDistributions:
        """Load distributions written by :meth:`save`."""
        data = load_npz(path)
        missing = {"bin_edges", "mass", "n_samples"} - set(data)
        if missing:
            raise InputError(f"{path}: not mlipuq error distributions (missing {sorted(missing)})")
        return cls(data["bin_edges"], data["mass"], data["n_samples"])


def _row_blocks(n_rows: int, size: int = _ROW_BLOCK) -> list[slice]:
    return [slice(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def _bin_position(edges: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin containing each x and the fraction of that bin below x (0 and 1 outside)."""
    n_bins = len(edges) - 1
    k = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    fraction = (x - edges[k]) / (edges[k + 1] - edges[k])
    return k, np.clip(fraction, 0.0, 1.0)


def bin_index(edges: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Bin of each error: ``b`` with ``edges[b] <= e < edges[b+1]``, clipped to [0, B-1]."""
    return np.clip(np.searchsorted(edges, errors, side="right") - 1, 0, len(edges) - 2)


def shared_bins(
    min_error: float, max_error: float, *, n_bins: int = 100, spacing: str = "log"
) -> np.ndarray:
    """Bin edges (B+1,) in eV/Å shared by all atoms.

    Parameters
    ----------
    min_error, max_error : float
        Error range in eV/Å. Log spacing starts at ``max(min_error, 1e-8)``.
    n_bins : int
        Number of bins B.
    spacing : {"log", "linear"}

    Examples
    --------
    >>> shared_bins(0.001, 1.0, n_bins=3)
    array([0.001, 0.01 , 0.1  , 1.   ])
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins: expected a positive integer, got {n_bins!r}")
    if spacing not in ("log", "linear"):
        raise InputError(f"spacing: expected 'log' or 'linear', got {spacing!r}")
    for name, value in (("min_error", min_error), ("max_error", max_error)):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"{name}: expected a finite non-negative number, got {value!r}")
    low = max(float(min_error), LOG_FLOOR) if spacing == "log" else float(min_error)
    if not max_error > low:
        raise InputError(
            f"max_error: must exceed the first edge {low:.6g} eV/Å, got {max_error:.6g}"
        )
    if spacing == "log":
        return np.geomspace(low, float(max_error), int(n_bins) + 1)
    return np.linspace(low, float(max_error), int(n_bins) + 1)


def _range_edges(low: float, high: float, n_bins: int, spacing: str) -> np.ndarray:
    """Edges for an observed error range, widened when all errors are (nearly) equal."""
    first = max(low, LOG_FLOOR) if spacing == "log" else low
    if high <= first:
        high = first * 2 if first > 0 else 1.0
    return shared_bins(low, high, n_bins=n_bins, spacing=spacing)


class _Histogram:
    """Streaming per-atom bin counts, one epoch at a time.

    Counts are accumulated in float32 (exact up to 2**24 samples per atom) and
    normalised in place, so the (N, B) counts become the mass without a second array.
    """

    def __init__(self, edges: np.ndarray, n_atoms: int, max_samples: int) -> None:
        self.edges = edges
        dtype = np.float32 if max_samples <= 2**24 else np.float64
        self.counts = np.zeros((n_atoms, len(edges) - 1), dtype=dtype)
        self.n_samples = np.zeros(n_atoms, dtype=np.int64)
        self._offsets = np.arange(n_atoms, dtype=np.int64) * (len(edges) - 1)

    def add(self, errors: np.ndarray) -> None:
        """Count one epoch of errors (N,); each (atom, bin) pair occurs once."""
        flat = bin_index(self.edges, errors)
        flat += self._offsets
        self.counts.reshape(-1)[flat] += 1  # unique flat indices: a plain fancy increment
        self.n_samples += 1

    def result(self) -> ErrorDistributions:
        if np.any(self.n_samples == 0):
            raise InputError("errors: no epochs to build distributions from")
        mass, self.counts = self.counts, None
        for rows in _row_blocks(len(mass)):
            mass[rows] /= self.n_samples[rows, None].astype(mass.dtype)
        return ErrorDistributions(
            self.edges, mass.astype(np.float32, copy=False), self.n_samples.copy()
        )


def distributions_from_store(
    store: TrajectoryStore,
    *,
    n_bins: int = 100,
    spacing: str = "log",
    bin_edges: np.ndarray | None = None,
    error_range: tuple[float, float] | None = None,
    window: Window | None = None,
    model_ids: Sequence[str] | None = None,
) -> ErrorDistributions:
    """Per-atom error histograms over all epochs of all models, built by streaming.

    A first pass over every selected epoch finds the error range (skipped when
    ``bin_edges`` or ``error_range`` is given); a second pass counts each epoch into
    an (N, B) integer array. Memory O(N x B); never an (E, N) array. Component
    stores are reduced to norms.

    Parameters
    ----------
    store : TrajectoryStore
    n_bins, spacing
        Bins for :func:`shared_bins` over the error range.
    bin_edges : ndarray (B+1,), optional
        Explicit edges in eV/Å (overrides ``n_bins``, ``spacing``, ``error_range``).
    error_range : (min, max), optional
        Error range in eV/Å instead of the first pass.
    window : (start, size), optional
        Epoch window applied to each model's logged epochs.
    model_ids : sequence of str, optional
        Models to pool (default: all in the store).

    Returns
    -------
    ErrorDistributions
        N rows, in atom-table order.
    """
    ids = store.model_ids() if model_ids is None else list(model_ids)
    if not ids:
        raise InputError(f"model_ids: the store {store.path} holds no models")
    n_epochs = 0
    for model in ids:
        logged = store.epochs(model)
        if len(logged) == 0:
            raise InputError(f"model {model!r}: no epochs logged in {store.path}")
        n_epochs += len(logged[window_slice(len(logged), window)])
    if bin_edges is not None:
        edges = check_array(bin_edges, "bin_edges", ndim=1)
    else:
        if error_range is None:
            low, high = np.inf, -np.inf
            for model in ids:
                for _, errors in store.iter_epochs(model, window=window, norm=True):
                    low, high = min(low, float(errors.min())), max(high, float(errors.max()))
        else:
            low, high = error_range
        edges = _range_edges(low, high, n_bins, spacing)
    histogram = _Histogram(edges, store.n_atoms, n_epochs)
    for model in ids:
        for _, errors in store.iter_epochs(model, window=window, norm=True):
            histogram.add(errors)
    return histogram.result()


def distributions_from_errors(
    errors: np.ndarray | Sequence[np.ndarray],
    *,
    n_bins: int = 100,
    spacing: str = "log",
    bin_edges: np.ndarray | None = None,
    window: Window | None = None,
) -> ErrorDistributions:
    """Per-atom error histograms from in-memory trajectories.

    Parameters
    ----------
    errors : ndarray (E, N) or sequence of ndarray (E_m, N)
        Force-error norms in eV/Å of one or several models.
    n_bins, spacing, bin_edges
        As in :func:`distributions_from_store`; the range is the min/max of the errors.
    window : (start, size), optional
        Epoch window applied to each trajectory.
    """
    arrays = check_trajectories(errors, window)
    n_atoms = arrays[0].shape[1]
    if bin_edges is not None:
        edges = check_array(bin_edges, "bin_edges", ndim=1)
    else:
        low = min(float(a.min()) for a in arrays)
        high = max(float(a.max()) for a in arrays)
        edges = _range_edges(low, high, n_bins, spacing)
    histogram = _Histogram(edges, n_atoms, sum(len(a) for a in arrays))
    for array in arrays:
        for row in array:
            histogram.add(row)
    return histogram.result()
