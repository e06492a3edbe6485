"""Fixtures for the device tests: cached images, the checkout's wheel, a booted board."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import _shared_dir as shared_dir
from tests.conftest import run_cli
from tests.device.nspawn import Device

ROOT = Path(__file__).resolve().parents[2]
VIDEO = "person-bicycle-car-detection.mp4"


def cached_image(arch: str) -> Path:
    """The device image for ``arch`` (built once, minutes; then only re-checked)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup-device-image.sh"), arch],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            f"this test needs the {arch} device image (bash scripts/setup-device-image.sh "
            f"{arch}), which did not build:\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout as a user gets it: its wheel, beside the pins it is installed with."""
    folder = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(folder), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shutil.copy(ROOT / "constraints.txt", folder / "constraints.txt")
    (wheel,) = folder.glob("edge_agent-*.whl")
    return wheel


def emulated(config: dict) -> dict:
    """The config for an arm64 board under qemu, where one 640 px inference takes seconds (a
    Raspberry Pi 5: 0.2 s): frames read as fast as they are processed, one frame queued between
    stages (a stop drains what is in flight), hang deadlines to match."""
    config["source"]["pace"] = "realtime"
    config["pipeline"] = {"queue_size": 1}
    config["watchdog"] = {"inference_timeout_s": 120, "stage_timeout_s": 60, "source_stall_s": 120}
    return config


def board(arch: str, workdir: Path, shared: Path, wheel: Path, *extra: tuple[Path, str]) -> Device:
    """A freshly flashed board: the image, with the shared data and the wheel in /srv."""
    workdir.mkdir(parents=True, exist_ok=True)
    binds = {shared: "/srv/shared", wheel.parent: "/srv/dist", **dict(extra)}
    return Device(cached_image(arch), workdir, arch, binds)


def install_as_a_user(device: Device, wheel: Path) -> None:
    """docs/install.md, "Install on a board": the wheel with the pins, then the service."""
    device.run("/opt/edge-agent/bin/pip", "install", "-c", "/srv/dist/constraints.txt",
               f"/srv/dist/{wheel.name}")  # fmt: skip
    device.run("/opt/edge-agent/bin/edge-agent", "service", "install")


def board_config(broker_port: int, device_id: str, **extra) -> dict:
    """The config a user writes to /etc/edge-agent/agent.yaml: a camera, the broker."""
    return {
        "device_id": device_id,
        "model": {"path": "/srv/shared/models/yolov8n-coco-fp32.onnx"},
        "source": {"uri": f"/srv/shared/videos/{VIDEO}", "pace": "live", "loop": True},
        "mqtt": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": broker_port,
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
            "telemetry_interval_s": 2,
        },
        **extra,
    }


def host_detections(tmp_path: Path, frame_id: int) -> list[dict]:
    """What `edge-agent run` on this host finds in frame ``frame_id`` of the video."""
    folder = tmp_path / "host-reference"
    folder.mkdir(exist_ok=True)
    config = {
        "device_id": "host",
        "state_dir": str(folder / "state"),
        "model": {"path": str(shared_dir() / "models" / "yolov8n-coco-fp32.onnx")},
        "source": {"uri": str(shared_dir() / "videos" / VIDEO), "pace": "fast"},
        "sinks": {"jsonl": str(folder / "out.jsonl"), "every_frame": True},
    }
    (folder / "agent.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", "-c", str(folder / "agent.yaml"), "--frames", str(frame_id + 1))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    return next(row["detections"] for row in rows if row["frame_id"] == frame_id)


def same_boxes(got: list[dict], expected: list[dict], pixels: float = 8.0) -> bool:
    """The same labels, each box within a few pixels (other kernels round differently)."""
    if sorted(d["label"] for d in got) != sorted(d["label"] for d in expected):
        return False
    return all(
        any(
            d["label"] == e["label"]
            and max(abs(a - b) for a, b in zip(d["box"], e["box"], strict=True)) <= pixels
            for e in expected
        )
        for d in got
    )
