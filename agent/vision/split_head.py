"""The YOLOv8 head's last steps on the CPU, for runtimes that stop at the six head convolutions.

An NPU (RK3588's) runs the network only up to each level's two final convolutions: 4 x reg_max
DFL bins for the box and one logit per class, at strides 8, 16 and 32. Quantized to int8 as one
tensor the rest would not survive (the graph's last Concat mixes 0..640 pixels with 0..1 scores),
so it is done here in float, exactly as the exported graph does it: softmax over the bins, their
expectation as distances from the anchor centre, box centre and size times the stride, sigmoid of
the logits. The result has the full graph's ``[1, 4+nc, N]`` layout, so the usual decode and NMS
follow unchanged.
"""

from __future__ import annotations

import functools

import numpy as np

STRIDES = (8, 16, 32)


@functools.cache
def anchor_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of each cell's centre, row by row (computed once per map size, not per frame)."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ax = xs.reshape(-1).astype(np.float32) + 0.5
    ay = ys.reshape(-1).astype(np.float32) + 0.5
    ax.flags.writeable = ay.flags.writeable = False
    return ax, ay


def merge_split_head(
    maps: list[np.ndarray], strides: tuple[int, ...] = STRIDES, reg_max: int = 16
) -> np.ndarray:
    """``[box_8, cls_8, box_16, cls_16, box_32, cls_32]`` (``[1, C, H, W]``) -> ``[1, 4+nc, N]``.

    Raises:
        ValueError: the maps are not box/class pairs per stride of matching sizes.
    """
    if len(maps) != 2 * len(strides):
        raise ValueError(
            f"expected {2 * len(strides)} head maps (box, class per level), got {len(maps)}"
        )
    columns = []
    bins = np.arange(reg_max, dtype=np.float32)[None, :, None]
    for level, stride in enumerate(strides):
        box, cls = (np.asarray(m, dtype=np.float32) for m in maps[2 * level : 2 * level + 2])
        if (
            box.ndim != 4
            or cls.ndim != 4
            or box.shape[1] != 4 * reg_max
            or box.shape[2:] != cls.shape[2:]
        ):
            raise ValueError(
                f"level {level}: box {box.shape} and class {cls.shape} maps are not a "
                f"[1, {4 * reg_max}, H, W] / [1, nc, H, W] pair"
            )
        height, width = box.shape[2:]
        logits = box.reshape(4, reg_max, height * width)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        distance = (weights * bins).sum(axis=1) / weights.sum(axis=1)  # 4 x HW: l, t, r, b
        ax, ay = anchor_centres(height, width)
        x1, y1 = ax - distance[0], ay - distance[1]
        x2, y2 = ax + distance[2], ay + distance[3]
        xywh = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) * stride
        scores = 1.0 / (1.0 + np.exp(-cls.reshape(cls.shape[1], height * width)))
        columns.append(np.concatenate([xywh, scores]))
    return np.concatenate(columns, axis=1)[None].astype(np.float32)


def npu_input(tensor: np.ndarray) -> np.ndarray:
    """The letterboxed float NCHW 0..1 tensor as the uint8 NHWC image an .rknn takes (the model
    divides by 255 itself, as it was converted with std 255)."""
    return np.round(np.asarray(tensor)[0].transpose(1, 2, 0) * 255).astype(np.uint8)[None]
