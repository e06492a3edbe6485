"""These tests need torch, torch-pruning, onnx2torch and torchao: they run in the training
environment (`bash scripts/test.sh` runs them with the Python `scripts/setup-train.sh` prints)."""

import importlib.util

import pytest

missing = [
    m
    for m in ("torch", "torch_pruning", "onnx2torch", "torchao")
    if importlib.util.find_spec(m) is None
]
if missing:
    raise pytest.UsageError(
        f"tests/train needs {', '.join(missing)}: run them with the training environment, "
        "`PYTHONPATH=. $(bash scripts/setup-train.sh) -m pytest tests/train` (scripts/test.sh does)"
    )
