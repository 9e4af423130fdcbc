"""Crash safety: ``train``, ``fit`` and ``evaluate`` killed (SIGKILL) at several points.

Each verb runs in a subprocess and is killed at a file event (a temporary directory
appears, an epoch is logged, packaging starts) or at a fixed fraction of its measured
undisturbed run time. After each kill the outputs must be the old or the new complete
state, never a mix: a saved method loads and predicts exactly as the old or the new
fit; a report is the old one byte for byte, or a complete new one; a killed training
run resumes (or says in one line what to do) and its trajectory store holds one value
per training atom per logged epoch. The next successful command leaves no temporaries.

One tiny NequIP run (1 member, 3 epochs, 72 training atoms) is trained by the training
test through its kills and reused by the fit and evaluate tests (about 3 minutes in all
on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nequip")

from mlipuq.cli import main  # noqa: E402
from nequip_support import (  # noqa: E402
    TINY_R_MAX,
    cli_error,
    make_emt_copper_frames,
    make_tiny_run,
    write_frames,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="kills processes and reads /proc (Linux)"),
]

os.environ.setdefault("OMP_NUM_THREADS", "1")

EPOCHS = 3
TEMPORARY = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+-\d+-")
"""Names of the temporaries of mlipuq.io (``.NAME.tmp-HOST-PID-...``)."""

_TRAINED: dict[str, Path] = {}
"""The run trained by the training test, reused by the fit and evaluate tests."""


# ---------------------------------------------------------------------- helpers
def _run_option(verb: str, run: Path) -> list[str]:
    """How this mlipuq's ``verb`` takes the run folder (``--run RUN`` or positional)."""
    from mlipuq.cli import build_parser

    subparsers = next(action for action in build_parser()._actions
                      if isinstance(action, argparse._SubParsersAction))
    if "--run" in subparsers.choices[verb]._option_string_actions:
        return ["--run", str(run)]
    return ["-o", str(run)] if verb == "train" else [str(run)]


def _start(argv: list[str]) -> subprocess.Popen:
    """``mlipuq argv`` in a new session (so a failing test can kill what it leaves)."""
    code = f"from mlipuq.cli import main; raise SystemExit(main({argv!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(process: subprocess.Popen, event: Callable[[], bool], *,
               timeout: float = 180.0, missable: bool = False) -> float | None:
    """SIGKILL ``process`` (only it, not its children) as soon as ``event()`` holds;
    returns the seconds it ran. If it ends first: None when the event is ``missable``
    (a brief one the polling may miss), else the test fails."""
    start = time.perf_counter()
    while not event():
        if process.poll() is not None:
            if missable and process.returncode == 0:
                process.communicate()
                return None
            pytest.fail(f"the command ended (exit {process.returncode}) before the kill "
                        f"point: {process.stderr.read()[-2000:]}")
        if time.perf_counter() - start > timeout:
            _reap(process)
            pytest.fail("kill point not reached in time")
        time.sleep(0.002)
    return _kill(process, start)


def _kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``process`` after ``seconds``; False if it had already finished."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            _reap(process)
            return False
        time.sleep(0.005)
    _kill(process, 0.0)
    return True


def _kill(process: subprocess.Popen, start: float) -> float:
    elapsed = time.perf_counter() - start
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    return elapsed


def _reap(process: subprocess.Popen) -> None:
    """Kill what is left of ``process``'s session (after a failure)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _finish(process: subprocess.Popen) -> float:
    """Wait for ``process``; assert it succeeded; return its run time."""
    start = time.perf_counter()
    try:
        _, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _reap(process)
        raise
    assert process.returncode == 0, err[-3000:]
    return time.perf_counter() - start


def _temporaries(root: Path) -> list[Path]:
    """The ``.NAME.tmp-HOST-PID-*`` temporaries of ``root`` (beside it) and inside it."""
    beside = [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.tmp-")]
    inside = [p for p in root.rglob("*") if TEMPORARY.match(p.name)] if root.is_dir() else []
    return beside + inside


def _live_processes_mentioning(text: str) -> list[int]:
    """PIDs of running (not zombie) processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _assert_no_trainer_left(run: Path) -> None:
    """The killed ``mlipuq train`` took its ``nequip-train`` with it."""
    deadline = time.perf_counter() + 10.0
    while _live_processes_mentioning(str(run / "models")):
        if time.perf_counter() > deadline:
            pids = _live_processes_mentioning(str(run / "models"))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"nequip-train outlived the killed mlipuq train (pids {pids})")
        time.sleep(0.05)


