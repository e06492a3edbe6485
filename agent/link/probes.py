"""System probes for telemetry: psutil, NVIDIA NVML, Jetson tegrastats, Rockchip NPU load.

A probe that cannot read on this machine reports nothing, never zeros: a dashboard must be able
to tell "GPU idle" from "no GPU". Each optional library is imported only when its probe starts.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

RKNPU_LOAD = Path("/sys/kernel/debug/rknpu/load")


class HostProbe:
    """CPU, memory, process RSS, load and temperatures through psutil."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline
        self._process.cpu_percent(interval=None)

    def read(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        data: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "process_cpu_percent": self._process.cpu_percent(interval=None),
            "memory_percent": memory.percent,
            "rss_bytes": self._process.memory_info().rss,
            "threads": self._process.num_threads(),  # a leak of either shows here first
            "open_fds": self._process.num_fds(),
            "load_1m": psutil.getloadavg()[0],
        }
        temperatures = self._temperatures()
        if temperatures:
            data["temperatures_c"] = temperatures
        return data

    @staticmethod
    def _temperatures() -> dict[str, float]:
        reader = getattr(psutil, "sensors_temperatures", None)
        if reader is None:
            return {}
        try:
            sensors = reader()
        except (OSError, RuntimeError):
            return {}
        found: dict[str, float] = {}
        for chip, entries in sensors.items():
            for i, entry in enumerate(entries):
                if entry.current is None:
                    continue
                label = entry.label or (chip if len(entries) == 1 else f"{chip}{i}")
                found[label] = round(float(entry.current), 1)
        return found


class NvmlProbe:
    """NVIDIA GPUs through NVML (nvidia-ml-py). Unavailable without a driver."""

    def __init__(self) -> None:
        import pynvml  # optional

        pynvml.nvmlInit()
        self._nvml = pynvml
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise RuntimeError("NVML sees no GPU")
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def read(self) -> list[dict[str, Any]]:
        nvml = self._nvml
        gpus = []
        for index, handle in enumerate(self._handles):
            gpu: dict[str, Any] = {"index": index, "name": _text(nvml.nvmlDeviceGetName(handle))}
            for key, call in (
                ("util_percent", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                ("memory_used_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                ("memory_total_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total),
                (
                    "temperature_c",
                    lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                ),
                ("power_w", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                with contextlib.suppress(nvml.NVMLError):  # not reported: leave it out
                    gpu[key] = call(handle)
            gpus.append(gpu)
        return gpus

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(mW)?/(\d+)(mW)?")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line (JetPack 4, 5 or 6) -> gpu util, RAM, CPU, temperatures, power rails.

    Sensors reported at -256 C are powered off and left out.
    """
    data: dict[str, Any] = {}
    if match := _RAM.search(line):
        data["ram_used_mb"], data["ram_total_mb"] = int(match.group(1)), int(match.group(2))
    if match := _CPU.search(line):
        cores = [c.split("%")[0] for c in match.group(1).split(",")]
        loads = [int(c) for c in cores if c.isdigit()]  # 'off' cores are skipped
        if loads:
            data["cpu_percent"] = round(sum(loads) / len(loads), 1)
    if match := _GPU.search(line):
        data["gpu_util_percent"] = int(match.group(1))
    temperatures = {
        name.lower(): float(value)
        for name, value in _TEMP.findall(line)
        if float(value) > -255 and not name.isdigit()
    }
    if temperatures:
        data["temperatures_c"] = temperatures
    rails = {
        name: int(current)
        for name, current, _, _, _ in _RAIL.findall(line)
        if name not in ("RAM", "SWAP")
    }
    if rails:
        data["power_mw"] = rails
    return data


class TegrastatsProbe:
    """Runs ``tegrastats`` and keeps its newest line parsed. Only on Jetson."""

    def __init__(self, interval_ms: int = 1000, binary: str | None = None) -> None:
        path = binary or shutil.which("tegrastats")
        if path is None:
            raise RuntimeError("tegrastats not found")
        self._latest: dict[str, Any] = {}
        self._process = subprocess.Popen(
            [path, "--interval", str(interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, name="tegrastats", daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            parsed = parse_tegrastats(line)
            if parsed:
                self._latest = parsed

    def read(self) -> dict[str, Any]:
        return dict(self._latest)

    def close(self) -> None:
        self._process.terminate()


def parse_rknpu_load(text: str) -> dict[str, Any]:
    """``NPU load:  Core0: 12%, Core1:  0%, Core2:  3%,`` (or ``NPU load: 25%``) -> load."""
    cores = {f"core{i}": int(v) for i, v in re.findall(r"Core(\d+):\s*(\d+)%", text)}
    if cores:
        return {"load_percent": round(sum(cores.values()) / len(cores), 1), "cores_percent": cores}
    if match := re.search(r"NPU load:\s*(\d+)%", text):
        return {"load_percent": int(match.group(1))}
    return {}


class RknpuProbe:
    """Rockchip RK3588 NPU load from debugfs (needs read access to /sys/kernel/debug)."""

    def __init__(self, path: Path = RKNPU_LOAD) -> None:
        self._path = path
        if not parse_rknpu_load(path.read_text()):
            raise RuntimeError(f"cannot parse {path}")

    def read(self) -> dict[str, Any]:
        try:
            return parse_rknpu_load(self._path.read_text())
        except OSError:
            return {}


class SystemProbes:
    """Every probe that works here; ``read()`` gives only what was actually measured."""

    def __init__(self, enable_tegrastats: bool = True) -> None:
        self.host = HostProbe()
        self.nvml = _try(NvmlProbe)
        self.tegrastats = _try(TegrastatsProbe) if enable_tegrastats else None
        self.rknpu = _try(RknpuProbe)

    def available(self) -> dict[str, bool]:
        return {
            "host": True,
            "nvml": self.nvml is not None,
            "tegrastats": self.tegrastats is not None,
            "rknpu": self.rknpu is not None,
        }

    def read(self) -> dict[str, Any]:
        data: dict[str, Any] = {"system": self.host.read()}
        if self.nvml is not None:
            data["gpus"] = self.nvml.read()
        if self.tegrastats is not None and (jetson := self.tegrastats.read()):
            data["jetson"] = jetson
        if self.rknpu is not None and (npu := self.rknpu.read()):
            data["npu"] = npu
        return data

    def close(self) -> None:
        for probe in (self.nvml, self.tegrastats):
            if probe is not None:
                probe.close()


def _try(factory: Any) -> Any:
    try:
        return factory()
    except Exception as exc:  # any failure means: this probe is absent here
        log.debug("probe %s unavailable: %s", factory.__name__, exc)
        return None
