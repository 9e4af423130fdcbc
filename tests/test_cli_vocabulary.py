"""One CLI vocabulary: the same flag for the same concept in every verb, defaults written
once by the help formatter, progress on stderr and results on stdout."""

from __future__ import annotations

import argparse
import logging
import re

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from mlipuq.cli import build_parser, main

PROGRESS_LINE = re.compile(r"^mlipuq: \[ *\d+\.\d s\] ")
VERBS_WITH_A_RUN = {("train",), ("fit",), ("evaluate",), ("simulate",), ("select",)}


def _parsers() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) of the top-level parser and every (nested) verb."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        found.append((path, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*path, name))

    walk(build_parser(), ())
    return found


PARSERS = _parsers()
LEAVES = [(path, parser) for path, parser in PARSERS
          if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in _visible(parser) for s in a.option_strings}


def test_every_verb_is_walked():
    paths = {path for path, _ in LEAVES}
    assert {("train",), ("fit",), ("evaluate",), ("simulate",), ("select",), ("demo",),
            ("ltau", "fit"), ("ltau", "calibrate"), ("ltau", "predict")} <= paths


def _id(value: object) -> str | None:
    return (" ".join(value) or "mlipuq") if isinstance(value, tuple) else None


@pytest.mark.parametrize("path,parser", PARSERS, ids=_id)
def test_every_parser_writes_its_defaults_once(path, parser):
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), path
    for action in _visible(parser):
        if action.default is None or action.default is False or not action.help:
            continue  # no default shown: the help text may explain it
        text = action.help.replace("(default: %(default)s)", "")  # argparse's own
        assert "default" not in text, (path, action.option_strings, action.help)


def test_the_run_is_named_the_same_way_everywhere():
    takes_a_run = set()
    for path, parser in LEAVES:
        for action in _visible(parser):
            if action.dest == "run":
                assert action.option_strings == ["--run"] and action.metavar == "RUN", path
                takes_a_run.add(path)
            if not action.option_strings:  # no visible positional names a run
                assert "run" not in action.dest.lower(), (path, action.dest)
    assert takes_a_run == VERBS_WITH_A_RUN


@pytest.mark.parametrize("path,parser", LEAVES, ids=_id)
def test_one_spelling_per_concept(path, parser):
    options = _options(parser)
    assert "--n-threads" not in options
    assert {o for o in options if "thread" in o} <= {"--threads"}
    assert {o for o in options if "seed" in o} <= {"--seed"}
    assert {o for o in options if "model-id" in o or "member" in o} <= {"--model-id"}
    assert {o for o in options if "per-element" in o} in (
        set(), {"--per-element", "--no-per-element"})
    for action in _visible(parser):
        if action.dest == "out":
            assert action.option_strings == ["-o", "--out"], path
        if action.dest == "threads":
            assert action.option_strings == ["--threads"], path
    assert {"-q", "--quiet", "-v", "--verbose"} <= options


@pytest.mark.parametrize("path", [path for path, _ in PARSERS], ids=_id)
def test_help_of_every_verb_exits_0(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mlipuq {' '.join(path)}".rstrip())
    assert "--n-threads" not in out and "-o RUN" not in out


def test_one_spelling_per_concept_parses():
    parser = build_parser()
    assert parser.parse_args(["fit", "--run", "r"]).run == "r"
    assert parser.parse_args(["evaluate", "--run", "r", "--test", "a.xyz", "--out",
                              "o"]).run == "r"
    assert parser.parse_args(["train", "t.xyz", "--run", "r"]).run == "r"
    for earlier in (["fit", "r"], ["train", "t.xyz", "-o", "r"]):
        with pytest.raises(SystemExit):
            parser.parse_args(earlier)
    predict = ["ltau", "predict", "--estimator", "e", "--descriptors", "d.npy",
               "--structures", "s.xyz", "--out", "o.xyz"]
    with pytest.raises(SystemExit):
        parser.parse_args([*predict, "--n-threads", "3"])
    assert parser.parse_args([*predict, "--threads", "3"]).threads == 3
    assert parser.parse_args(predict).threads is None
    args = parser.parse_args(["ltau", "fit", "--errors", "e.npy", "--descriptors", "d.npy",
                              "--structures", "s.xyz", "--out", "o", "--no-per-element"])
    assert args.per_element is False and args.threads == 1
    assert parser.parse_args(["fit", "--run", "r"]).per_element is None
    assert parser.parse_args(["fit", "--run", "r", "--no-per-element"]).per_element is False


def test_log_level_before_or_after_the_verb():
    parser = build_parser()
    assert parser.parse_args(["-q", "fit", "--run", "r"]).quiet is True
    assert parser.parse_args(["fit", "--run", "r", "-q"]).quiet is True
    assert parser.parse_args(["fit", "--run", "r"]).quiet is False
    assert parser.parse_args(["fit", "-v", "--run", "r"]).verbose is True


@pytest.mark.parametrize("argv,message", [
    (["fit"], "required: --run"),
    (["train", "t.xyz"], "required: --run"),
])
def test_a_missing_run_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: mlipuq {argv[0]}") and message in err
    assert "--run RUN" in err.splitlines()[0]  # shown as required


def test_missing_run_folder_is_one_line_exit_2(tmp_path, capsys):
    assert main(["fit", "--run", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        line for line in captured.err.splitlines() if line.startswith("mlipuq: error: ")]
    assert len(captured.err.splitlines()) == 1 and "nope" in captured.err


@pytest.fixture
def ltau_files(tmp_path):
    """12 four-atom Cu frames with EMT forces, random descriptors and error trajectories."""
    rng = np.random.default_rng(0)
    frames = []
    for number in range(12):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=number)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    write(tmp_path / "train.extxyz", frames)
    np.save(tmp_path / "desc.npy", rng.normal(size=(48, 4)).astype(np.float32))
    np.save(tmp_path / "errors.npy", rng.gamma(2.0, 0.05, size=(6, 48)))
    return tmp_path


def _ltau_fit(files, *extra):
    return ["ltau", "fit", "--errors", str(files / "errors.npy"), "--descriptors",
            str(files / "desc.npy"), "--structures", str(files / "train.extxyz"),
            "--out", str(files / "est"), "--k", "2", *extra]


def test_progress_goes_to_stderr_and_the_result_to_stdout(ltau_files, capsys):
    handlers = list(logging.getLogger("mlipuq").handlers)
    assert main(_ltau_fit(ltau_files)) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"estimator: {ltau_files / 'est'} (atol = ")
    err = captured.err.splitlines()
    assert len(err) >= 2 and all(PROGRESS_LINE.match(line) for line in err), err
    stamps = [float(re.search(r"\[ *([\d.]+) s\]", line).group(1)) for line in err]
    assert stamps == sorted(stamps)
    assert logging.getLogger("mlipuq").handlers == handlers  # main leaves logging as it was


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_keeps_stderr_empty_and_stdout_unchanged(ltau_files, capsys, where):
    argv = ["-q", *_ltau_fit(ltau_files)] if where == "before" else [*_ltau_fit(ltau_files),
                                                                       "-q"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("estimator: ")


def test_io_failure_is_one_line_naming_the_path_exit_1(ltau_files, capsys):
    blocker = ltau_files / "a_file"
    blocker.write_text("x")
    argv = _ltau_fit(ltau_files)
    argv[argv.index("--out") + 1] = str(blocker / "est")
    assert main(["-q", *argv]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mlipuq: error: ") and str(blocker) in err[0]
