"""AOTInductor compilation of a NequIP model that keeps the latent descriptors.

NequIP's own ``ase`` compile target exports energy, per-atom energies, forces and
stress only. mlipuq registers one more target, ``mlipuq_ase``, with the same inputs
and single-frame settings plus the output ``node_features``, so a compiled model
still returns the descriptors LTAU and D-optimality need, from the same call::

    compile_model("run/models/model_0.nequip.zip", "model_0.nequip.pt2")
    calc = UQCalculator.from_compiled_model("model_0.nequip.pt2", estimators=...)

Compilation runs ``nequip-compile --mode aotinductor --target mlipuq_ase`` in a child
Python process (the target is registered there first), so inductor's state and
thread settings stay out of the caller's process. It takes minutes on a CPU.
TorchScript compilation is not offered: NequIP refuses it on torch >= 2.10.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mlipuq.exceptions import InputError

TARGET_NAME = "mlipuq_ase"
"""Name of the compile target registered with NequIP."""

COMPILED_SUFFIX = ".nequip.pt2"


def compile_target() -> dict:
    """The ``mlipuq_ase`` target: NequIP's ``ase`` target plus ``node_features``."""
    from nequip.data import AtomicDataDict
    from nequip.scripts._compile_utils import AOTI_ASE_TARGET, COMPILE_TARGET_DICT

    target = dict(COMPILE_TARGET_DICT[AOTI_ASE_TARGET])
    target["output"] = list(target["output"]) + [AtomicDataDict.NODE_FEATURES_KEY]
    return target


def register_target() -> None:
    """Register ``mlipuq_ase`` with NequIP (``nequip.scripts._compile_utils``); idempotent."""
    from nequip.scripts._compile_utils import register_compile_targets

    register_compile_targets({TARGET_NAME: compile_target()})


def compile_command(
    model_path: str | os.PathLike, out_path: str | os.PathLike, *, device: str = "cpu"
) -> list[str]:
    """Arguments of ``nequip-compile`` for the ``mlipuq_ase`` target."""
    return [
        str(model_path), str(out_path), "--mode", "aotinductor", "--device", device,
        "--target", TARGET_NAME,
    ]


def compile_model(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    device: str = "cpu",
    threads: int | None = 1,
    timeout: float | None = None,
) -> Path:
    """Compile a saved NequIP model with AOTInductor, keeping ``node_features``.

    Parameters
    ----------
    model_path : path
        ``.nequip.zip`` package or ``.ckpt`` checkpoint.
    out_path : path
        Output file; must end with ``.nequip.pt2``.
    device : str
        Device the compiled model will run on (``"cpu"`` or ``"cuda"``).
    threads : int or None
        ``OMP_NUM_THREADS`` of the compiling process (None: inherit).
    timeout : float, optional
        Seconds before the compilation is abandoned.

    Returns
    -------
    Path
        ``out_path``; load it with ``UQCalculator.from_compiled_model``.

    Raises
    ------
    InputError
        Missing model or wrong output suffix.
    RuntimeError
        ``nequip-compile`` failed (message ends with its last output lines).
    """
    from mlipuq.backends.nequip.features import check_model_path

    model_path = check_model_path(model_path)
    out_path = Path(out_path)
    if not out_path.name.endswith(COMPILED_SUFFIX):
        raise InputError(f"out_path: expected a name ending in {COMPILED_SUFFIX}, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "mlipuq.backends.nequip.compile",
               *compile_command(model_path, out_path, device=device)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out_path.is_file():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(
            f"nequip-compile failed for {model_path} (exit {done.returncode}): {tail}"
        )
    return out_path


def main(argv: Sequence[str] | None = None) -> None:
    """``nequip-compile`` with the ``mlipuq_ase`` target registered (child process entry)."""
    import torch
    from nequip.scripts.compile import main as nequip_compile

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    register_target()
    nequip_compile(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
