"""Letterbox frames into the model's input tensor, and map boxes back to source pixels.

The hot path writes into preallocated buffers: one uint8 canvas, one resize buffer per source size,
and a small pool of input tensors. The pool exists because stages overlap: inference may still be
reading tensor N while preprocess fills tensor N+1.
"""

from __future__ import annotations

import queue
import weakref
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114


@dataclass(frozen=True, slots=True)
class Letterbox:
    """How a source image was placed into the model input: scale, then offset."""

    src_w: int
    src_h: int
    dst_w: int
    dst_h: int
    new_w: int
    new_h: int
    left: int
    top: int

    @classmethod
    def fit(cls, src_w: int, src_h: int, dst_w: int, dst_h: int) -> Letterbox:
        if src_w <= 0 or src_h <= 0:
            raise ValueError(f"image size must be positive, got {src_w}x{src_h}")
        ratio = min(dst_w / src_w, dst_h / src_h)
        new_w = min(dst_w, max(1, round(src_w * ratio)))
        new_h = min(dst_h, max(1, round(src_h * ratio)))
        left = (dst_w - new_w) // 2
        top = (dst_h - new_h) // 2
        return cls(src_w, src_h, dst_w, dst_h, new_w, new_h, left, top)

    @property
    def scale_x(self) -> float:
        return self.new_w / self.src_w

    @property
    def scale_y(self) -> float:
        return self.new_h / self.src_h

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Source-pixel x1,y1,x2,y2 boxes -> model-input pixels."""
        out = np.asarray(boxes, dtype=np.float64).copy()
        out[..., 0::2] = out[..., 0::2] * self.scale_x + self.left
        out[..., 1::2] = out[..., 1::2] * self.scale_y + self.top
        return out

    def to_source(self, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Model-input x1,y1,x2,y2 boxes -> source pixels (the exact inverse of ``to_input``)."""
        out = np.asarray(boxes, dtype=np.float64).copy()
        out[..., 0::2] = (out[..., 0::2] - self.left) / self.scale_x
        out[..., 1::2] = (out[..., 1::2] - self.top) / self.scale_y
        if clip:
            np.clip(out[..., 0::2], 0, self.src_w, out=out[..., 0::2])
            np.clip(out[..., 1::2], 0, self.src_h, out=out[..., 1::2])
        return out


class TensorPool:
    """A fixed set of input tensors handed out and returned; never allocates after start."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, size: int) -> None:
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.size = size
        for _ in range(size):
            self._free.put(np.empty(shape, dtype=dtype))

    def acquire(self, timeout: float | None = None) -> np.ndarray:
        """Raises queue.Empty when no tensor came back within ``timeout``."""
        return self._free.get(timeout=timeout)

    def release(self, tensor: np.ndarray) -> None:
        self._free.put(tensor)


class Preprocessor:
    """BGR frame -> letterboxed RGB NCHW tensor scaled to 0..1.

    Each tensor remembers the letterbox layout its padding was painted for, so a steady stream of
    same-sized frames only converts the image region: no padding work, no canvas copy. The memory
    is held by a weak reference, not by ``id()`` alone: a caller's buffer that is freed and
    replaced by a new one at the same address must be painted again (issue 27).
    """

    def __init__(self, input_hw: tuple[int, int], dtype: np.dtype = np.float32, pool_size: int = 4):
        self.input_h, self.input_w = input_hw
        self.dtype = np.dtype(dtype)
        self.pool = TensorPool((1, 3, self.input_h, self.input_w), self.dtype, pool_size)
        self._painted: dict[int, tuple[weakref.ref, Letterbox]] = {}
        self._resized: dict[tuple[int, int], np.ndarray] = {}
        self._scale = self.dtype.type(1.0 / 255.0)
        self._pad = self.dtype.type(PAD_VALUE / 255.0)

    def _fit(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        if image is None or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
            shape = None if image is None else image.shape
            raise ValueError(f"expected an HxWx3 BGR image, got shape {shape}")
        src_h, src_w = image.shape[:2]
        box = Letterbox.fit(src_w, src_h, self.input_w, self.input_h)
        if (box.new_w, box.new_h) == (src_w, src_h):
            return image, box
        resized = self._resized.get((box.new_w, box.new_h))
        if resized is None:
            resized = np.empty((box.new_h, box.new_w, 3), dtype=np.uint8)
            self._resized[(box.new_w, box.new_h)] = resized
        cv2.resize(image, (box.new_w, box.new_h), dst=resized, interpolation=cv2.INTER_LINEAR)
        return resized, box

    def _is_painted(self, tensor: np.ndarray, box: Letterbox) -> bool:
        known = self._painted.get(id(tensor))
        return known is not None and known[0]() is tensor and known[1] == box

    def _remember(self, tensor: np.ndarray, box: Letterbox) -> None:
        key = id(tensor)
        forget = lambda _ref: self._painted.pop(key, None)  # noqa: E731 - the array was freed
        self._painted[key] = (weakref.ref(tensor, forget), box)

    def __call__(
        self, image: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, Letterbox]:
        """Write the model input for ``image`` into ``out`` (or a pooled tensor) and return it.

        A pooled tensor must be given back with ``self.pool.release`` once inference is done.

        Raises:
            ValueError: the image is not an HxWx3 array.
        """
        fitted, box = self._fit(image)
        tensor = self.pool.acquire() if out is None else out
        if not self._is_painted(tensor, box):
            tensor.fill(self._pad)
            self._remember(tensor, box)
        region = tensor[0, :, box.top : box.top + box.new_h, box.left : box.left + box.new_w]
        # HWC BGR uint8 -> CHW RGB scaled, in one pass into the tensor's image region.
        np.multiply(fitted.transpose(2, 0, 1)[::-1], self._scale, out=region, casting="unsafe")
        return tensor, box
