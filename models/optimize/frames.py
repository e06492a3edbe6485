"""Recovery frames: unlabelled images that pruning, distillation and QAT learn from, never ones the
model is judged on.

Edge users have plenty of frames from their own cameras and few labels, so the optimisation steps
learn from the float model's own outputs on such frames (distillation) and need no labels. A
frame that is also an evaluation image would make the before/after table lie, so a folder that
shares any image with the evaluation set (by content hash: a renamed copy counts) is refused.
Frames are letterboxed exactly as the agent does it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.calibration import calibration_images, content_hash, refuse_overlap, tensors

__all__ = ["content_hash", "frame_paths", "load_frames", "refuse_overlap"]


def frame_paths(folder: Path) -> list[Path]:
    """The images in ``folder`` (recursively), sorted, each checked to decode.

    Raises:
        FactoryError: not a folder, no images in it, or an unreadable one.
    """
    return calibration_images(folder, "recovery frames")


def load_frames(paths: list[Path], imgsz: tuple[int, int]) -> np.ndarray:
    """The frames letterboxed as the agent feeds a model: ``[N, 3, H, W]`` float32 in 0..1."""
    return np.concatenate(list(tensors(paths, imgsz)))
