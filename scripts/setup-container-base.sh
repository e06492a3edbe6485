#!/usr/bin/env bash
# A local base image for building our container images where no registry is reachable.
#
#   bash scripts/setup-container-base.sh arm64    # prints the image's name on its last line
#
# Dockerfile.arm64 builds FROM the official python:3.11-slim-bookworm by default; any Debian
# bookworm with python3 and python3-venv serves (PYTHON_IMAGE build argument). This makes one
# with mmdebstrap (minbase: Debian's own Python 3.11, its CA certificates and apt sources) and
# imports it into podman as localhost/edge-agent-base:bookworm-<arch>-<key>, keyed by the package
# list, once; later runs only check that podman has it. Also installs podman, buildah and runc
# (crun fails on hosts with hybrid cgroups) where missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH="${1:-arm64}"
log() { printf '\033[1m[setup-container-base]\033[0m %s\n' "$*" >&2; }
case "$ARCH" in arm64 | amd64) ;; *) echo "usage: $0 arm64|amd64 (not '$ARCH')" >&2; exit 2 ;; esac

PACKAGES=(python3 python3-venv ca-certificates)
RECIPE=1  # bump when what this script puts in the image changes
KEY="$(printf '%s\n' "$RECIPE" "$ARCH" "${PACKAGES[@]}" | sha256sum | cut -c1-12)"
IMAGE="localhost/edge-agent-base:bookworm-$ARCH-$KEY"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
for tool in podman buildah runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
# mmdebstrap checks a foreign architecture with it (a recommendation, not a dependency)
command -v arch-test >/dev/null || missing+=(arch-test)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian's ${missing[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
  # qemu through binfmt_misc, as for the device image
  bash "$ROOT/scripts/setup-device-image.sh" --emulation-only >/dev/null
fi

if ! $SUDO podman image exists "$IMAGE"; then
  log "building $IMAGE (mmdebstrap, then podman import)"
  $SUDO mmdebstrap --quiet --arch="$ARCH" --variant=minbase \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --customize-hook="cp /etc/ssl/certs/ca-certificates.crt \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
    --customize-hook='rm -rf "$1/var/lib/apt/lists/"* "$1/var/cache/apt/"*.bin' \
    bookworm - | $SUDO podman import --arch "$ARCH" --os linux - "$IMAGE" >/dev/null || {
    # podman imports whatever arrived before mmdebstrap failed: never keep that as the cache
    $SUDO podman image rm -f "$IMAGE" >/dev/null 2>&1 || true
    echo "setup-container-base: building $IMAGE failed (see above)" >&2
    exit 1
  }
fi
echo "$IMAGE"
