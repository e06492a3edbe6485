"""Plain, slow reference implementations the fast paths are checked against."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.vision.preprocess import PAD_VALUE, Letterbox


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_force_nms(boxes, scores, classes, conf, iou_thr, max_det) -> list[int]:
    """Greedy class-wise NMS, written plainly (scores strictly above ``conf`` survive)."""
    kept = []
    for c in sorted(set(classes.tolist())):
        idx = [i for i in range(len(scores)) if classes[i] == c and scores[i] > conf]
        idx.sort(key=lambda i: -scores[i])
        chosen: list[int] = []
        for i in idx:
            if all(iou(boxes[i], boxes[j]) <= iou_thr for j in chosen):
                chosen.append(i)
        kept += chosen
    kept.sort(key=lambda i: -scores[i])
    return kept[:max_det]


def reference_tensor(image: np.ndarray, size: int) -> np.ndarray:
    """Letterbox done another way: resize, copyMakeBorder, blobFromImage."""
    box = Letterbox.fit(image.shape[1], image.shape[0], size, size)
    resized = cv2.resize(image, (box.new_w, box.new_h), interpolation=cv2.INTER_LINEAR)
    bordered = cv2.copyMakeBorder(
        resized,
        box.top,
        size - box.new_h - box.top,
        box.left,
        size - box.new_w - box.left,
        cv2.BORDER_CONSTANT,
        value=(PAD_VALUE,) * 3,
    )
    return cv2.dnn.blobFromImage(bordered, 1 / 255.0, swapRB=True)


def reference_detect(backend, image: np.ndarray, conf=0.25, iou_thr=0.45):
    """Independent end-to-end path: (label, score, x1, y1, x2, y2) in source pixels."""
    size = backend.info.imgsz[0]
    out = backend.infer(reference_tensor(image, size))[0].astype(np.float64)
    scores_all = out[4:]
    classes = scores_all.argmax(axis=0)
    scores = scores_all.max(axis=0)
    cand = np.flatnonzero(scores > conf)
    cx, cy, w, h = out[:4, cand]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = brute_force_nms(boxes, scores[cand], classes[cand], conf, iou_thr, 300)
    src_h, src_w = image.shape[:2]
    gain = min(size / src_w, size / src_h)
    pad_x = (size - round(src_w * gain)) // 2
    pad_y = (size - round(src_h * gain)) // 2
    rows = []
    for k in keep:
        x1, y1, x2, y2 = boxes[k]
        sx, sy = round(src_w * gain) / src_w, round(src_h * gain) / src_h
        rows.append(
            (
                backend.info.class_names[int(classes[cand][k])],
                float(scores[cand][k]),
                min(max((x1 - pad_x) / sx, 0), src_w),
                min(max((y1 - pad_y) / sy, 0), src_h),
                min(max((x2 - pad_x) / sx, 0), src_w),
                min(max((y2 - pad_y) / sy, 0), src_h),
            )
        )
    return rows


def yolo_labels(label_file: Path, width: int, height: int) -> list[tuple[int, np.ndarray]]:
    """YOLO-format ``class cx cy w h`` (normalised) -> (class, x1y1x2y2 pixels)."""
    boxes = []
    for line in label_file.read_text().splitlines():
        if not line.strip():
            continue
        c, cx, cy, w, h = line.split()
        cx, cy, w, h = float(cx) * width, float(cy) * height, float(w) * width, float(h) * height
        boxes.append((int(c), np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])))
    return boxes


# -- pycocotools: the oracle models/metrics.py is checked against --------------------------------
def coco_map(dataset, detections, class_map: dict[int, int]) -> tuple[float, float]:
    """mAP50-95 and mAP50 by pycocotools itself (stats[0], stats[1])."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    classes: set[int] = set()
    for index, sample in enumerate(dataset.samples):
        truth["images"].append({"id": index, "width": sample.width, "height": sample.height})
        for cls, (x, y, w, h) in sample.boxes:
            model_cls = class_map.get(cls, -1)
            classes.add(model_cls)
            truth["annotations"].append(
                {
                    "id": len(truth["annotations"]) + 1,
                    "image_id": index,
                    "category_id": model_cls,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    results = []
    for index, found in enumerate(detections):
        for d in found:
            classes.add(d.class_id)
            x1, y1, x2, y2 = d.box
            results.append(
                {
                    "image_id": index,
                    "category_id": d.class_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": d.score,
                }
            )
    truth["categories"] = [{"id": c} for c in sorted(classes)]
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = truth
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])
