"""LTAU from in-memory arrays: synthetic error trajectories -> fit -> predict.

Training atoms live in 8 descriptor clusters, each with its own difficulty (typical
force error). Two "models" are trained for 40 and 30 epochs; every epoch logs each
atom's force-error norm, which shrinks as training proceeds. LTAU turns these
trajectories into per-atom error histograms and transfers them to test atoms by
k-nearest-neighbour search. Test atoms from hard clusters should get high
uncertainty, and atoms far from every cluster a large k-NN distance.

Run: ``python examples/ltau_from_arrays.py`` (a few seconds).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from mlipuq.ltau import LTAUEstimator

rng = np.random.default_rng(0)
n_clusters, dim = 8, 16
centres = rng.normal(scale=3.0, size=(n_clusters, dim))
difficulty = np.geomspace(0.02, 0.3, n_clusters)  # typical error per cluster, eV/Å


def atoms(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors (n, dim), cluster labels and species of n atoms."""
    labels = rng.integers(n_clusters, size=n)
    descriptors = centres[labels] + 0.5 * rng.normal(size=(n, dim))
    species = np.where(labels % 2 == 0, "C", "H")
    return descriptors, labels, species


def trajectory(labels: np.ndarray, n_epochs: int) -> np.ndarray:
    """Force-error norms (n_epochs, n) in eV/Å, decaying towards each cluster's level."""
    decay = 1.0 + 4.0 * np.exp(-np.arange(n_epochs) / 8.0)
    noise = rng.gamma(4.0, 0.25, size=(n_epochs, len(labels)))
    return decay[:, None] * difficulty[labels][None, :] * noise


train_x, train_labels, train_species = atoms(5_000)
errors = [trajectory(train_labels, 40), trajectory(train_labels, 30)]

estimator = LTAUEstimator(k=5).fit_arrays(errors, train_x, train_species)
print(f"atol (final-epoch training MAE) = {estimator.atol_:.4f} eV/Å")
print(f"indices: {estimator.index_kinds_}")

test_x, test_labels, test_species = atoms(1_000)
true_error = difficulty[test_labels] * rng.gamma(4.0, 0.25, size=len(test_labels))
result = estimator.predict_arrays(test_x, test_species)

print("cluster  difficulty  mean uncertainty  mean expected error (eV/Å)")
for cluster in range(n_clusters):
    rows = test_labels == cluster
    print(f"{cluster:7d}  {difficulty[cluster]:10.3f}  {result.atom_uncertainty[rows].mean():16.3f}"
          f"  {result.extras['expected_error'][rows].mean():10.4f}")
rho = spearmanr(result.atom_uncertainty, true_error).statistic
print(f"Spearman(uncertainty, true error) = {rho:.3f}")

far = centres[0] + 8.0 * rng.normal(size=(50, dim))  # far outside every cluster
far_result = estimator.predict_arrays(far, ["C"] * 50)
print(f"mean k-NN distance: in domain {result.extras['knn_distance'].mean():.2f}, "
      f"far away {far_result.extras['knn_distance'].mean():.2f} (descriptor units)")
