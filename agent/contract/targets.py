"""Deployment targets: which kernels will run a model, detected from this machine's CPU and devices.

A model is made, verified and shipped for a target, because the same INT8 file is fast and right
on one CPU and wrong or slow on another: ONNX Runtime's x86 U8S8 kernels without VNNI multiply
with ``vpmaddubsw``, whose 16-bit pair sums saturate on full-range weights; VNNI (``vpdpbusd``)
and AMX accumulate in 32 bits, and so do the aarch64 kernels. A device runs its own target's
variant or, failing that, one of its safe fallbacks: a VNNI machine may run a ``cpu-x86_64`` model
(the integers come out the same), a plain AVX2 machine never runs a ``cpu-x86_64-vnni`` one.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    name: str
    arch: str  # the CPU architecture of the machines it names
    summary: str
    fallbacks: tuple[str, ...] = ()  # other targets' models this device may run, best first
    runtime: str | None = None  # the agent backend an accelerator's models need; None: any CPU one


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu-x86_64", "x86_64", "x86-64 without VNNI (AVX2): U8S8 pair sums can saturate"),
        Target(
            "cpu-x86_64-vnni",
            "x86_64",
            "x86-64 with AVX-512 VNNI, AVX-VNNI or AMX: 32-bit int8 accumulation",
            ("cpu-x86_64",),
        ),
        Target("cpu-aarch64", "aarch64", "64-bit Arm CPU (NEON; dot product where present)"),
        Target(
            "jetson-orin", "aarch64", "NVIDIA Jetson Orin (TensorRT)", ("cpu-aarch64",), "tensorrt"
        ),
        Target(
            "jetson-xavier",
            "aarch64",
            "NVIDIA Jetson Xavier (TensorRT)",
            ("cpu-aarch64",),
            "tensorrt",
        ),
        Target(
            "jetson-nano", "aarch64", "NVIDIA Jetson Nano (TensorRT)", ("cpu-aarch64",), "tensorrt"
        ),
        Target(
            "jetson-tx2", "aarch64", "NVIDIA Jetson TX2 (TensorRT)", ("cpu-aarch64",), "tensorrt"
        ),
        Target("rk3588", "aarch64", "Rockchip RK3588 NPU (RKNN)", ("cpu-aarch64",), "rknn"),
        Target(
            "openvino",
            "x86_64",
            "x86-64 through OpenVINO (model.backend: openvino): its own CPU kernels",
            ("cpu-x86_64",),
            "openvino",
        ),
    )
}

# x86 flags that give ONNX Runtime's int8 kernels 32-bit accumulation (no vpmaddubsw saturation)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86_REPORTED = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_REPORTED = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
# (implementer, part) of common Arm cores, from each vendor's technical reference manual
_ARM_CORES = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x4E, 0x004): "NVIDIA Carmel",
}


class UnknownTarget(ValueError):
    """A target name this version does not know."""


def get(name: str) -> Target:
    """The target called ``name``.

    Raises:
        UnknownTarget: with the names that exist.
    """
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTarget(f"unknown target {name!r} (known: {', '.join(TARGETS)})") from None


def preferences(target: str) -> list[str]:
    """Variants a device of ``target`` can run, best first: its own, then its safe fallbacks."""
    known = TARGETS.get(target)
    return [target, *(known.fallbacks if known else ())]


def for_backend(target: str, backend: str) -> str:
    """The models a device follows with ``backend``: an accelerator's own only when that backend
    is the one its models need (an RK3588 board running ONNX Runtime takes CPU models). A plain
    x86-64 machine on OpenVINO follows ``openvino`` (whose fallback is its own ``cpu-x86_64``); a
    VNNI one keeps its ``cpu-x86_64-vnni`` models unless ``ota.target`` says ``openvino`` (that
    target's fallback is not VNNI: it would take fewer variants than before)."""
    if target == "cpu-x86_64" and backend == "openvino":
        return "openvino"
    known = TARGETS.get(target)
    if known is None or known.runtime in (None, backend) or not known.fallbacks:
        return target
    return known.fallbacks[0]


@dataclass(frozen=True)
class Detected:
    """What this machine is, and what the decision rested on."""

    target: str
    arch: str
    cpu: str
    features: tuple[str, ...]  # the CPU features that matter for int8 kernels, as the OS lists them
    accelerators: tuple[str, ...] = field(default=())
    # x86 "family F model M": virtual machines often name only "AMD EPYC", and the generation
    # decides how INT8 compares with float32 (Zen 5's float32 is twice Zen 4's)
    generation: str = ""

    def describe(self) -> str:
        extras = f"; accelerators: {', '.join(self.accelerators)}" if self.accelerators else ""
        generation = f", {self.generation}" if self.generation else ""
        return (
            f"{self.target} ({self.cpu}{generation}, {self.arch}; features: "
            f"{' '.join(self.features) or 'none of note'}{extras})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "arch": self.arch,
            "cpu": self.cpu,
            "features": list(self.features),
            "accelerators": list(self.accelerators),
        }


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.MULTILINE | re.IGNORECASE)
    return match.group(1).strip() if match else None


