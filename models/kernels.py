"""Run a model on the int8 kernels of the target it ships to, here or under emulation.

The same INT8 file computes different numbers on different CPUs (see
``agent.contract.targets``), so the gate and the golden set must come from the target's own kernels:

- this machine's target: ONNX Runtime in this process (speed is measured too);
- ``cpu-aarch64`` on another machine: ONNX Runtime's aarch64 build in an arm64 sysroot under
  qemu user-mode (``scripts/setup-aarch64.sh``); accuracy only;
- ``cpu-x86_64`` on a VNNI machine: this machine's own ONNX Runtime under ``qemu-x86_64 -cpu
  Haswell`` (AVX2 without VNNI, so MLAS picks the same kernels a plain AVX2 CPU runs, bit for
  bit); accuracy only;
- ``openvino``: OpenVINO's CPU plugin in this process (any x86-64 machine with openvino
  installed; speed is measured against the float model in OpenVINO);
- anything else (a VNNI target on a machine without VNNI, Jetson, RK3588): refused with a message
  that says what would verify it.

Emulated runs go through ``models/emulated_inference.py`` (numpy + onnxruntime only): tensors in,
raw outputs out; letterbox, decode, NMS and mAP stay in the agent's own code on this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.contract import Detected, targets
from agent.updates import cpu_session
from agent.vision import Backend
from models.errors import FactoryError

INFERENCE_SCRIPT = Path(__file__).with_name("emulated_inference.py")
SETUP_AARCH64 = "bash scripts/setup-aarch64.sh"
QEMU_TIMEOUT_S = 3600.0


class UnverifiableTarget(FactoryError):
    """This machine cannot run the target's kernels (and was not told to publish anyway)."""


class KernelRunner(Protocol):
    target: str
    measures_speed: bool

    def describe(self) -> str: ...

    def run(
        self, model: Path, tensors: list[np.ndarray], loaded: Backend | None = None
    ) -> list[np.ndarray]:
        """Raw outputs of ``model`` on these kernels; ``loaded`` is the caller's backend of the
        same model in this process, which a native runner uses instead of loading another."""
        ...


@dataclass
class NativeRunner:
    """This machine's kernels in this process: ONNX Runtime's, or (``runtime="openvino"``, the
    ``openvino`` target) OpenVINO's CPU plugin, whose oneDNN kernels compute other int8 numbers
    than ONNX Runtime's from the same file; the gate then runs the float reference in OpenVINO
    too, so the latency ratio compares one runtime with itself."""

    target: str
    host: Detected
    measures_speed: bool = True
    runtime: str = "onnxruntime"

    def describe(self) -> str:
        if self.runtime != "openvino":
            return f"native: {self.host.describe()}"
        import openvino

        version = openvino.get_version().split("-")[0]
        return f"native: OpenVINO {version} CPU on {self.host.describe()}"

    def run(
        self, model: Path, tensors: list[np.ndarray], loaded: Backend | None = None
    ) -> list[np.ndarray]:
        if loaded is not None and loaded.info.backend == self.runtime:
            return [loaded.infer(t) for t in tensors]
        from agent.config import ModelConfig
        from agent.vision import load_backend

        config = ModelConfig(path=model, backend=self.runtime)
        backend = load_backend(self.runtime, model, config)
        try:
            return [backend.infer(t) for t in tensors]
        finally:
            backend.close()


@dataclass
class EmulatedRunner:
    """ONNX Runtime under qemu user-mode, with the CPU model the target's kernels need."""

    target: str
    qemu: str
    cpu: str
    python: Path
    sysroot: Path | None = None
    measures_speed: bool = False

    def describe(self) -> str:
        where = f", sysroot {self.sysroot}" if self.sysroot else ""
        return f"emulated: {Path(self.qemu).name} -cpu {self.cpu}{where} (accuracy only)"

    def run(
        self, model: Path, tensors: list[np.ndarray], loaded: Backend | None = None
    ) -> list[np.ndarray]:
        command = [self.qemu, "-cpu", self.cpu]
        env = dict(os.environ)
        if self.sysroot is not None:
            command += ["-L", str(self.sysroot)]
            env["QEMU_LD_PREFIX"] = str(self.sysroot)
            env.pop("PYTHONPATH", None)  # the host's packages are x86_64
            env.pop("PYTHONHOME", None)
        with tempfile.TemporaryDirectory(prefix="edge-kernels-") as work:
            inputs, outputs = Path(work) / "inputs.npz", Path(work) / "outputs.npz"
            np.savez(inputs, **{str(i): t for i, t in enumerate(tensors)})
            started = time.monotonic()
            try:
                done = subprocess.run(
                    [*command, str(self.python), str(INFERENCE_SCRIPT), str(model), str(inputs),
                     str(outputs)],
                    capture_output=True, text=True, env=env, timeout=QEMU_TIMEOUT_S,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise FactoryError(
                    f"{self.describe()}: no result after {QEMU_TIMEOUT_S:.0f} s"
                ) from None
            if done.returncode != 0 or not outputs.is_file():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise FactoryError(f"{self.describe()} failed on {model.name}: {last}")
            with np.load(outputs) as results:
                arrays = [results[str(i)] for i in range(len(tensors))]
        seconds = time.monotonic() - started
        print(
            f"- {len(tensors)} inference(s) on {self.target} kernels ({self.describe()}) "
            f"in {seconds:.0f} s", file=sys.stderr,
        )  # fmt: skip
        return arrays


@dataclass
class SemanticsRunner:
    """ONNX Runtime with graph optimizations off: a QDQ model's float meaning, on no target's
    int8 kernels. What ``--unverified-target`` gates and records golden sets with."""

    target: str
    measures_speed: bool = False

    def describe(self) -> str:
        return f"unverified: {self.target} kernels not run here; the model's float semantics"

    def run(
        self, model: Path, tensors: list[np.ndarray], loaded: Backend | None = None
    ) -> list[np.ndarray]:
        try:
            session = cpu_session(str(model), fused=False)
        except ValueError as exc:
            raise FactoryError(f"{model} {exc}") from None
        name = session.get_inputs()[0].name
        return [session.run(None, {name: t})[0] for t in tensors]


def verification(target: str, unverified_target: bool = False) -> KernelRunner:
    """The runner that verifies ``target``; with ``unverified_target``, the model's semantics
    where its kernels cannot run here.

    Raises:
        FactoryError: unknown target; UnverifiableTarget unless ``unverified_target``.
    """
    try:
        return runner_for(target)
    except UnverifiableTarget as exc:
        if not unverified_target:
            raise
        print(f"WARNING: --unverified-target: {exc}", file=sys.stderr)
        return SemanticsRunner(target)


def known_target(name: str) -> targets.Target:
    """The target called ``name``; an unknown one is a user error naming the known ones."""
    try:
        return targets.get(name)
    except targets.UnknownTarget as exc:
        raise FactoryError(str(exc)) from None


def aarch64_sysroot() -> Path | None:
    """The sysroot ``scripts/setup-aarch64.sh`` made (or ``EDGE_AGENT_AARCH64_SYSROOT``)."""
    explicit = os.environ.get("EDGE_AGENT_AARCH64_SYSROOT")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("EDGE_AGENT_CACHE", Path.home() / ".cache" / "edge-agent"))
    built = sorted(cache.glob("aarch64-*/.complete"), key=lambda p: p.stat().st_mtime)
    return built[-1].parent if built else None


