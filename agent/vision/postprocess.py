"""YOLOv8 detect-head decoding and class-aware NMS.

The head emits ``[1, 4 + nc, N]``: box centre/size in input pixels followed by per-class sigmoid
scores (no objectness). Suppression uses OpenCV's batched NMS, which keeps classes apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from agent.vision.preprocess import Letterbox, Preprocessor


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source pixels
    track_id: int | None = None  # the object it belongs to, when tracking follows it

    def to_dict(self) -> dict:
        record = {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 4),
            "box": [round(v, 1) for v in self.box],
        }
        if self.track_id is not None:
            record["track_id"] = self.track_id
        return record


@dataclass(frozen=True, slots=True)
class DetectionParams:
    """Thresholds, replaced as a whole when changed live (no torn reads across threads)."""

    confidence: float = 0.25
    iou: float = 0.45
    max_detections: int = 100
    class_ids: frozenset[int] | None = None

    @classmethod
    def from_config(cls, detection: Any, names: Mapping[int, str]) -> DetectionParams:
        """From a ``DetectionConfig`` and class names; ValueError on unknown classes."""
        return cls(
            confidence=detection.confidence,
            iou=detection.iou,
            max_detections=detection.max_detections,
            class_ids=resolve_classes(detection.classes, names),
        )


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def resolve_classes(
    wanted: Iterable[int | str] | None, names: Mapping[int, str]
) -> frozenset[int] | None:
    """Class ids for an allow-list of ids or names; unknown entries raise ValueError."""
    if wanted is None:
        return None
    by_name = {label: idx for idx, label in names.items()}
    ids: set[int] = set()
    unknown: list[str] = []
    for item in wanted:
        if isinstance(item, int) and item in names:
            ids.add(item)
        elif isinstance(item, str) and item in by_name:
            ids.add(by_name[item])
        elif isinstance(item, str) and item.isdigit() and int(item) in names:
            ids.add(int(item))
        else:
            unknown.append(repr(item))
    if unknown:
        raise ValueError(f"unknown classes {', '.join(unknown)} (model has {len(names)} classes)")
    return frozenset(ids)


def decode(
    output: np.ndarray,
    letterbox: Letterbox,
    params: DetectionParams,
    names: Mapping[int, str],
) -> list[Detection]:
    """Raw head output -> detections in source pixels, best first."""
    pred = output[0] if output.ndim == 3 else output
    scores = pred[4:]
    class_map: np.ndarray | None = None
    if params.class_ids is not None:
        class_map = np.fromiter(sorted(params.class_ids), dtype=np.int64)
        scores = scores[class_map]
    if scores.shape[0] == 0:
        return []
    best = scores.max(axis=0)
    keep = np.flatnonzero(best > params.confidence)
    if keep.size == 0:
        return []
    conf = best[keep]
    cls = scores[:, keep].argmax(axis=0)
    if class_map is not None:
        cls = class_map[cls]
    cxcywh = pred[:4, keep].T.astype(np.float64)
    xywh = cxcywh.copy()
    xywh[:, :2] -= cxcywh[:, 2:] / 2
    chosen = cv2.dnn.NMSBoxesBatched(
        xywh, conf.astype(np.float32), cls.astype(np.int32), params.confidence, params.iou
    )
    chosen = np.asarray(chosen, dtype=np.int64).reshape(-1)
    if chosen.size == 0:
        return []
    chosen = chosen[np.argsort(-conf[chosen], kind="stable")][: params.max_detections]
    xyxy = np.concatenate([xywh[chosen, :2], xywh[chosen, :2] + xywh[chosen, 2:]], axis=1)
    source_boxes = letterbox.to_source(xyxy)
    return [
        Detection(
            class_id=int(cls[i]),
            label=names.get(int(cls[i]), str(int(cls[i]))),
            score=float(conf[i]),
            box=tuple(float(v) for v in box),
        )
        for i, box in zip(chosen, source_boxes, strict=True)
    ]


def detect_image(
    backend: Any, image: np.ndarray, params: DetectionParams, pre: Preprocessor | None = None
) -> list[Detection]:
    """One image through letterbox, inference and decode (outside the pipeline: CLI, self-test).

    Pass ``pre`` to reuse one preprocessor (and its tensor) across many images.
    """
    if pre is None:
        pre = Preprocessor(backend.info.imgsz, np.dtype(backend.info.input_dtype), pool_size=1)
    tensor, box = pre(image, out=pre.pool.acquire())
    try:
        return decode(backend.infer(tensor), box, params, backend.info.class_names)
    finally:
        pre.pool.release(tensor)
