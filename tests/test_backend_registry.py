"""The backend registry: names -> classes, plug-ins, run folders recording their backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ase import Atoms

from mlipuq.backends import registry
from mlipuq.backends.base import Backend, ModelOutputs
from mlipuq.exceptions import InputError
from mlipuq.run_folder import RunFolder


class ToyBackend:
    """Descriptors = atomic numbers; energies = number of atoms (a complete Backend)."""

    name = "toy"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @property
    def known_species(self) -> list[str]:
        return ["Cu", "Ag"]

    def outputs(self, frames, *, batch_size=None) -> ModelOutputs:
        numbers = np.concatenate([atoms.numbers for atoms in frames])
        sizes = [len(atoms) for atoms in frames]
        return ModelOutputs(
            species=np.concatenate([atoms.get_chemical_symbols() for atoms in frames]),
            config_index=np.repeat(np.arange(len(frames)), sizes),
            descriptors=self.scale * numbers[:, None].astype(float),
            energies=np.array(sizes, dtype=float),
        )

    @classmethod
    def model_path(cls, run, model_id):
        path = run.models_dir / f"{run.model_dir(model_id).name}.toy"
        if not path.is_file():
            raise InputError(f"{path}: no toy model")
        return path

    @classmethod
    def from_run(cls, run, model_id, *, device="cpu", batch_size=16, threads=1):
        return cls(float(cls.model_path(run, model_id).read_text()))


@pytest.fixture
def toy():
    registry.register("toy", ToyBackend)
    yield ToyBackend
    registry.unregister("toy")


def _old_run(path, **extra):
    """A run.json as mlipuq 0.1 wrote it (format_version 1, no backend field)."""
    path.mkdir()
    meta = {"format": "mlipuq-run", "format_version": 1, "elements": ["Cu"],
            "model_ids": ["model_0"], "n_models": 1, **extra}
    (path / "run.json").write_text(json.dumps(meta))
    return path


def test_builtins_are_listed_and_resolve():
    assert {"nequip", "allegro", "mace", "pace", "arrays"} <= set(registry.available())
    for name in ("nequip", "allegro", "pace", "arrays"):
        cls = registry.get(name)
        assert cls.name == name
        for attribute in ("outputs", "known_species", "from_run", "model_path"):
            assert hasattr(cls, attribute), (name, attribute)
    assert hasattr(registry.get("nequip"), "uq_calculator")
    assert not hasattr(registry.get("arrays"), "uq_calculator")


def test_importing_the_registry_imports_no_torch():
    code = ("import sys, mlipuq, mlipuq.backends, mlipuq.run_folder\n"
            "from mlipuq.backends import registry\n"
            "[registry.get(n) for n in ('nequip', 'pace', 'arrays')]\n"
            "print(sorted(m for m in ('torch', 'nequip', 'pyace') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_unknown_backend_is_one_line_listing_the_registered():
    with pytest.raises(InputError) as info:
        registry.get("schnet")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("backend: unknown backend 'schnet' (registered: "
                       f"{', '.join(registry.available())})")


def test_run_with_an_unknown_backend(tmp_path, capsys):
    from mlipuq.cli import main

    path = _old_run(tmp_path / "run", format_version=2, backend="schnet")
    with pytest.raises(InputError, match=r"run.json: backend: unknown backend 'schnet' "
                                         r"\(registered: allegro, arrays, mace, nequip, pace"):
        RunFolder.open(path)
    assert main(["fit", "--run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown backend 'schnet'" in err[0] and "nequip" in err[0]


def test_old_run_without_backend_opens_as_nequip(tmp_path):
    from mlipuq.backends.nequip.features import NequIPBackend

    path = _old_run(tmp_path / "old")
    run = RunFolder.open(path)
    assert run.backend == "nequip" and run.backend_class is NequIPBackend
    with pytest.raises(InputError, match="no trained model for 'model_0'"):
        run.model_path("model_0")
    best = run.checkpoint_path("model_0", "best")
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    assert run.model_path("model_0") == best
    (run.models_dir / "model_0.nequip.zip").write_bytes(b"")
    assert run.model_path("model_0") == run.packaged_path("model_0")
    with pytest.raises(InputError, match="'model_9' is not in the run"):
        run.model_path("model_9")


def test_new_runs_record_their_backend(tmp_path, toy):
    run = RunFolder.create(tmp_path / "default", {"elements": ["Cu"], "model_ids": ["m"]})
    assert json.loads((run.path / "run.json").read_text())["backend"] == "nequip"
    run = RunFolder.create(tmp_path / "toy", {"elements": ["Cu"], "model_ids": ["m"],
                                              "backend": "toy"})
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["backend"] == "toy" and meta["format_version"] == 2
    with pytest.raises(InputError, match="unknown backend 'nope'"):
        RunFolder.create(tmp_path / "bad", {"elements": ["Cu"], "model_ids": ["m"],
                                            "backend": "nope"})


def test_a_registered_backend_serves_a_run(tmp_path, toy):
    run = RunFolder.create(tmp_path / "run", {"elements": ["Cu"], "model_ids": ["m0"],
                                              "backend": "toy"})
    run.models_dir.mkdir()
    (run.models_dir / "m0.toy").write_text("2.0")
    assert run.model_path("m0") == run.models_dir / "m0.toy"
    member = registry.load(run.path, "m0")
    assert isinstance(member, ToyBackend) and isinstance(member, Backend)
    out = member.outputs([Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])])
    assert out.descriptors.ravel().tolist() == [58.0, 58.0]
    from mlipuq.run_methods import model_outputs

    outputs, seconds = model_outputs(run, [Atoms("Cu", positions=[[0, 0, 0]])])
    assert outputs["m0"].energies.tolist() == [1.0] and seconds["m0"] >= 0
    with pytest.raises(InputError, match=r"backend 'toy' has no ASE calculator \(backends "
                                         r"with one: allegro, mace, nequip, pace\)"):
        registry.calculator(run, "m0")
    with pytest.raises(InputError, match=r"backend 'toy' cannot train models \(backends "
                                         r"that can: allegro, mace, nequip, pace\)"):
        registry.capability("toy", "train", "train models")


def test_register_checks(toy):
    with pytest.raises(InputError, match="already registered"):
        registry.register("toy", ToyBackend)
    with pytest.raises(InputError, match="not a valid backend name"):
        registry.register("Toy Backend", ToyBackend)
    with pytest.raises(InputError, match="expected 'module:Class'"):
        registry.register("other", "no_colon")
    registry.register("other", "tests_do_not_have_this_module:Thing")
    try:
        with pytest.raises(InputError, match="backend 'other': cannot import"):
            registry.get("other")
    finally:
        registry.unregister("other")
    registry.register("named_wrong", ToyBackend)
    try:
        with pytest.raises(InputError, match=r"ToyBackend.name is 'toy', expected "
                                             r"'named_wrong'"):
            registry.get("named_wrong")
    finally:
        registry.unregister("named_wrong")


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    """A package declaring ``[project.entry-points."mlipuq.backends"]`` needs no mlipuq edit."""
    (tmp_path / "plugin_backend.py").write_text(textwrap.dedent("""
        class PluginBackend:
            name = "plugin"
    """))
    info = tmp_path / "plugin_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-backend\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[mlipuq.backends]\n"
                                           "plugin = plugin_backend:PluginBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._entry_points.cache_clear()
    try:
        assert "plugin" in registry.available()
        assert "plugin_backend" not in sys.modules  # listed without importing it
        assert registry.get("plugin").__name__ == "PluginBackend"
    finally:
        registry._loaded.pop("plugin", None)
        monkeypatch.undo()
        registry._entry_points.cache_clear()
    assert "plugin" not in registry.available()


def test_pace_backend_conforms():
    pace = pytest.importorskip("mlipuq.backends.pace")
    if not pace.pace_available():
        pytest.skip("python-ace is not installed")
    backend = pace.PaceBackend(pace.small_test_basis(["Cu"]))
    assert isinstance(backend, Backend) and backend.known_species == ["Cu"]
    from ase.build import bulk

    out = backend.outputs(bulk("Cu", cubic=True))
    assert out.descriptors.shape[0] == 4 and out.forces.shape == (4, 3)


@pytest.mark.parametrize(("backend", "message"), [
    ("arrays", "backend 'arrays' cannot train models (backends that can: allegro, "),
    ("schnet", "backend: unknown backend 'schnet' (registered: allegro, arrays, mace, "
               "nequip, pace"),
])
def test_train_goes_through_the_registry(tmp_path, capsys, backend, message):
    from mlipuq.cli import main

    status = main(["train", str(tmp_path / "train.extxyz"), "--run", str(tmp_path / "run"),
                   "--backend", backend])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0]