def _aarch64_runner() -> EmulatedRunner:
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    sysroot = aarch64_sysroot()
    python = sysroot / "usr/bin/python3.11" if sysroot else None
    if qemu is None or sysroot is None or python is None or not python.is_file():
        missing = "qemu-aarch64-static" if qemu is None else f"the arm64 sysroot ({sysroot})"
        raise UnverifiableTarget(
            f"verifying cpu-aarch64 here needs ONNX Runtime's aarch64 build under qemu, and "
            f"{missing} is missing: run `{SETUP_AARCH64}` (or pass --unverified-target)"
        )
    if not (sysroot / "proc/cpuinfo").is_file():
        raise UnverifiableTarget(
            f"{sysroot} has no ARM /proc/cpuinfo (ONNX Runtime crashes without it): "
            f"run `{SETUP_AARCH64}` again"
        )
    return EmulatedRunner("cpu-aarch64", qemu, "cortex-a76", python, sysroot)


def _avx2_runner() -> EmulatedRunner:
    qemu = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if qemu is None:
        raise UnverifiableTarget(
            "verifying cpu-x86_64 on a VNNI machine runs its AVX2 kernels under qemu-x86_64: "
            "install Debian's qemu-user-static (or pass --unverified-target)"
        )
    return EmulatedRunner("cpu-x86_64", qemu, "Haswell", Path(sys.executable))


def _openvino_runner(target: str, host: Detected) -> NativeRunner:
    if host.arch != "x86_64":
        raise UnverifiableTarget(
            f"cannot verify {target} here: its models are checked on OpenVINO's x86-64 CPU "
            f"kernels and this machine is {host.describe()}"
        )
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise UnverifiableTarget(
            f"verifying {target} runs the model in OpenVINO, which is not installed here: "
            "pip install 'edge-agent[openvino]' (or pass --unverified-target)"
        ) from None
    return NativeRunner(target, host, runtime="openvino")


def runner_for(target: str, host: Detected | None = None) -> KernelRunner:
    """How this machine runs ``target``'s kernels.

    Raises:
        UnknownTarget: ``target`` is not a target name.
        UnverifiableTarget: no way to run them here; the message says what would.
    """
    if known_target(target).runtime == "rknn":
        raise UnverifiableTarget(
            f"{target} models are verified on rknn-toolkit2's simulator during their conversion: "
            f"`edge-models convert --target {target} --data DIR`, or `publish --target {target} "
            "--calib DIR`, which converts, gates and ships one build"
        )
    host = host or targets.detect()
    if known_target(target).runtime == "openvino":
        return _openvino_runner(target, host)
    if target == host.target:
        return NativeRunner(target, host)
    if target == "cpu-aarch64":
        return NativeRunner(target, host) if host.arch == "aarch64" else _aarch64_runner()
    if target == "cpu-x86_64" and host.target == "cpu-x86_64-vnni":
        return _avx2_runner()
    if target == "cpu-x86_64-vnni":
        reason = (
            f"this machine is {host.describe()}: without VNNI its int8 kernels compute other "
            "numbers, and no emulator here models VNNI; run the gate on a VNNI machine"
        )
    else:
        reason = f"its kernels do not run on this machine ({host.describe()}) nor under emulation"
    raise UnverifiableTarget(
        f"cannot verify {target} here: {reason} (or pass --unverified-target, recorded in the "
        "descriptor)"
    )
