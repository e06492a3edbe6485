#!/usr/bin/env bash
# The cpu-aarch64 verification environment: ONNX Runtime's aarch64 build under qemu user-mode.
#
#   bash scripts/setup-aarch64.sh        # prints the sysroot's path on its last line
#
# What it makes (once; later runs only re-check): Debian's qemu-user-static, and a sysroot with
# Debian's arm64 Python 3.11 (unpacked from Debian's arm64 packages, never installed on the host),
# the manylinux aarch64 wheels of onnxruntime and numpy pinned in constraints.txt, and an
# ARM-format /proc/cpuinfo matching the emulated CPU (ONNX Runtime's cpuinfo reads it at import
# and crashes on the host's x86 text). The sysroot is cached outside the checkout, keyed by those
# versions, so fresh clones (CI) reuse it:
#   ${EDGE_AGENT_CACHE:-~/.cache/edge-agent}/aarch64-<key>/
# The factory finds it there (models/emulation.py); EDGE_AGENT_AARCH64_SYSROOT overrides.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${EDGE_AGENT_CACHE:-$HOME/.cache/edge-agent}"
PYTHON="${PYTHON:-python3}"
log() { printf '\033[1m[setup-aarch64]\033[0m %s\n' "$*" >&2; }

pin() {  # the version constraints.txt pins for a package
  local version
  version="$(grep -i -E "^$1==" "$ROOT/constraints.txt" | head -1 | cut -d= -f3)"
  [ -n "$version" ] || { echo "constraints.txt pins no $1" >&2; exit 1; }
  echo "$version"
}
ORT_VERSION="$(pin onnxruntime)"
NUMPY_VERSION="$(pin numpy)"
# Everything the emulated interpreter needs, no more (inference only: decode, NMS and mAP run on
# the host). Debian bookworm's arm64 Python 3.11 and the C libraries it and the wheels link.
DEB_PACKAGES=(libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5
  libpython3.11-minimal libpython3.11-stdlib python3.11-minimal libuuid1 libsqlite3-0
  libncursesw6 libtinfo6 libreadline8 libdb5.3 libnsl2 libtirpc3 libcrypt1 libgssapi-krb5-2
  libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2)
PY_PACKAGES=("onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION" "flatbuffers==$(pin flatbuffers)"
  "packaging==$(pin packaging)" "protobuf==$(pin protobuf)")
KEY="$(printf '%s\n' "${PY_PACKAGES[@]}" "${DEB_PACKAGES[@]}" |
  sha256sum | cut -c1-12)"
SYSROOT="${EDGE_AGENT_AARCH64_SYSROOT:-$CACHE/aarch64-$KEY}"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v qemu-aarch64-static >/dev/null; then
  log "installing Debian's qemu-user-static"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    qemu-user-static >/dev/null
fi

if [ ! -f "$SYSROOT/.complete" ]; then
  log "building the arm64 sysroot in $SYSROOT (onnxruntime $ORT_VERSION, numpy $NUMPY_VERSION)"
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
  fi
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  (cd "$work" && apt-get download -qq "${DEB_PACKAGES[@]/%/:arm64}" >/dev/null)
  rm -rf "$SYSROOT.partial"; mkdir -p "$SYSROOT.partial"
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$SYSROOT.partial"; done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --platform linux_aarch64 -d "$work/wheels" "${PY_PACKAGES[@]}"
  site="$SYSROOT.partial/usr/lib/python3/dist-packages"
  mkdir -p "$site"
  for wheel in "$work"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$site"; done
  # qemu resolves the interpreter's own absolute paths inside the sysroot (-L)
  rm -rf "$SYSROOT"; mv "$SYSROOT.partial" "$SYSROOT"
  touch "$SYSROOT/.complete"
fi

# What a Cortex-A76 (Raspberry Pi 5, RK3588's big cores) says in /proc/cpuinfo, one entry per
# host core (qemu runs the guest's threads on them). Written every run: the host may differ.
mkdir -p "$SYSROOT/proc"
for ((cpu = 0; cpu < $(nproc); cpu++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' \
    "$cpu" "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
  printf 'CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
done >"$SYSROOT/proc/cpuinfo.new"
mv "$SYSROOT/proc/cpuinfo.new" "$SYSROOT/proc/cpuinfo"

# the smoke test: the emulated interpreter imports ONNX Runtime and runs on the ARM kernels
QEMU_LD_PREFIX="$SYSROOT" qemu-aarch64-static -cpu cortex-a76 -L "$SYSROOT" \
  "$SYSROOT/usr/bin/python3.11" -c \
  "import platform, onnxruntime; assert platform.machine() == 'aarch64'; print(onnxruntime.__version__)" \
  >/dev/null || { log "the emulated interpreter does not run; delete $SYSROOT and try again"; exit 1; }
echo "$SYSROOT"
