#!/usr/bin/env bash
# rknn-toolkit2 (the RK3588 converter and its simulator) in a virtualenv of its own, cached in
# ~/.cache/edge-agent and keyed by its pin. It cannot share the project's environment: it pins
# numpy 1.26, onnx <= 1.18 and its own onnxruntime, and pulls torch 2.4 with the CUDA libraries
# (about 5.6 GB, 2 to 5 minutes once). `edge-models convert --target rk3588` finds it there
# (or through EDGE_MODELS_RKNN_PYTHON). Prints the environment's python. Idempotent.
set -euo pipefail
PIN="rknn-toolkit2==2.5.0"  # models/convert/rknn.py: RKNN_PINS
key="$(printf '%s' "$PIN" | sha256sum | cut -c1-12)"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent/rknn-$key"
log() { printf '\033[1m[setup-rknn]\033[0m %s\n' "$*" >&2; }
if [ ! -f "$VENV/.installed" ]; then
  log "installing $PIN into $VENV (once; several GB)"
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q "$PIN" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -I -c "from rknn.api import RKNN" # fail here, not in the tests
  touch "$VENV/.installed"
fi
echo "$VENV/bin/python"
