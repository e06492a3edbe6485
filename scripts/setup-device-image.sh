#!/usr/bin/env bash
# A device image: Debian bookworm with systemd, booted by the tests in systemd-nspawn.
#
#   bash scripts/setup-device-image.sh arm64     # prints the root filesystem's path on its last line
#   bash scripts/setup-device-image.sh amd64
#   bash scripts/setup-device-image.sh --emulation-only   # qemu and binfmt_misc only
#
# What it makes (once; later runs only re-check): a minimal Debian bookworm root filesystem for
# the architecture (mmdebstrap; arm64 runs its package scripts under qemu through binfmt_misc)
# with systemd as init, Debian's Python 3.11, and a virtual environment /opt/edge-agent holding
# the agent's dependencies at the versions constraints.txt pins (wheels for that architecture
# only, fetched on the host: pip under emulation is slow). The agent itself is not in it: the
# tests install the wheel of the checkout they test, with the command docs/install.md gives.
# Cached outside the checkout, keyed by the package lists and the pins:
#   ${EDGE_AGENT_CACHE:-~/.cache/edge-agent}/device-<arch>-<key>/
# Also made here, because booting an arm64 systemd needs them: Debian's qemu-user-static
# registered with binfmt_misc's F flag (the interpreter is opened once, on the host, so it runs
# inside containers that do not hold it) and systemd-nspawn.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${EDGE_AGENT_CACHE:-$HOME/.cache/edge-agent}"
PYTHON="${PYTHON:-python3}"
ARCH="${1:-arm64}"
EMULATION_ONLY=no  # --emulation-only: qemu and binfmt_misc for arm64, no image
if [ "$ARCH" = --emulation-only ]; then ARCH=arm64; EMULATION_ONLY=yes; fi
log() { printf '\033[1m[setup-device-image]\033[0m %s\n' "$*" >&2; }

case "$ARCH" in
  arm64) WHEEL_PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_17_aarch64
    manylinux2014_aarch64 linux_aarch64) ;;
  amd64) WHEEL_PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 linux_x86_64) ;;
  *) echo "usage: $0 arm64|amd64 (not '$ARCH')" >&2; exit 2 ;;
esac

# what a board's minimal Debian has, plus what the agent's wheels link (libgomp: ONNX Runtime)
DEB_PACKAGES=(python3 python3-venv ca-certificates systemd systemd-sysv dbus iproute2 procps
  libgomp1)
# the agent's own dependencies (pyproject's [project] dependencies), resolved with the pins
mapfile -t REQUIREMENTS < <("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
EOF
)
RECIPE=2  # bump when what this script puts in the image changes
EMULATED=no; [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ] && EMULATED=yes
KEY="$(printf '%s\n' "$RECIPE" "$ARCH" "$EMULATED" "${DEB_PACKAGES[@]}" "${REQUIREMENTS[@]}" | cat - "$ROOT/constraints.txt" |
  sha256sum | cut -c1-12)"
IMAGE="$CACHE/device-$ARCH-$KEY"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
if [ "$EMULATED" = yes ]; then
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  # mmdebstrap checks a foreign architecture with it (a recommendation, not a dependency)
  command -v arch-test >/dev/null || missing+=(arch-test)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian's ${missing[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ "$EMULATED" = yes ]; then
  # binfmt_misc: mounted, and qemu-aarch64 registered with the F flag (fix binary)
  binfmt=/proc/sys/fs/binfmt_misc
  [ -f "$binfmt/register" ] || $SUDO mount -t binfmt_misc binfmt_misc "$binfmt"
  if ! grep -q '^flags: .*F' "$binfmt/qemu-aarch64" 2>/dev/null; then
    log "registering qemu-aarch64 with binfmt_misc (flags OCPF)"
    [ -f "$binfmt/qemu-aarch64" ] && echo -1 | $SUDO tee "$binfmt/qemu-aarch64" >/dev/null
    magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":qemu-aarch64:M::$magic:$mask:$(command -v qemu-aarch64-static):OCPF" |
      $SUDO tee "$binfmt/register" >/dev/null
  fi
fi

[ "$EMULATION_ONLY" = yes ] && exit 0

if [ ! -f "$IMAGE/.complete" ]; then
  log "building the $ARCH device image in $IMAGE (minutes; arm64 runs its package scripts under qemu)"
  work="$(mktemp -d)"; trap '$SUDO rm -rf "$work" "$IMAGE.partial"' EXIT
  "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
    "${WHEEL_PLATFORMS[@]/#/--platform=}" -c "$ROOT/constraints.txt" -d "$work/wheels" \
    "${REQUIREMENTS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
  $SUDO rm -rf "$IMAGE.partial"; mkdir -p "$IMAGE.partial"
  includes="$(IFS=,; echo "${DEB_PACKAGES[*]}")"
  hooks=()
  if [ "$EMULATED" = yes ]; then
    # qemu-user cannot set up systemd's credentials (243/CREDENTIALS): without this the three
    # units that load them fail and the emulated board boots "degraded". Boards need none of it.
    for unit in systemd-sysusers systemd-tmpfiles-setup systemd-tmpfiles-setup-dev; do
      hooks+=(--customize-hook="mkdir -p \"\$1/etc/systemd/system/$unit.service.d\" && printf '[Service]\nLoadCredential=\n' > \"\$1/etc/systemd/system/$unit.service.d/emulation.conf\"")
    done
  fi
  # the hooks run in the new root: the wheels go into the venv from the host's copy (no network
  # under emulation); the host's CA bundle lets a user's pip inside reach the index later
  $SUDO mmdebstrap --quiet --arch="$ARCH" --variant=minbase --include="$includes" \
    --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp $work/wheels/*.whl \"\$1/tmp/wheels/\"" \
    --customize-hook='chroot "$1" python3 -m venv /opt/edge-agent' \
    --customize-hook='chroot "$1" sh -c "/opt/edge-agent/bin/pip install -q --no-index --find-links /tmp/wheels /tmp/wheels/*.whl"' \
    --customize-hook='rm -rf "$1/tmp/wheels"' \
    --customize-hook="cp /etc/ssl/certs/ca-certificates.crt \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
    --customize-hook='echo edge-device > "$1/etc/hostname"' "${hooks[@]}" \
    bookworm "$IMAGE.partial"
  mv "$IMAGE.partial" "$IMAGE"
  touch "$IMAGE/.complete"
fi
echo "$IMAGE"
