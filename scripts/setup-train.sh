#!/usr/bin/env bash
# torch, torch-pruning, onnx2torch and torchao (edge-models prune / distill / qat) in a virtualenv
# of their own, cached in ~/.cache/edge-agent and keyed by their pins: the agent and the rest of the
# factory never need torch. torch comes from PyPI with its CUDA libraries (about 5.5 GB, 2 to 3 minutes
# once): onnx2torch imports torchvision, and PyPI's torchvision only runs beside the CUDA build.
# The project's own dependencies follow constraints.txt there too (the project itself is not
# installed: the factory runs from its checkout, PYTHONPATH=<checkout>). `edge-models prune`
# re-runs itself in this environment (or EDGE_MODELS_TRAIN_PYTHON's). Prints its python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PINS="torch==2.14.1 torchvision==0.29.1 torch-pruning==1.6.1 onnx2torch==1.5.15 torchao==0.18.0"  # models/optimize/environment.py: TRAIN_PINS
key="$(printf '%s' "$PINS" | sha256sum | cut -c1-12)"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent/train-$key"
log() { printf '\033[1m[setup-train]\033[0m %s\n' "$*" >&2; }
quiet() { grep -v "^WARNING: Location" || true; }
if [ ! -f "$VENV/.installed" ]; then
  log "installing $PINS into $VENV (once; about 5.5 GB)"
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $PINS 2>&1 | quiet
  "$VENV/bin/python" -c "import torch, torch_pruning, onnx2torch, torchao" # fail here, not in the tests
  touch "$VENV/.installed"
fi
stamp="$VENV/.project-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing the project's dependencies into $VENV (constraints.txt)"
  mapfile -t deps < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
for dep in [*project["dependencies"], *extras["models"], *extras["dev"]]:
    print(dep)
PY
)
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "${deps[@]}" 2>&1 | quiet
  rm -f "$VENV"/.project-*
  touch "$stamp"
fi
echo "$VENV/bin/python"
