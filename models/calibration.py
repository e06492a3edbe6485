"""Calibration images: read from a folder through the agent's letterbox, or synthesised.

Calibration must not use evaluation images. With only a few photos at hand, ``synthesise``
multiplies them into varied frames (crops at several scales, mirror images, exposure changes),
the way a camera sees the same scene at different framings and light.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.vision import IMAGE_SUFFIXES, Preprocessor
from models.errors import FactoryError

log = logging.getLogger(__name__)


def calibration_images(folder: Path, role: str = "calibration") -> list[Path]:
    """Every image in ``folder`` (recursively), checked to decode; ``role`` names the folder in
    messages (calibration, recovery frames).

    Raises:
        FactoryError: the folder is missing, empty, or holds an unreadable image.
    """
    if not folder.is_dir():
        raise FactoryError(f"{role} folder not found: {folder}")
    paths = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not paths:
        raise FactoryError(
            f"{role} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    unreadable = [p for p in paths if cv2.imread(str(p), cv2.IMREAD_REDUCED_COLOR_8) is None]
    if unreadable:
        names = ", ".join(str(p) for p in unreadable[:5])
        raise FactoryError(f"{len(unreadable)} {role} image(s) cannot be decoded: {names}")
    return paths


@dataclass
class SampledFrames:
    """Frames picked evenly from a user's folder, and what was passed over and why."""

    paths: list[Path]
    available: int  # images in the folder
    skipped: list[str] = field(default_factory=list)  # "path: reason", reported, not fatal


CALIBRATION_FRAMES = 300  # frames picked from a user's folder for INT8 ranges, unless told


def even_picks(total: int, count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over ``range(total)``, first and last included."""
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total))})


def sample_frames(folder: Path, count: int, role: str = "frames") -> SampledFrames:
    """Up to ``count`` images spread evenly over ``folder`` (sorted, recursive): a camera's
    frames in time order cover its hours and scenes that way. Files that are not images, and
    images that do not decode, are skipped and reported; it fails only when nothing is left.

    Raises:
        FactoryError: the folder is missing, holds no images, or none of those picked decode.
    """
    if count < 1:
        raise FactoryError(f"the number of {role} must be at least 1, not {count}")
    if not folder.is_dir():
        raise FactoryError(f"{role} folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [f"{p}: not an image" for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise FactoryError(
            f"{role} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    picks = even_picks(len(images), count)
    usable = []
    for path in (images[i] for i in picks):
        if cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_8) is None:
            skipped.append(f"{path}: cannot be decoded")
        else:
            usable.append(path)
    if not usable:
        raise FactoryError(
            f"none of the {len(picks)} {role} picked from {folder} can be decoded "
            f"(e.g. {skipped[-1]})"
        )
    return SampledFrames(usable, len(images), skipped)


def content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refuse_overlap(frames: list[Path], evaluation: list[Path], role: str = "recovery") -> None:
    """Raises FactoryError naming the first frame that is also an evaluation image."""
    judged = {content_hash(p): p for p in evaluation}
    for frame in frames:
        twin = judged.get(content_hash(frame))
        if twin is not None:
            raise FactoryError(
                f"{role} frame {frame} is the evaluation image {twin} (same content): learning "
                "from what the model is judged on makes its mAP meaningless; remove it"
            )


def tensors(paths: Sequence[Path], input_hw: tuple[int, int]) -> Iterator[dict[str, np.ndarray]]:
    """Model inputs exactly as the device makes them (the agent's letterbox)."""
    pre = Preprocessor(input_hw, pool_size=1)
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        tensor, _ = pre(image, out=np.empty((1, 3, *input_hw), np.float32))
        yield tensor


def synthesise(
    sources: Sequence[Path], out_dir: Path, per_image: int = 16, seed: int = 0
) -> list[Path]:
    """Write ``per_image`` varied frames of each source photo into ``out_dir``."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            raise FactoryError(f"cannot decode {source}")
        height, width = image.shape[:2]
        for i in range(per_image):
            frame = image if i == 0 else cv2.flip(image, 1) if i == 1 else None
            if frame is None:
                scale = rng.uniform(0.4, 0.95)
                cw, ch = int(width * scale), int(height * scale)
                x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
                frame = image[y : y + ch, x : x + cw]
                if rng.random() < 0.5:
                    frame = cv2.flip(frame, 1)
                frame = cv2.convertScaleAbs(
                    frame, alpha=rng.uniform(0.7, 1.3), beta=rng.uniform(-30, 30)
                )
            path = out_dir / f"{source.stem}-{i:03d}.jpg"
            cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 92])
            written.append(path)
    return written
