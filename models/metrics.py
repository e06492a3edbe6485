"""COCO-style mAP computed so that it can be resampled: per-class AP, and a paired bootstrap.

pycocotools gives one number per run; a claim such as "INT8 costs 0.4 points" needs an interval,
and recomputing pycocotools for hundreds of resamples of 990 images takes hours. Here each
detection is matched to the ground truth once (pycocotools' rules: per image and class the 100
best-scored detections, greedy best-IoU matching at each of the ten IoU thresholds 0.50..0.95,
101-point interpolated precision, classes without ground truth left out). A bootstrap resample
of the images is then a weight per image (how often it was drawn): true and false positives and
the number of ground-truth boxes are weighted sums, so each resample is a few cumulative sums.
``tests/test_metrics.py`` checks the unweighted figures against pycocotools itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100  # per image and class, as pycocotools' AP at maxDets=100
EPS = np.spacing(1)

Box = tuple[float, float, float, float]  # x, y, w, h in pixels


@dataclass
class ClassMatches:
    """One class's detections over the whole set, in pycocotools' order (score, stable)."""

    images: np.ndarray  # (n,) the image index of each detection
    hits: np.ndarray  # (thresholds, n) bool: a true positive at each IoU threshold
    truths: np.ndarray  # (images,) ground-truth boxes of this class per image


@dataclass
class Matches:
    """Every class that has ground truth in the set; the unit a bootstrap resamples."""

    image_count: int
    classes: dict[int, ClassMatches] = field(default_factory=dict)


def _iou(detections: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes, as pycocotools computes it (no +1 on widths)."""
    dx1, dy1 = detections[:, 0:1], detections[:, 1:2]
    dx2, dy2 = dx1 + detections[:, 2:3], dy1 + detections[:, 3:4]
    tx1, ty1 = truths[:, 0], truths[:, 1]
    tx2, ty2 = tx1 + truths[:, 2], ty1 + truths[:, 3]
    w = np.clip(np.minimum(dx2, tx2) - np.maximum(dx1, tx1), 0, None)
    h = np.clip(np.minimum(dy2, ty2) - np.maximum(dy1, ty1), 0, None)
    inter = w * h
    union = detections[:, 2:3] * detections[:, 3:4] + truths[:, 2] * truths[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _greedy_hits(ious: np.ndarray) -> np.ndarray:
    """(thresholds, detections) true positives: detections in score order each take the
    unmatched ground truth of highest IoU at or above the threshold (the last on a tie, as
    pycocotools does)."""
    count, width = ious.shape
    hits = np.zeros((len(IOU_THRESHOLDS), count), bool)
    reach = np.flatnonzero(ious.max(axis=1) >= IOU_THRESHOLDS[0])  # the rest never match
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(width, bool)
        for d in reach:
            row = np.where(taken, -1.0, ious[d])
            best = width - 1 - int(np.argmax(row[::-1]))
            if row[best] >= min(threshold, 1 - 1e-10):
                taken[best] = True
                hits[t, d] = True
    return hits


def match(
    truths: Sequence[Sequence[tuple[int, Box]]],
    detections: Sequence[Sequence[tuple[int, float, Box]]],
) -> Matches:
    """Match detections (class, score, xywh box) to ground truth (class, xywh box), per image.

    Class ids must already be in one space (the model's); classes with no ground truth anywhere
    are left out, as pycocotools leaves them out of the mean."""
    if len(truths) != len(detections):
        raise ValueError(f"{len(truths)} images of ground truth, {len(detections)} of detections")
    count = len(truths)
    classes = sorted({cls for boxes in truths for cls, _ in boxes})
    per_class: dict[int, tuple[list, list, list]] = {c: ([], [], []) for c in classes}
    counts = {c: np.zeros(count, np.int64) for c in classes}
    for index, (gt, found) in enumerate(zip(truths, detections, strict=True)):
        by_class: dict[int, list[tuple[float, Box]]] = {}
        for c, score, box in found:
            by_class.setdefault(c, []).append((score, box))
        for c, _ in gt:
            counts[c][index] += 1
        for cls, mine in by_class.items():
            if cls not in per_class:
                continue  # no ground truth of this class anywhere: not scored
            theirs = [box for c, box in gt if c == cls]
            order = np.argsort([-s for s, _ in mine], kind="mergesort")[:MAX_DETECTIONS]
            scores = np.array([mine[i][0] for i in order], np.float64)
            if theirs:
                boxes = np.array([mine[i][1] for i in order], np.float64)
                hits = _greedy_hits(_iou(boxes, np.array(theirs, np.float64)))
            else:
                hits = np.zeros((len(IOU_THRESHOLDS), len(order)), bool)
            per_class[cls][0].append(scores)
            per_class[cls][1].append(np.full(len(order), index))
            per_class[cls][2].append(hits)
    result = Matches(count)
    for cls in classes:
        scores, images, hits = per_class[cls]
        if scores:
            all_scores = np.concatenate(scores)
            order = np.argsort(-all_scores, kind="mergesort")
            merged = ClassMatches(np.concatenate(images)[order],
                                  np.concatenate(hits, axis=1)[:, order], counts[cls])  # fmt: skip
        else:
            empty = np.zeros((len(IOU_THRESHOLDS), 0), bool)
            merged = ClassMatches(np.zeros(0, np.int64), empty, counts[cls])
        result.classes[cls] = merged
    return result


def _class_ap(found: ClassMatches, weights: np.ndarray) -> np.ndarray:
    """(resamples, thresholds) AP of one class for each row of image ``weights``
    (resamples, images); NaN where a resample holds none of its ground truth."""
    positives = weights @ found.truths  # (resamples,)
    result = np.full((len(weights), len(IOU_THRESHOLDS)), np.nan)
    present = positives > 0
    if not present.any():
        return result
    result[present] = 0.0
    if found.images.size == 0:
        return result
    per_detection = weights[:, found.images]  # (resamples, n)
    for t in range(len(IOU_THRESHOLDS)):
        hit = found.hits[t]
        tp = np.cumsum(per_detection * hit, axis=1)
        fp = np.cumsum(per_detection * ~hit, axis=1)
        precision = tp / (tp + fp + EPS)
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the envelope
        for r in np.flatnonzero(present):
            recall = tp[r] / positives[r]
            at = np.searchsorted(recall, RECALL_POINTS, side="left")
            inside = at < recall.size
            result[r, t] = precision[r, at[inside]].sum() / RECALL_POINTS.size
    return result


@dataclass
class Scores:
    """mAP50-95 and mAP50 over the classes with ground truth, and each class's AP."""

    map50_95: float
    map50: float
    per_class: dict[int, tuple[float, float, int]]  # class -> (AP50-95, AP50, ground-truth boxes)


def scores(matches: Matches) -> Scores:
    """The figures pycocotools gives for the same detections (stats[0] and stats[1])."""
    weights = np.ones((1, matches.image_count))
    per_class = {}
    for cls, found in matches.classes.items():
        ap = _class_ap(found, weights)[0]
        per_class[cls] = (float(ap.mean()), float(ap[0]), int(found.truths.sum()))
    if not per_class:
        return Scores(0.0, 0.0, {})
    return Scores(
        float(np.mean([v[0] for v in per_class.values()])),
        float(np.mean([v[1] for v in per_class.values()])),
        per_class,
    )


def resampled_map(matches: Matches, weights: np.ndarray) -> np.ndarray:
    """mAP50-95 of each bootstrap resample (rows of ``weights``: draws per image)."""
    per_class = [_class_ap(found, weights).mean(axis=1) for found in matches.classes.values()]
    if not per_class:
        return np.zeros(len(weights))
    return np.nanmean(np.stack(per_class, axis=1), axis=1)


def bootstrap_weights(images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, images): how often each image was drawn, with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images))
    return np.stack([np.bincount(row, minlength=images) for row in draws]).astype(np.float64)