def _arm_core(cpuinfo: str) -> str:
    implementer, part = _field(cpuinfo, "CPU implementer"), _field(cpuinfo, "CPU part")
    try:
        key = (int(implementer or "", 16), int(part or "", 16))
    except ValueError:
        return _field(cpuinfo, "model name") or "unknown Arm CPU"
    return _ARM_CORES.get(key, f"Arm core {key[0]:#x}/{key[1]:#05x}")


def from_cpuinfo(cpuinfo: str, machine: str, accelerators: tuple[str, ...] = ()) -> Detected:
    """The target of a machine with this ``/proc/cpuinfo`` text, ``uname -m`` and accelerators.

    Accelerator targets win over CPU ones (``jetson-orin``, ``rk3588``); otherwise x86-64 is
    ``cpu-x86_64-vnni`` when any of :data:`VNNI_FLAGS` is listed and ``cpu-x86_64`` without.
    """
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
    generation = ""
    if arch == "x86_64":
        family, model = _field(cpuinfo, "cpu family"), _field(cpuinfo, "model")
        generation = f"family {family} model {model}" if family and model else ""
        flags = set((_field(cpuinfo, "flags") or "").split())
        features = tuple(f for f in _X86_REPORTED if f in flags)
        target = "cpu-x86_64-vnni" if flags & set(VNNI_FLAGS) else "cpu-x86_64"
        cpu = _field(cpuinfo, "model name") or "unknown x86-64 CPU"
    elif arch == "aarch64":
        flags = set((_field(cpuinfo, "Features") or "").split())
        features = tuple(f for f in _ARM_REPORTED if f in flags)
        target, cpu = "cpu-aarch64", _arm_core(cpuinfo)
    else:
        features, target, cpu = (), f"cpu-{arch}", _field(cpuinfo, "model name") or arch
    for accelerator in accelerators:
        if accelerator in TARGETS or accelerator.startswith("jetson"):
            target = accelerator
            break
    return Detected(target, arch, cpu, features, accelerators, generation)


def _accelerators(root: Path) -> tuple[str, ...]:
    """Accelerator targets this machine carries: a Jetson module, an RK3588 NPU."""
    found = []
    try:
        model = (root / "proc/device-tree/model").read_text(errors="replace").lower()
    except OSError:
        model = ""
    try:
        compatible = (root / "proc/device-tree/compatible").read_bytes().decode(errors="replace")
    except OSError:
        compatible = ""
    if (root / "etc/nv_tegra_release").exists():
        family = next((f for f in ("orin", "xavier", "nano", "tx2") if f in model), None)
        found.append(f"jetson-{family}" if family else "jetson")
    if "rockchip,rk3588" in compatible:
        found.append("rk3588")
    if (root / "proc/driver/nvidia/version").exists() and not found:
        found.append("nvidia-gpu")  # a discrete GPU: TensorRT targets name it once they exist
    return tuple(found)


def detect(root: Path = Path("/"), machine: str | None = None) -> Detected:
    """This machine's target, from ``/proc/cpuinfo``, ``uname -m`` and the devices present."""
    try:
        cpuinfo = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return from_cpuinfo(cpuinfo, machine or platform.machine(), _accelerators(root))
