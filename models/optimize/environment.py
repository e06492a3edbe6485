"""Where the training toolchain runs: here if torch is importable, else its cached virtualenv.

``edge-models prune`` and ``distill`` are the same commands everywhere; when the factory's own
environment has no torch (the usual case: the agent and the factory stay small), the command
re-runs itself with the training environment's Python (``scripts/setup-train.sh``, or
``EDGE_MODELS_TRAIN_PYTHON``), from this checkout.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from models.environments import cached_python

TRAIN_PINS = (
    "torch==2.14.1 torchvision==0.29.1 torch-pruning==1.6.1 onnx2torch==1.5.15 torchao==0.18.0"
)
ENV_VAR = "EDGE_MODELS_TRAIN_PYTHON"
CHECKOUT = Path(__file__).resolve().parents[2]


def has_toolchain() -> bool:
    modules = ("torch", "torch_pruning", "onnx2torch", "torchao")
    return all(importlib.util.find_spec(m) for m in modules)


def train_python() -> Path:
    """Raises FactoryError (with the script that makes it) when the environment is missing."""
    return cached_python("train", TRAIN_PINS, ENV_VAR, "scripts/setup-train.sh", "training")


def run_there(argv: Sequence[str]) -> int:
    """``edge-models argv`` in the training environment; its output is this command's."""
    python = train_python()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    child = subprocess.Popen([str(python), "-m", "models.cli", *argv], env=env)
    # A terminal's Ctrl-C reaches both processes: the child saves its state and stops, and
    # this one waits for it instead of killing it mid-save.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
