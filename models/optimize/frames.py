"""Recovery frames: unlabelled images that pruning, distillation and QAT learn from, never ones the
model is judged on.

Edge users have plenty of frames from their own cameras and few labels, so the optimisation steps
learn from the float model's own outputs on such frames (distillation) and need no labels. A
frame that is also an evaluation image would make the before/after table lie, so a folder that
shares any image with the evaluation set (by content hash: a renamed copy counts) is refused.
Frames are letterboxed exactly as the agent does it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from agent.vision import Preprocessor
from models.errors import FactoryError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_paths(folder: Path) -> list[Path]:
    """The images in ``folder`` (recursively), sorted.

    Raises:
        FactoryError: not a folder, or no images in it.
    """
    if not folder.is_dir():
        raise FactoryError(f"--frames {folder} is not a folder of images")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FactoryError(f"--frames {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refuse_overlap(frames: list[Path], evaluation: list[Path]) -> None:
    """Raises FactoryError naming the first frame that is also an evaluation image."""
    judged = {content_hash(p): p for p in evaluation}
    for frame in frames:
        twin = judged.get(content_hash(frame))
        if twin is not None:
            raise FactoryError(
                f"recovery frame {frame} is the evaluation image {twin} (same content): training "
                "on what the model is judged on makes its mAP meaningless; remove it from --frames"
            )


def load_frames(paths: list[Path], imgsz: tuple[int, int]) -> np.ndarray:
    """The frames letterboxed as the agent feeds a model: ``[N, 3, H, W]`` float32 in 0..1.

    Raises:
        FactoryError: an image that cannot be decoded (named).
    """
    preprocess = Preprocessor(imgsz, pool_size=1)
    batch = np.empty((len(paths), 3, *imgsz), np.float32)
    for i, path in enumerate(paths):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FactoryError(f"recovery frame cannot be decoded: {path}")
        preprocess(image, out=batch[i : i + 1])
    return batch