@dataclass(frozen=True)
class Interval:
    """A paired bootstrap 95 % interval of a mAP50-95 difference, in points."""

    points: float  # the difference on the whole set
    low: float
    high: float
    resamples: int

    def describe(self) -> str:
        return f"{self.points:+.2f} pt ({self.low:+.2f} … {self.high:+.2f})"


def paired_difference(
    reference: Matches, candidate: Matches, resamples: int = 200, seed: int = 0, block: int = 50
) -> Interval:
    """mAP50-95 of ``candidate`` minus ``reference`` on the same images, with a 95 % interval
    from resampling the images (the same draws for both: their errors on hard images cancel)."""
    if reference.image_count != candidate.image_count:
        raise ValueError("the two models were evaluated on different image sets")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    weights = bootstrap_weights(reference.image_count, resamples, seed)
    differences = []
    for start in range(0, resamples, block):  # bounded memory: (block, detections) at a time
        rows = weights[start : start + block]
        differences.append(resampled_map(candidate, rows) - resampled_map(reference, rows))
    spread = np.concatenate(differences) * 100
    point = (scores(candidate).map50_95 - scores(reference).map50_95) * 100
    low, high = np.percentile(spread, [2.5, 97.5])
    return Interval(round(point, 3), round(float(low), 3), round(float(high), 3), resamples)
