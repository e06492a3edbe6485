"""The demo: a short 1080p video synthesised from the real photos in ../shared, run end to end.

The video pans a 1920x1080 window across each photo, so the detector sees real objects moving
through the frame at camera resolution. It is cached by content, so repeated runs start at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from agent.contract.errors import AgentError
from agent.contract.files import atomic_path

DEMO_MODEL = "models/yolov8n-coco-fp32.onnx"
FRAME_SIZE = (1920, 1080)


def find_shared_dir(explicit: Path | None = None) -> Path | None:
    """``--shared`` (only that, when given), else $EDGE_AGENT_SHARED, else ../shared beside the
    project or the working directory."""
    if explicit is not None:
        return explicit.resolve() if (explicit / DEMO_MODEL).is_file() else None
    candidates = []
    if os.environ.get("EDGE_AGENT_SHARED"):
        candidates.append(Path(os.environ["EDGE_AGENT_SHARED"]))
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared")
    candidates.append(Path.cwd().parent / "shared")
    for candidate in candidates:
        if (candidate / DEMO_MODEL).is_file():
            return candidate.resolve()
    return None


def require_shared_dir(explicit: Path | None = None) -> Path:
    """Like ``find_shared_dir``, but raises LookupError saying what to pass instead."""
    folder = find_shared_dir(explicit)
    if folder is None:
        raise LookupError(missing_shared_message())
    return folder


def missing_shared_message() -> str:
    return (
        "the demo needs the shared data folder (../shared beside the project, or --shared DIR, or "
        "$EDGE_AGENT_SHARED) holding models/yolov8n-coco-fp32.onnx and images/. Without it, pass "
        "both yourself: edge-agent demo --model PATH/yolov8n-coco-fp32.onnx "
        "--source VIDEO_OR_IMAGE_FOLDER"
    )


def demo_images(shared: Path) -> list[Path]:
    images = sorted((shared / "images").glob("*.jpg"))
    images += sorted((shared / "datasets" / "coco8" / "images").glob("*/*.jpg"))
    return images


def pan_frames(
    image: np.ndarray, count: int, size: tuple[int, int] = FRAME_SIZE
) -> list[np.ndarray]:
    """``count`` frames of ``size`` sliding across ``image`` enlarged to cover them."""
    width, height = size
    scale = max(width / image.shape[1], height / image.shape[0]) * 1.15
    big = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    span_x, span_y = big.shape[1] - width, big.shape[0] - height
    frames = []
    for i in range(count):
        t = i / max(1, count - 1)
        x, y = round(span_x * t), round(span_y * (1 - t))
        frames.append(np.ascontiguousarray(big[y : y + height, x : x + width]))
    return frames


def synthesise_video(
    images: Sequence[Path], out_dir: Path, frames_per_image: int = 12, fps: float = 15.0
) -> Path:
    """Write (or reuse) the pan video over ``images``; returns its path."""
    if not images:
        raise AgentError("no images to build the demo video from")
    key = hashlib.sha256(
        repr(
            (
                [p.name for p in images],
                [p.stat().st_size for p in images],
                frames_per_image,
                fps,
                FRAME_SIZE,
            )
        ).encode()
    ).hexdigest()[:12]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"demo-1080p-{key}.mp4"
    if target.is_file() and target.stat().st_size > 0:
        return target
    with atomic_path(target, suffix=".mp4") as partial:  # OpenCV picks the container by name
        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, FRAME_SIZE)
        if not writer.isOpened():
            raise AgentError(f"OpenCV cannot write an mp4 video to {partial}")
        try:
            for path in images:
                image = cv2.imread(str(path))
                if image is None:
                    raise AgentError(f"cannot read demo image {path}")
                for frame in pan_frames(image, frames_per_image):
                    writer.write(frame)
        finally:
            writer.release()
    return target


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-agent"


def open_demo_source(uri: str | None, shared: Path | None, pace: str):
    """``uri`` if given, else the synthesised 1080p demo video.

    Raises:
        LookupError: no ``uri`` and no shared data folder to build the video from.
    """
    from agent.config import SourceConfig
    from agent.vision import open_source

    if uri is None:
        uri = str(synthesise_video(demo_images(require_shared_dir(shared)), cache_dir()))
    return open_source(SourceConfig(uri=uri, pace=pace))
