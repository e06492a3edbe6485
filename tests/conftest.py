"""Shared fixtures: the real data in ../shared, the real model, and small test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.backends import load_backend
from agent.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    explicit = os.environ.get("EDGE_AGENT_SHARED")
    return Path(explicit) if explicit else ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    path = _shared_dir()
    needed = [path / "models" / "yolov8n-coco-fp32.onnx", path / "images" / "bus.jpg"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.fail(
            f"this test needs the shared data folder {path} (../shared beside the project, or "
            f"$EDGE_AGENT_SHARED); missing: {', '.join(missing)}",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def fp32_model(shared: Path) -> Path:
    return shared / "models" / "yolov8n-coco-fp32.onnx"


@pytest.fixture(scope="session")
def dynamic_model(shared: Path) -> Path:
    return shared / "models" / "yolov8n-coco-int8-dynamic.onnx"


@pytest.fixture(scope="session")
def fp32_backend(fp32_model: Path):
    backend = load_backend("onnxruntime", fp32_model, ModelConfig(path=fp32_model))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def dynamic_backend(dynamic_model: Path):
    backend = load_backend("onnxruntime", dynamic_model, ModelConfig(path=dynamic_model))
    yield backend
    backend.close()


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="session")
def bus_video(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-frame 640x480 video of the bus photo sliding sideways."""
    image = cv2.resize(cv2.imread(str(shared / "images" / "bus.jpg")), (720, 480))
    frames = [np.ascontiguousarray(image[:, i * 3 : i * 3 + 640]) for i in range(24)]
    return write_video(tmp_path_factory.mktemp("video") / "bus.mp4", frames)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
):
    """Run ``edge-agent`` as a user would, in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or ROOT,
    )
