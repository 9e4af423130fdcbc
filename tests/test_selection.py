"""Active-learning selection: thresholds, budget, MaxVol / k-means diversity, environments."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from mlipuq.cli import main
from mlipuq.exceptions import InputError
from mlipuq.selection import (
    cut_environment,
    select_configurations,
    select_environments,
    share_budget,
    write_selection,
)


def _abs_det(rows):
    return abs(np.linalg.det(np.asarray(rows)))


# --------------------------------------------------------------------------- configurations


def test_threshold_and_budget_pick_the_most_uncertain(rng):
    u = rng.uniform(0, 10, 50)
    sel = select_configurations(u, threshold=6.0, budget=5)
    above = np.flatnonzero(u > 6.0)
    expected = above[np.argsort(-u[above])][:5]
    assert sel.indices.tolist() == expected.tolist()
    assert len(sel.table) == len(above)
    assert [row["rank"] for row in sel.table] == list(range(1, len(above) + 1))
    assert sorted(r["index"] for r in sel.table if r["selected"]) == sorted(expected.tolist())
    assert all(r["uncertainty"] > 6.0 for r in sel.table)


def test_fewer_candidates_than_budget_selects_all_above():
    sel = select_configurations(np.array([0.5, 3.0, 0.1, 2.5]), threshold=1.0, budget=3)
    assert sel.indices.tolist() == [1, 3]


@pytest.mark.parametrize("diversity", [None, "maxvol", "cluster"])
@pytest.mark.parametrize("per_atom", [False, True])
def test_budget_respected_and_no_repeats(rng, diversity, per_atom):
    n_cfg = 40
    u = rng.uniform(0, 10, n_cfg)
    if per_atom:
        sizes = rng.integers(2, 6, n_cfg)
        config_index = np.repeat(np.arange(n_cfg), sizes)
        features = rng.normal(size=(len(config_index), 4))
    else:
        config_index, features = None, rng.normal(size=(n_cfg, 4))
    for budget in (1, 3, 12):
        sel = select_configurations(u, threshold=2.0, budget=budget, features=features,
                                    config_index=config_index, diversity=diversity, seed=1)
        assert len(sel.indices) == min(budget, int(np.sum(u > 2.0)))
        assert len(set(sel.indices.tolist())) == len(sel.indices)
        assert np.all(u[sel.indices] > 2.0)
        assert sum(r["selected"] for r in sel.table) == len(sel.indices)


@pytest.mark.parametrize(
    ("budget", "available", "expected"),
    [(6, [10, 10, 10], [2, 2, 2]), (7, [10, 1, 10], [3, 1, 3]), (5, [0, 2, 9], [0, 2, 3]),
     (9, [1, 2, 3], [1, 2, 3]), (1, [4, 4], [1, 0])],
)
def test_share_budget_round_robin(budget, available, expected):
    quota = share_budget(budget, available)
    assert quota.tolist() == expected
    assert np.all(quota <= np.asarray(available))


@pytest.mark.parametrize("diversity", [None, "maxvol"])
def test_per_group_budget_takes_the_top_of_every_group(rng, diversity):
    groups = np.repeat(["hot", "surface", "particle"], [20, 20, 20])
    u = rng.uniform(0, 1, 60) + np.repeat([5.0, 0.0, 2.0], 20)  # "hot" dominates overall
    features = rng.normal(size=(60, 3))
    sel = select_configurations(u, threshold=0.0, budget=7, groups=groups, features=features,
                                diversity=diversity, seed=0)
    picked = groups[sel.indices]
    assert len(sel.indices) == 7 and len(set(sel.indices.tolist())) == 7
    counts = {name: int(np.sum(picked == name)) for name in ("hot", "surface", "particle")}
    assert counts == {"hot": 3, "surface": 2, "particle": 2}  # remainder: most uncertain group
    if diversity is None:
        for name in counts:
            members = np.flatnonzero(groups == name)
            top = members[np.argsort(-u[members])][: counts[name]]
            assert sorted(sel.indices[picked == name].tolist()) == sorted(top.tolist())
    assert [row["rank"] for row in sel.table] == list(range(1, 61))
    assert all(row["criterion"].startswith("group ") for row in sel.table)
    assert sum(row["selected"] for row in sel.table) == 7


def test_per_group_budget_moves_to_groups_with_candidates():
    u = np.array([0.9, 0.8, 0.7, 0.95, 0.1, 0.2])
    groups = ["a", "a", "a", "b", "b", "b"]
    sel = select_configurations(u, threshold=0.5, budget=4, groups=groups)
    assert sorted(sel.indices.tolist()) == [0, 1, 2, 3]
    with pytest.raises(InputError, match=r"groups: expected one label per configuration \(6\)"):
        select_configurations(u, threshold=0.5, budget=2, groups=["a", "b"])


def test_maxvol_picks_the_largest_volume_pair():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 0.1]])
    u = np.array([5.0, 1.0, 6.0, 2.0])  # by uncertainty alone: 2 and 0
    sel = select_configurations(u, threshold=0.0, budget=2, features=rows, diversity="maxvol")
    best = max(itertools.combinations(range(4), 2), key=lambda pair: _abs_det(rows[list(pair)]))
    assert sorted(sel.indices.tolist()) == sorted(best) == [1, 3]
    assert "MaxVol round 1" in next(r for r in sel.table if r["index"] == 3)["criterion"]


def test_maxvol_choice_is_locally_volume_maximal(rng):
    rows = rng.normal(size=(25, 3))
    u = rng.uniform(1, 2, 25)
    sel = select_configurations(u, threshold=0.0, budget=3, features=rows, diversity="maxvol")
    picked = list(sel.indices)
    volume = _abs_det(rows[picked])
    for slot in range(3):
        for other in set(range(25)) - set(picked):
            swapped = picked.copy()
            swapped[slot] = other
            assert _abs_det(rows[swapped]) <= 1.01 * volume + 1e-12


def _best_extension(active, candidates, exclude=()):
    """Brute force: candidate whose best single swap into ``active`` gives the largest |det|."""
    best, best_volume, best_active = None, -1.0, None
    for c, row in enumerate(candidates):
        if c in exclude:
            continue
        for slot in range(len(active)):
            trial = active.copy()
            trial[slot] = row
            if _abs_det(trial) > best_volume:
                best, best_volume, best_active = c, _abs_det(trial), trial
    return best, best_active


def test_maxvol_with_reference_picks_the_best_volume_extension(rng):
    reference = np.vstack([np.eye(3), 0.3 * rng.uniform(-1, 1, size=(20, 3))])
    candidates = np.array([
        [0.5, 0.5, 0.0],   # inside the reference hull, most uncertain
        [0.2, 0.1, 0.1],   # inside
        [3.0, 0.0, 0.0],   # extends the volume most (x3)
        [0.0, 0.2, 1.5],   # extends it by x1.5
    ])
    u = np.array([9.0, 8.0, 2.0, 3.0])
    first, active = _best_extension(np.eye(3), candidates)
    second, _ = _best_extension(active, candidates, exclude={first})
    assert (first, second) == (2, 3)
    sel1 = select_configurations(u, threshold=1.0, budget=1, features=candidates,
                                 reference_features=reference, diversity="maxvol")
    assert sel1.indices.tolist() == [first]
    sel2 = select_configurations(u, threshold=1.0, budget=2, features=candidates,
                                 reference_features=reference, diversity="maxvol")
    assert sel2.indices.tolist() == [first, second]
    # once nothing extends the volume, the budget is filled by uncertainty
    sel3 = select_configurations(u, threshold=1.0, budget=3, features=candidates,
                                 reference_features=reference, diversity="maxvol")
    assert sel3.indices.tolist() == [2, 3, 0]
    assert "no candidate extends" in next(r for r in sel3.table if r["index"] == 0)["criterion"]


def test_maxvol_per_atom_ranks_configurations_by_active_atoms():
    # configuration 1 brings three independent directions; 0 and 2 lie along one axis
    features = np.array([
        [1.0, 0.0, 0.0], [1.1, 0.0, 0.0],                    # config 0
        [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0],   # config 1
        [0.5, 0.0, 0.0],                                     # config 2
    ])
    config_index = np.array([0, 0, 1, 1, 1, 2])
    u = np.array([9.0, 3.0, 8.0])
    sel = select_configurations(u, threshold=1.0, budget=1, features=features,
                                config_index=config_index, diversity="maxvol")
    assert sel.indices.tolist() == [1]
    assert "3 of 3 active-set rows" in next(r for r in sel.table if r["index"] == 1)["criterion"]


def test_near_duplicates_are_dropped():
    features = np.array([[0.0, 0.0], [0.001, 0.0], [1.0, 0.0], [1.0, 1.0]])
    u = np.array([5.0, 6.0, 4.0, 3.0])
    sel = select_configurations(u, threshold=1.0, budget=4, features=features,
                                min_distance=0.1)
    assert sorted(sel.indices.tolist()) == [1, 2, 3]  # 0 duplicates the more uncertain 1
    dropped = next(r for r in sel.table if r["index"] == 0)
    assert not dropped["selected"] and "near-duplicate of 1" in dropped["criterion"]
    # every pair of picks is at least min_distance apart
    picked = features[sel.indices]
    distances = np.linalg.norm(picked[:, None] - picked[None], axis=-1)
    assert distances[np.triu_indices(len(picked), 1)].min() >= 0.1


def test_cluster_diversity_takes_one_per_blob(rng):
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = np.vstack([c + rng.normal(scale=0.3, size=(10, 2)) for c in centres])
    u = rng.uniform(1, 2, 30)
    u[[3, 4, 5]] = [9.0, 8.5, 8.0]  # the three most uncertain all sit in blob 0
    sel = select_configurations(u, threshold=0.0, budget=3, features=features,
                                diversity="cluster", seed=0)
    blobs = sel.indices // 10
    assert sorted(blobs.tolist()) == [0, 1, 2]
    for blob in range(3):
        members = np.arange(blob * 10, blob * 10 + 10)
        assert members[np.argmax(u[members])] in sel.indices


# --------------------------------------------------------------------------- environments


def _periodic_frames(rng):
    frames = []
    for seed in range(2):
        atoms = bulk("Cu", cubic=True).repeat(3)  # 10.83 Å cell
        atoms.rattle(0.05, seed=seed)
        frames.append(atoms)
    u = rng.uniform(0, 1, sum(len(a) for a in frames))
    return frames, u


def test_environment_cut_matches_mic_distances(rng):
    frames, u = _periodic_frames(rng)
    radius = 4.0  # < half the cell: each neighbour appears once
    sel = select_environments(frames, u, threshold=0.9, budget=3, radius_A=radius)
    assert len(sel.structures) == len(sel.indices) == min(3, int(np.sum(u > 0.9)))
    n_per = len(frames[0])
    for pick, cluster in zip(sel.indices, sel.structures, strict=True):
        c, a = divmod(int(pick), n_per)
        atoms = frames[c]
        distances = atoms.get_distances(a, range(n_per), mic=True)
        inside = np.flatnonzero((distances < radius) & (np.arange(n_per) != a))
        assert len(cluster) == 1 + len(inside)
        assert not cluster.pbc.any() and cluster.cell.rank == 0
        assert cluster.info["origin_config"] == c and cluster.info["origin_atom"] == a
        assert cluster.arrays["origin_atom"][0] == a
        assert sorted(cluster.arrays["origin_atom"][1:].tolist()) == sorted(inside.tolist())
        cut = np.linalg.norm(cluster.positions[1:] - cluster.positions[0], axis=1)
        np.testing.assert_allclose(np.sort(cut), np.sort(distances[inside]), atol=1e-10)
        assert cluster.info["uncertainty"] == pytest.approx(u[pick])


def test_environment_cut_small_cell_includes_images():
    atoms = bulk("Cu", cubic=True)  # 3.61 Å cell, 4 atoms: the sphere holds many images
    atoms.rattle(0.03, seed=1)
    radius = 4.5
    cluster = cut_environment(atoms, 2, radius)
    # brute force over lattice translations
    expected = []
    for shift in itertools.product(range(-3, 4), repeat=3):
        offset = np.asarray(shift) @ atoms.cell.array
        for j in range(len(atoms)):
            d = np.linalg.norm(atoms.positions[j] + offset - atoms.positions[2])
            if 0 < d < radius:
                expected.append(d)
    got = np.linalg.norm(cluster.positions[1:] - cluster.positions[0], axis=1)
    assert len(got) == len(expected) == len(cluster) - 1
    np.testing.assert_allclose(np.sort(got), np.sort(expected), atol=1e-10)


def test_environment_of_a_molecule():
    mol = molecule("CH3CH2OH")
    cluster = cut_environment(mol, 0, 1.6)
    distances = mol.get_distances(0, range(len(mol)))
    assert len(cluster) == 1 + int(np.sum((distances < 1.6) & (distances > 0)))


def test_environment_selection_never_repeats_and_dedups(rng):
    frames, u = _periodic_frames(rng)
    features = np.repeat(rng.normal(size=(len(u) // 2, 3)), 2, axis=0)  # pairs of duplicates
    sel = select_environments(frames, u, threshold=0.0, budget=len(u), radius_A=3.0,
                              features=features, min_distance=1e-6)
    assert len(set(sel.indices.tolist())) == len(sel.indices) == len(u) // 2


# --------------------------------------------------------------------------- output


def test_write_selection_for_labelling(tmp_path, rng):
    frames = []
    for k in range(4):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.ones((4, 3)))
        atoms.info["config_type"] = "bulk"
        frames.append(atoms)
    sel = select_configurations(np.array([1.0, 5.0, 3.0, 0.5]), threshold=2.0, budget=2)
    path, table = tmp_path / "sel.extxyz", tmp_path / "why.csv"
    write_selection(sel, path, frames=frames, table_path=table, source="cand.extxyz")
    back = read(path, ":")
    assert len(back) == 2
    for atoms, origin in zip(back, [1, 2], strict=True):
        assert atoms.calc is None and "forces" not in atoms.arrays
        np.testing.assert_allclose(atoms.positions, frames[origin].positions, atol=1e-8)
        assert atoms.info["origin_config"] == origin
        assert atoms.info["selection_source"] == "cand.extxyz"
        assert atoms.info["config_type"] == "bulk"
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == [1, 2]
    assert [float(r["uncertainty"]) for r in rows] == [5.0, 3.0]
    assert all(r["selected"] == "1" and float(r["threshold"]) == 2.0 for r in rows)
    assert rows[0]["source"] == "cand.extxyz: config 1"


def test_write_environment_selection(tmp_path, rng):
    frames, u = _periodic_frames(rng)
    sel = select_environments(frames, u, threshold=0.5, budget=2, radius_A=3.0)
    write_selection(sel, tmp_path / "env.extxyz", table_path=tmp_path / "env.csv")
    back = read(tmp_path / "env.extxyz", ":")
    assert len(back) == 2 and not back[0].pbc.any()
    assert [int(a.info["origin_atom"]) for a in back] == [
        int(i) % len(frames[0]) for i in sel.indices]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": -1.0}, "threshold: expected a finite number >= 0"),
        ({"threshold": float("nan")}, "threshold: expected a finite number >= 0"),
        ({"threshold": 1.5, "upper_bound": 1.0}, "threshold: expected a value <= 1"),
        ({"budget": 11}, r"budget: 11 is larger than the number of configurations \(10\)"),
        ({"budget": 0}, "budget: expected an integer >= 1"),
        ({"budget": 2.5}, "budget: expected an integer >= 1"),
        ({"diversity": "maxvol"}, "features: required for diversity='maxvol'"),
        ({"diversity": "random", "features": np.ones((10, 2))}, "diversity: expected one of"),
        ({"features": np.ones((9, 2)), "diversity": "maxvol"}, "one row per configuration"),
        ({"min_distance": -1.0, "features": np.ones((10, 2))}, "min_distance: expected"),
    ],
)
def test_bad_selection_input(kwargs, match):
    params = {"threshold": 0.2, "budget": 3, **kwargs}
    with pytest.raises(InputError, match=match):
        select_configurations(np.linspace(0.0, 0.9, 10), **params)


def test_ltau_uncertainty_above_one_is_an_error():
    with pytest.raises(InputError, match=r"uncertainty_cfg: expected values in \[0, 1\]"):
        select_configurations(np.array([0.2, 1.3]), threshold=0.5, budget=1, upper_bound=1.0)
    with pytest.raises(InputError, match="uncertainty_cfg: contains 1 NaN"):
        select_configurations(np.array([0.2, np.nan]), threshold=0.5, budget=1)


def test_environment_bad_input(rng):
    frames, u = _periodic_frames(rng)
    with pytest.raises(InputError, match=r"element\(s\) \['Cu'\] not among the known"):
        select_environments(frames, u, threshold=0.5, budget=1, radius_A=3.0, elements=["Au"])
    with pytest.raises(InputError, match="budget: 500 is larger than the number of atoms"):
        select_environments(frames, u, threshold=0.5, budget=500, radius_A=3.0)
    with pytest.raises(InputError, match="atom_uncertainty: has 5 values"):
        select_environments(frames, u[:5], threshold=0.5, budget=1, radius_A=3.0)
    with pytest.raises(InputError, match="radius_A: expected a positive length"):
        select_environments(frames, u, threshold=0.5, budget=1, radius_A=-2.0)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def candidates(tmp_path, rng):
    frames = []
    for k in range(6):
        atoms = bulk("Cu", cubic=True).repeat(2)
        atoms.rattle(0.05 * (k + 1), seed=k)
        atoms.arrays["doptimality_uncertainty"] = rng.uniform(0, 1, len(atoms)) * (k + 1)
        atoms.arrays["ltau_uncertainty"] = rng.uniform(0, 1, len(atoms))
        frames.append(atoms)
    path = tmp_path / "cand.extxyz"
    write(path, frames, format="extxyz")
    return path, frames


def test_cli_select_config_level(candidates, tmp_path, capsys):
    path, frames = candidates
    out, table = tmp_path / "sel.extxyz", tmp_path / "why.csv"
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--level", "config", "--threshold", "2.5", "--budget", "2",
                 "--diversity", "none", "--out", str(out), "--table", str(table)])
    assert code == 0
    per_config = np.array([a.arrays["doptimality_uncertainty"].max() for a in frames])
    above = np.flatnonzero(per_config > 2.5)
    expected = above[np.argsort(-per_config[above])][:2]
    back = read(out, ":")
    assert [a.info["origin_config"] for a in back] == expected.tolist()
    assert all("doptimality_uncertainty" not in a.arrays for a in back)
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == len(above)


def test_cli_select_uses_the_fitted_threshold_in_the_candidates(candidates, tmp_path, capsys):
    path, frames = candidates
    for atoms in frames:
        atoms.info["doptimality_threshold"] = 2.5  # as 'mlipuq simulate' writes it
    write(path, frames, format="extxyz")
    out = tmp_path / "sel.extxyz"
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--budget", "2", "--diversity", "none", "--out", str(out)])
    assert code == 0
    assert "above 2.5;" in capsys.readouterr().out
    per_config = np.array([a.arrays["doptimality_uncertainty"].max() for a in frames])
    above = np.flatnonzero(per_config > 2.5)
    expected = above[np.argsort(-per_config[above])][:2]
    assert [a.info["origin_config"] for a in read(out, ":")] == expected.tolist()
    # a threshold fitted on the mean over the atoms (LTAU's aggregate) selects by the mean
    for atoms in frames:
        atoms.info["doptimality_threshold_aggregate"] = "mean"
    write(path, frames, format="extxyz")
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--budget", "2", "--diversity", "none", "--out", str(out)])
    assert code == 0
    capsys.readouterr()
    mean_config = np.array([a.arrays["doptimality_uncertainty"].mean() for a in frames])
    above = np.flatnonzero(mean_config > 2.5)
    expected = above[np.argsort(-mean_config[above])][:2]
    assert [a.info["origin_config"] for a in read(out, ":")] == expected.tolist()
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--budget", "2", "--out", str(out), "--aggregate", "max"])
    assert code == 2 and "fitted doptimality_threshold is on the mean" in \
        capsys.readouterr().err
    # disagreeing values, or none: the user has to give a number
    frames[0].info["doptimality_threshold"] = 3.0
    write(path, frames, format="extxyz")
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--budget", "2", "--out", str(out)])
    assert code == 2 and "disagree on 'doptimality_threshold'" in capsys.readouterr().err
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--budget", "2", "--out", str(out), "--aggregate", "mean", "--threshold", "1"])
    assert code == 0
    for atoms in frames:
        del atoms.info["doptimality_threshold"]
    write(path, frames, format="extxyz")
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--budget", "2", "--out", str(out)])
    assert code == 2 and "carries no fitted 'doptimality_threshold'" in capsys.readouterr().err


def test_cli_select_atom_level_with_descriptor_diversity(candidates, tmp_path):
    path, frames = candidates
    out = tmp_path / "env.extxyz"
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "ltau_uncertainty",
                 "--level", "atom", "--threshold", "0.9", "--budget", "4", "--radius", "3.0",
                 "--diversity", "maxvol", "--out", str(out), "--elements", "Cu"])
    assert code == 0
    back = read(out, ":")
    assert len(back) == 4 and all(not a.pbc.any() for a in back)
    origins = {(a.info["origin_config"], a.info["origin_atom"]) for a in back}
    assert len(origins) == 4
    for a in back:
        frame = frames[a.info["origin_config"]]
        assert frame.arrays["ltau_uncertainty"][a.info["origin_atom"]] > 0.9


def test_cli_select_per_group(candidates, tmp_path):
    path, frames = candidates
    for k, atoms in enumerate(frames):
        atoms.info["run"] = "early" if k < 3 else "late"
    write(path, frames, format="extxyz")
    out = tmp_path / "sel.extxyz"
    code = main(["select", "--candidates", str(path), "--uncertainty-key", "doptimality",
                 "--threshold", "0", "--budget", "2", "--diversity", "none",
                 "--per-group", "run", "--out", str(out)])
    assert code == 0
    per_config = np.array([a.arrays["doptimality_uncertainty"].max() for a in frames])
    expected = {int(np.argmax(per_config[:3])), 3 + int(np.argmax(per_config[3:]))}
    assert {a.info["origin_config"] for a in read(out, ":")} == expected


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--uncertainty-key", "doptimality", "--threshold", "1", "--budget", "2",
          "--per-group", "nope"], "configuration 0 has no info key 'nope'"),
        (["--uncertainty-key", "doptimality", "--threshold", "1", "--budget", "2",
          "--level", "atom", "--per-group", "run"], "--per-group: only with --level config"),
        (["--uncertainty-key", "doptimality", "--threshold", "-1", "--budget", "2"],
         "threshold: expected a finite number >= 0"),
        (["--uncertainty-key", "ltau_uncertainty", "--threshold", "2", "--budget", "2"],
         "threshold: expected a value <= 1"),
        (["--uncertainty-key", "doptimality", "--threshold", "1", "--budget", "7"],
         "budget: 7 is larger than the number of configurations"),
        (["--uncertainty-key", "gamma", "--threshold", "1", "--budget", "2"],
         "has no per-atom 'gamma_uncertainty'"),
        (["--uncertainty-key", "doptimality", "--threshold", "1", "--budget", "2",
          "--elements", "Au,Ag"], r"element\(s\) \['Cu'\] not among the known elements"),
    ],
)
def test_cli_select_bad_input_exits_2(candidates, tmp_path, capsys, extra, match):
    path, _ = candidates
    code = main(["select", "--candidates", str(path), "--out", str(tmp_path / "s.extxyz"),
                 *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mlipuq: error:") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(match, err)
    assert not (tmp_path / "s.extxyz").exists()


def test_cli_select_ltau_values_above_one_exit_2(tmp_path, capsys):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    atoms.arrays["ltau_uncertainty"] = np.array([0.2, 1.4])
    write(tmp_path / "c.extxyz", [atoms, atoms.copy()], format="extxyz")
    code = main(["select", "--candidates", str(tmp_path / "c.extxyz"), "--uncertainty-key",
                 "ltau", "--threshold", "0.5", "--budget", "1", "--diversity", "none",
                 "--out", str(tmp_path / "s.extxyz")])
    assert code == 2
    assert "expected values in [0, 1]" in capsys.readouterr().err
