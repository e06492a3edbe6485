#!/usr/bin/env bash
# The whole test suite, set-up included: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
if [ ! -f "$ROOT/../shared/models/yolov8n-coco-fp32.onnx" ] && [ -z "${EDGE_AGENT_SHARED:-}" ]; then
  echo "warning: ../shared not found beside the project; tests that need real data will fail" >&2
fi
# the cpu-aarch64 verification environment (ONNX Runtime's aarch64 build under qemu), cached
bash "$ROOT/scripts/setup-aarch64.sh" >/dev/null
# the RK3588 conversion environment (rknn-toolkit2 and its simulator), cached
bash "$ROOT/scripts/setup-rknn.sh" >/dev/null
# the device images (Debian bookworm with systemd: arm64 under qemu, amd64) and the container
# images' local base, cached; tests/device boots them
bash "$ROOT/scripts/setup-device-image.sh" arm64 >/dev/null
bash "$ROOT/scripts/setup-device-image.sh" amd64 >/dev/null
bash "$ROOT/scripts/setup-container-base.sh" arm64 >/dev/null
# the training environment (torch, torch-pruning, onnx2torch: edge-models prune / distill), cached
TRAIN_PYTHON="$(bash "$ROOT/scripts/setup-train.sh")"
log "ruff"
ruff check .
ruff format --check . >/dev/null
if [ $# -gt 0 ]; then
  log "pytest $*"
  exec python -m pytest "$@"
fi
# everything: the suite in the project's environment, then tests/train in torch's
status=0
log "pytest"
python -m pytest || status=$?
log "pytest tests/train (training environment: $TRAIN_PYTHON)"
PYTHONPATH="$ROOT" "$TRAIN_PYTHON" -m pytest tests/train || status=$?
exit "$status"
