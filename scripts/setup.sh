#!/usr/bin/env bash
# Prepare a fresh machine: a virtualenv in .venv with the project and its dev/model extras, at the
# exact versions of constraints.txt (refresh them with scripts/lock.sh).
# Idempotent: a second run only re-checks. Sourced by test.sh and demo.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGE_AGENT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# Debian packages the tests need as real parts: a real MQTT broker (mosquitto, with
# mosquitto_passwd), openssl to make TLS certificates at test time, and nginx-light to
# serve the OTA channel over real HTTP (Range requests included); tmux to test `edge-agent watch`
# on a real terminal.
APT_PACKAGES=(mosquitto openssl nginx-light tmux)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing edge-agent with dev and models extras (pip, pinned by constraints.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,models,openvino]" 2>&1 |
    grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import agent, onnxruntime, openvino, cv2" # fail here, not in the tests, if pip did
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