def _assert_store_whole(run: Path, epochs: int | None = None) -> list[int]:
    """One value per training atom for every logged epoch (and its energy errors);
    returns the logged epochs."""
    from mlipuq.atom_table import AtomTable
    from mlipuq.trajectory_store import TrajectoryStore

    store_dir = run / "trajectories"
    if not (store_dir / "store.json").is_file():
        return []
    store = TrajectoryStore.open(store_dir)
    table = AtomTable.load(run / "atom_table.npz")
    assert store.atom_table.fingerprint() == table.fingerprint()
    if "model_0" not in store.model_ids():
        return []
    logged = [int(e) for e in store.epochs("model_0")]
    assert logged == list(range(len(logged))), logged  # no gap, no half epoch
    for epoch in logged:
        values = np.load(store.epoch_path("model_0", epoch), allow_pickle=False)
        assert values.shape == (table.n_atoms,) and np.all(np.isfinite(values))
        energies = np.load(store.energy_path("model_0", epoch), allow_pickle=False)
        assert energies.shape == (table.n_configs,)
    if epochs is not None:
        assert logged == list(range(epochs))
        extra = {p.name for p in store.path.joinpath("models", "model_0").iterdir()} - {
            "meta.json", *(f"epoch_{e:06d}.npy" for e in logged),
            *(f"energy_epoch_{e:06d}.npy" for e in logged)}
        assert not extra, extra
    return logged


def _assert_complete_run_folder_or_none(run: Path) -> None:
    if run.exists():
        names = {p.name for p in run.iterdir()}
        assert {"run.json", "train.extxyz", "val.extxyz", "atom_table.npz"} <= names, names


