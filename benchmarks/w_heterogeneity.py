"""Tungsten heterogeneity study (uq-ace paper, Fig. 7): global vs clustered D-optimality.

Training set: elastic cells (A) + BCC nanospheres (D); test sets: non-elastic (B),
period-defect (C), cluster-cluster (E). Every test configuration is out of
domain by design, so the fraction flagged (gamma_cfg > 1) is a detection rate:
higher is better. The paper found global D-optimality flags only 75.4 % of
configurations / 10 % of atoms on such a heterogeneous training set; the
clustering-enhanced variant (gamma = min over per-cluster active sets) is
meant to restore detection.

Descriptor: linear B-projections of a fixed, *unfitted* pacemaker W basis
(:data:`mlipuq.backends.pace.W_STUDY_BASIS`: rcut 5.0 Å, SBessel radial basis,
nradmax_by_orders (10, 6, 3, 2), lmax_by_orders (0, 3, 2, 1) -> 188 functions).
Linear B-projections do not depend on the fitted coefficients, so no potential
is trained (the paper used its fitted Func-945 model; no force errors here).

Run (from the repository root, ~1-2 min on one core)::

    OMP_NUM_THREADS=1 python benchmarks/w_heterogeneity.py
    OMP_NUM_THREADS=1 python benchmarks/w_heterogeneity.py --paper-size   # 30 + 30 training cfgs

Ratios are against global D-optimality measured in the same run.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlipuq.backends.pace import W_STUDY_BASIS, PaceBackend, small_test_basis
from mlipuq.clustered_doptimality import ClusteredDOptimalityEstimator
from mlipuq.doptimality import DOptimalityEstimator
from mlipuq.io import read_structures

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "w_uqace"
TRAIN_SETS = ("elastic", "sphere")
TEST_SETS = ("non-elastic", "period-defect", "cluster-cluster")
K_MEANS = 4
SEED = 0


@dataclass
class Projected:
    """B-projections of one subset, in atom-table order."""

    name: str
    features: np.ndarray
    species: np.ndarray
    config_index: np.ndarray
    n_configs: int


def project(backend: PaceBackend, name: str, frames: list) -> Projected:
    features, species, config_index = backend.projections(frames)
    return Projected(name, features, species, config_index, len(frames))


def subsample(frames: list, n: int | None, seed: int) -> list:
    """``n`` frames drawn without replacement (seeded), in file order; all if n is None."""
    if n is None or n >= len(frames):
        return frames
    chosen = np.sort(np.random.default_rng(seed).choice(len(frames), n, replace=False))
    return [frames[i] for i in chosen]


def flagged(result, n_configs: int) -> tuple[float, float]:
    """(fraction of configurations, fraction of atoms) with gamma > 1."""
    gamma_cfg = np.asarray(result.config_uncertainty)
    assert len(gamma_cfg) == n_configs
    return float(np.mean(gamma_cfg > 1.0)), float(np.mean(result.atom_uncertainty > 1.0))


def fit_estimators(train: Projected, labels: np.ndarray, k: int = K_MEANS) -> dict:
    """Global, k-means-clustered and label-clustered D-optimality on the training rows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-reduction notes for the elastic group
        return {
            "global": DOptimalityEstimator(tol=1.01).fit_arrays(train.features, train.species),
            f"kmeans k={k}": ClusteredDOptimalityEstimator(
                method="kmeans", n_clusters=k, random_state=SEED, tol=1.01
            ).fit_arrays(train.features, train.species),
            "labels": ClusteredDOptimalityEstimator(
                method="labels", small_clusters="project", tol=1.01
            ).fit_arrays(train.features, train.species, labels=labels),
        }


def load_train(backend: PaceBackend, n_per_set: int | None, seed: int) -> tuple[Projected, list]:
    """Training rows (elastic + sphere) and the per-atom config_type labels."""
    frames, labels = [], []
    for number, name in enumerate(TRAIN_SETS):
        chosen = subsample(read_structures(DATA / f"{name}.xyz"), n_per_set, seed + number)
        frames += chosen
        labels += [name] * sum(len(a) for a in chosen)
    return project(backend, "train", frames), np.asarray(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paper-size", action="store_true", help="30 + 30 training configs")
    parser.add_argument("--k", type=int, default=K_MEANS, help="k-means clusters")
    args = parser.parse_args()

    backend = PaceBackend(small_test_basis(("W",)))
    print(f"descriptor: unfitted pacemaker W basis {W_STUDY_BASIS}, D={backend.n_features}")
    train, labels = load_train(backend, 30 if args.paper_size else None, SEED)
    print(
        f"training: {train.n_configs} cfg / {len(train.species)} atoms "
        f"({'30 + 30 seeded' if args.paper_size else 'all elastic + all sphere'})"
    )
    started = time.perf_counter()
    estimators = fit_estimators(train, labels, args.k)
    print(f"fit (all three): {time.perf_counter() - started:.1f} s")
    for name, est in estimators.items():
        if name != "global":
            print(f"  {name}: groups {est.group_sizes_}")

    rows, totals = [], {name: [0, 0, 0, 0] for name in estimators}
    projection_time, grade_time = 0.0, dict.fromkeys(estimators, 0.0)
    for subset in TEST_SETS:
        frames = read_structures(DATA / f"{subset}.xyz")
        started = time.perf_counter()
        test = project(backend, subset, frames)
        projection_time += time.perf_counter() - started
        for name, est in estimators.items():
            started = time.perf_counter()
            result = est.predict_arrays(test.features, test.species, config_index=test.config_index)
            grade_time[name] += time.perf_counter() - started
            cfg, atoms = flagged(result, test.n_configs)
            rows.append((subset, test.n_configs, len(test.species), name, cfg, atoms))
            totals[name][0] += int(round(cfg * test.n_configs))
            totals[name][1] += test.n_configs
            totals[name][2] += int(np.count_nonzero(result.atom_uncertainty > 1.0))
            totals[name][3] += len(test.species)
    for name, (n_cfg, c_total, n_atoms, a_total) in totals.items():
        rows.append(("all (B+C+E)", c_total, a_total, name, n_cfg / c_total, n_atoms / a_total))

    global_by_subset = {r[0]: r for r in rows if r[3] == "global"}
    print()
    print("| test set | cfg | atoms | method | cfg flagged | atoms flagged | cfg ratio vs global |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for subset, n_cfg, n_atoms, name, cfg, atoms in rows:
        base = global_by_subset[subset][4]
        ratio = f"{cfg / base:.2f}" if base > 0 else "n/a"
        print(
            f"| {subset} | {n_cfg} | {n_atoms} | {name} | {100 * cfg:.1f} % | "
            f"{100 * atoms:.2f} % | {ratio} |"
        )
    n_test_atoms = totals["global"][3]
    print()
    print(f"cost per test atom: projections {1e6 * projection_time / n_test_atoms:.1f} us")
    for name, seconds in grade_time.items():
        print(
            f"  gamma {name}: {1e6 * seconds / n_test_atoms:.2f} us "
            f"({seconds / projection_time:.3f} x projections)"
        )


if __name__ == "__main__":
    main()
