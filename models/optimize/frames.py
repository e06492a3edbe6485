"""Recovery frames: unlabelled images that pruning, distillation and QAT learn from, never ones the
model is judged on.

Edge users have plenty of frames from their own cameras and few labels, so the optimisation steps
learn from the float model's own outputs on such frames (distillation) and need no labels. A
frame that is also an evaluation image would make the before/after table lie, so a folder that
shares any image with the evaluation set (by content hash: a renamed copy counts) is refused.
Frames are letterboxed exactly as the agent does it, and read from disk when a step needs them:
thousands of frames at the model's 640 px would be 17 GB held in memory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from agent.vision import Preprocessor
from models.calibration import calibration_images, content_hash, refuse_overlap, tensors
from models.errors import FactoryError

__all__ = ["FrameSet", "content_hash", "frame_paths", "load_frames", "refuse_overlap"]


def frame_paths(folder: Path) -> list[Path]:
    """The images in ``folder`` (recursively), sorted, each checked to decode.

    Raises:
        FactoryError: not a folder, no images in it, or an unreadable one.
    """
    return calibration_images(folder, "recovery frames")


def load_frames(paths: list[Path], imgsz: tuple[int, int]) -> np.ndarray:
    """The frames letterboxed as the agent feeds a model: ``[N, 3, H, W]`` float32 in 0..1."""
    return np.concatenate(list(tensors(paths, imgsz)))


class FrameSet:
    """Recovery frames on disk, letterboxed at ``size`` when indexed: ``frames[3:7]`` or
    ``frames[[5, 1]]`` give ``[N, 3, size, size]`` float32 in 0..1, as ``load_frames`` would."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size
        self._letterbox = Preprocessor((size, size), pool_size=1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, which: slice | Sequence[int]) -> np.ndarray:
        picks = range(len(self.paths))[which] if isinstance(which, slice) else which
        return self._stack([self._read(i) for i in picks])

    def augmented(self, picks: Sequence[int], generator: random.Random) -> np.ndarray:
        """The frames ``picks``, each a random crop (a third of its area or more, aspect 3:4 to
        4:3) mirrored half the time: the scales and framings a fixed camera's frames lack."""
        images = []
        for index in picks:
            image = self._read(index)
            height, width = image.shape[:2]
            area = generator.uniform(0.35, 1.0) * height * width
            aspect = generator.uniform(0.75, 4 / 3)
            crop_w = min(width, max(8, round((area * aspect) ** 0.5)))
            crop_h = min(height, max(8, round((area / aspect) ** 0.5)))
            left = generator.randrange(width - crop_w + 1)
            top = generator.randrange(height - crop_h + 1)
            image = image[top : top + crop_h, left : left + crop_w]
            images.append(image[:, ::-1] if generator.random() < 0.5 else image)
        return self._stack(images)

    def _read(self, index: int) -> np.ndarray:
        image = cv2.imread(str(self.paths[index]), cv2.IMREAD_COLOR)
        if image is None:  # checked when listed: the file changed since
            raise FactoryError(f"recovery frame {self.paths[index]} can no longer be decoded")
        return image

    def _stack(self, images: list[np.ndarray]) -> np.ndarray:
        batch = np.empty((len(images), 3, self.size, self.size), np.float32)
        for row, image in enumerate(images):
            self._letterbox(np.ascontiguousarray(image), out=batch[row : row + 1])
        return batch