# ---------------------------------------------------------------------- train
def test_train_killed_at_each_stage_resumes_without_loss(tmp_path_factory, capsys):
    work = tmp_path_factory.mktemp("crash_train")
    data = write_frames(work / "cu.extxyz", make_emt_copper_frames(12, seed=0))
    run = work / "run"
    argv = ["train", str(data), *_run_option("train", run), "--preset", "tiny",
            "--epochs", str(EPOCHS), "--r-max", str(TINY_R_MAX), "--val-fraction", "0.25",
            "--threads", "1", "-q"]
    store = run / "trajectories" / "models" / "model_0"
    try:
        # 1. while the run folder is created, and right after its run.json appears
        process = _start([*argv, "--no-package"])
        _kill_when(process, lambda: bool(_temporaries(run)) or (run / "run.json").exists())
        _assert_complete_run_folder_or_none(run)
        process = _start([*argv, "--no-package", "--resume"])
        _kill_when(process, lambda: (run / "run.json").exists())
        _assert_complete_run_folder_or_none(run)

        # 2. in the middle of training, once epoch 1 is logged
        process = _start([*argv, "--no-package", "--resume"])
        _kill_when(process, lambda: (store / "epoch_000001.npy").exists())
        _assert_no_trainer_left(run)
        assert _assert_store_whole(run)
        # fit refuses the half-trained run, in one line that says how to go on
        err = cli_error(capsys, ["fit", *_run_option("fit", run)])
        assert "model_0" in err and "did not finish" in err and "--resume" in err
        # a truncated last.ckpt: one line saying what to do, no traceback
        copy = work / "copy"
        shutil.copytree(run, copy)
        last = copy / "models" / "model_0" / "last.ckpt"
        os.truncate(last, last.stat().st_size // 2)
        copy_argv = [str(copy) if part == str(run) else part for part in argv]
        err = cli_error(capsys, [*copy_argv, "--resume"])
        assert "last.ckpt" in err and "truncated or corrupt" in err
        assert "--resume" in err and "--overwrite" in err
        shutil.rmtree(copy)

        # 3. while the trained model is packaged
        process = _start([*argv, "--resume"])
        models = run / "models"
        _kill_when(process, lambda: any(p.name.startswith(".model_0.nequip.zip.tmp-")
                                        for p in models.iterdir()))
        _assert_no_trainer_left(run)
        assert not (models / "model_0.nequip.zip").exists()  # never a half-written one
        assert "did not finish" in cli_error(capsys, ["fit", *_run_option("fit", run)])

        # 4. resume to the end
        process = _start([*argv, "--resume"])
        _finish(process)
    finally:
        for leftover in _live_processes_mentioning(str(run)):
            os.kill(leftover, signal.SIGKILL)
    from mlipuq.run_folder import RunFolder

    folder = RunFolder.open(run)
    assert folder.meta["trained_epochs"] == {"model_0": EPOCHS}
    assert folder.model_path("model_0").name == "model_0.nequip.zip"
    _assert_store_whole(run, EPOCHS)
    import csv

    with open(folder.metrics_path("model_0"), newline="") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == list(range(EPOCHS))
    assert _temporaries(run) == []
    _TRAINED["run"] = run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The run of the training test, else a fresh tiny one (1 member, 3 epochs)."""
    run = _TRAINED.get("run")
    if run is not None and run.is_dir():
        return run
    return make_tiny_run(tmp_path_factory.mktemp("crash_run"), n_models=1, epochs=EPOCHS,
                         package=True)


# ---------------------------------------------------------------------- fit
def _signatures(methods_dir: Path, X) -> dict[str, tuple]:
    """Per saved method: (parameters, threshold, predictions on ``X``)."""
    from mlipuq.method import load_method

    out = {}
    for directory in sorted(methods_dir.iterdir()):
        if directory.name.startswith("."):
            continue
        method = load_method(directory)
        result = method.predict(X)
        config = result.config_uncertainty
        out[directory.name] = (
            json.dumps(method.get_params(deep=False), sort_keys=True, default=str),
            getattr(method, "threshold_", None),
            np.asarray(result.atom_uncertainty).tobytes(),
            None if config is None else np.asarray(config).tobytes(),
        )
    return out


def _assert_old_or_new(now: dict, old: dict, new: dict, where: str) -> None:
    for name, signature in now.items():
        assert signature in (old.get(name), new.get(name)), (
            f"{where}: RUN/methods/{name} is neither the old nor the new fit (a mix)")


def test_fit_killed_leaves_each_method_old_or_new(trained_run, capsys):
    from mlipuq.backends.base import committee
    from mlipuq.run_folder import RunFolder
    from mlipuq.run_methods import model_outputs

    run = trained_run
    methods_dir = run / "methods"
    shutil.rmtree(methods_dir, ignore_errors=True)
    frames = make_emt_copper_frames(4, seed=11, temperature=900.0)
    outputs, _ = model_outputs(RunFolder.open(run), frames)
    X = committee(outputs, "model_0")
    # the old fit (other settings: every method differs from the new one) ...
    assert main(["fit", *_run_option("fit", run), "--k", "3", "--clusters", "2",
                 "--fpr", "0.3", "--no-calibrate"]) == 0
    capsys.readouterr()
    old = _signatures(methods_dir, X)
    kept = run.parent / "methods_old"
    shutil.copytree(methods_dir, kept)
    # ... the new one, undisturbed, timed
    new_argv = ["fit", *_run_option("fit", run)]
    start = time.perf_counter()
    _finish(_start(new_argv))
    duration = time.perf_counter() - start
    new = _signatures(methods_dir, X)
    assert set(new) == set(old) and all(new[m] != old[m] for m in new)

    def restore_old() -> None:
        shutil.rmtree(methods_dir)
        shutil.copytree(kept, methods_dir)

    def saving_ltau() -> bool:  # brief: the polling may miss it
        return any(p.name.startswith(".ltau.tmp-") for p in methods_dir.iterdir())

    old_header = (kept / "ltau" / "estimator.json").read_bytes()

    def ltau_swapped() -> bool:
        try:
            return (methods_dir / "ltau" / "estimator.json").read_bytes() != old_header
        except OSError:
            return False

    seen = []
    for where, event, missable in (("while saving ltau", saving_ltau, True),
                                   ("right after ltau was swapped in", ltau_swapped, False)):
        restore_old()
        _kill_when(_start(new_argv), event, missable=missable)
        now = _signatures(methods_dir, X)
        _assert_old_or_new(now, old, new, f"killed {where}")
        seen.append(now)
    for fraction in (0.5, 0.8):
        restore_old()
        _kill_after(_start(new_argv), fraction * duration)
        now = _signatures(methods_dir, X)
        _assert_old_or_new(now, old, new, f"killed at {fraction:.0%} of the fit")
        seen.append(now)
    assert seen[1]["ltau"] == new["ltau"]  # killed after a swap: that method is new
    assert any(now == old for now in seen)  # killed before any swap: all old
    # the next successful fit leaves the new methods and no temporaries
    _finish(_start(new_argv))
    assert _signatures(methods_dir, X) == new
    assert [p.name for p in methods_dir.iterdir() if p.name.startswith(".")] == []
    shutil.rmtree(kept)


# ---------------------------------------------------------------------- evaluate
def _report_state(report: Path) -> dict | None:
    """Check a report is complete and self-consistent; return its metrics (None: no
    report)."""
    if not report.exists():
        return None
    metrics = json.loads((report / "metrics.json").read_text())
    page = (report / "index.html").read_text()
    assert page.rstrip().endswith("</html>")
    for name in metrics["methods"]:
        assert f">{name}<" in page, name
    calibrated = [name for name, cal in (metrics.get("calibration") or {}).items() if cal]
    assert len(re.findall(r"<h2>[^<]* calibration</h2>", page)) == len(calibrated)
    images = set(re.findall(r"src=['\"]([^'\"]+\.png)['\"]", page))
    assert images == {p.name for p in report.glob("*.png")}
    return metrics


def test_evaluate_killed_leaves_the_old_or_the_new_report(trained_run, capsys):
    run = trained_run
    test_set = write_frames(run.parent / "hot.extxyz",
                            make_emt_copper_frames(6, seed=7, temperature=1500.0))
    report = run.parent / "report"
    shutil.rmtree(report, ignore_errors=True)
    common = ["evaluate", *_run_option("evaluate", run), "--test", f"hot={test_set}",
              "-o", str(report)]
    # the old report: D-optimality only, no calibration section
    assert main([*common, "--methods", "doptimality", "--fpr", "0.3"]) == 0
    capsys.readouterr()
    old = {name: (report / name).read_bytes() for name in ("metrics.json", "index.html")}
    old_metrics = _report_state(report)
    assert not any((old_metrics.get("calibration") or {}).values())

    def check(where: str) -> str:
        metrics = _report_state(report)
        assert metrics is not None, f"{where}: the old report is gone"
        current = {name: (report / name).read_bytes() for name in old}
        if current == old:
            return "old"
        assert set(metrics["methods"]) > set(old_metrics["methods"]), where
        assert any(metrics["calibration"].values()), f"{where}: no calibration section"
        return "new"

    states = []
    # killed while the new report is written (its temporary directory exists) ...
    process = _start(common)
    writing = re.compile(rf"^\.{report.name}\.tmp-[A-Za-z0-9_]+-\d+-")
    elapsed = _kill_when(process, lambda: any(writing.match(p.name)
                                              for p in report.parent.iterdir()))
    states.append(check("killed while writing the report"))
    # ... at half the time it takes to get there ...
    _kill_after(_start(common), 0.5 * elapsed)
    states.append(check("killed at 50 % of the time to the report"))

    # ... and right after the swap (the old report then lies in a temporary directory)
    def swapped() -> bool:
        try:
            return (report / "index.html").read_bytes() != old["index.html"]
        except OSError:
            return False

    _kill_when(_start(common), swapped)
    states.append(check("killed right after the swap"))
    assert states == ["old", "old", "new"]
    # the next successful evaluate: the new report, no temporaries
    _finish(_start(common))
    assert check("after a successful evaluate") == "new"
    assert _temporaries(report) == []
