#!/usr/bin/env bash
# The demo end to end, set-up included: `bash scripts/demo.sh [edge-agent demo args]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec edge-agent demo "$@"
