"""Issue 26: the tracker scored on a real labelled sequence (MOTA, IDF1, identity switches).

The shared YOLOv8n (fp32, ONNX Runtime, the agent's own letterbox, decode and NMS) detects every
frame of ../shared/tracking/<sequence> down to the tracker's low score; the agent's tracker
(agent/vision/tracking.py) follows the persons; motmetrics scores its confirmed boxes against the
sequence's ground truth at IoU >= 0.5 (the MOT Challenge's CLEAR and identity metrics). The same
detections scored untracked (every box its own id) show what tracking adds to identity.

Usage: python benchmarks/tracking.py [--sequence TUD-Campus] [--shared DIR]
"""

from __future__ import annotations

import argparse
import configparser
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import motmetrics
import numpy as np
from common import shared_dir_or_exit

from agent.config import ModelConfig
from agent.demo_inputs import DEMO_MODEL
from agent.vision import DetectionParams, box_iou, detect_image, load_backend
from agent.vision.tracking import Tracker, TrackerSettings

MIN_IOU = 0.5  # the MOT Challenge's match threshold


def ground_truth(sequence: Path) -> dict[int, list[tuple[int, tuple[float, ...]]]]:
    """frame -> [(id, x1, y1, x2, y2)] from a 2DMOT2015 gt.txt (frame,id,left,top,w,h,...)."""
    truth: dict[int, list[tuple[int, tuple[float, ...]]]] = defaultdict(list)
    for line in (sequence / "gt" / "gt.txt").read_text().splitlines():
        frame, ident, left, top, width, height = (float(v) for v in line.split(",")[:6])
        truth[int(frame)].append((int(ident), (left, top, left + width, top + height)))
    return truth


def distances(truth: list[tuple[float, ...]], found: list[tuple[float, ...]]) -> np.ndarray:
    """1 - IoU, NaN where the pair may not match (motmetrics' convention)."""
    table = np.full((len(truth), len(found)), np.nan)
    for i, a in enumerate(truth):
        for j, b in enumerate(found):
            iou = box_iou(a, b)
            if iou >= MIN_IOU:
                table[i, j] = 1 - iou
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence", default="TUD-Campus")
    parser.add_argument("--shared", type=Path)
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    sequence = shared / "tracking" / args.sequence
    if not (sequence / "gt" / "gt.txt").is_file():
        print(f"no MOT sequence with gt/gt.txt at {sequence}", file=sys.stderr)
        return 2
    info = configparser.ConfigParser()
    info.read(sequence / "seqinfo.ini")
    fps = float(info["Sequence"]["frameRate"])
    frames = sorted((sequence / info["Sequence"]["imDir"]).glob("*" + info["Sequence"]["imExt"]))
    truth = ground_truth(sequence)
    settings = TrackerSettings()
    model = shared / DEMO_MODEL
    backend = load_backend("onnxruntime", model, ModelConfig(path=model))
    person = next(i for i, name in backend.info.class_names.items() if name == "person")
    params = DetectionParams(confidence=settings.low_score, class_ids=frozenset({person}))
    tracker = Tracker(settings)
    tracked = motmetrics.MOTAccumulator(auto_id=True)
    untracked = motmetrics.MOTAccumulator(auto_id=True)
    next_untracked = 0
    for index, path in enumerate(frames, start=1):
        image = cv2.imread(str(path))
        detections = detect_image(backend, image, params)
        step = tracker.update(detections, index / fps)
        ids = [ident for ident, _ in truth.get(index, [])]
        boxes = [box for _, box in truth.get(index, [])]
        found = [t.box for t in step.matched]
        tracked.update(ids, [t.track_id for t in step.matched], distances(boxes, found))
        plain = [d.box for d in detections if d.score >= settings.high_score]
        plain_ids = list(range(next_untracked, next_untracked + len(plain)))
        next_untracked += len(plain)
        untracked.update(ids, plain_ids, distances(boxes, plain))
    backend.close()
    metrics = ["mota", "motp", "idf1", "num_switches", "mostly_tracked", "mostly_lost",
               "num_false_positives", "num_misses", "num_unique_objects"]  # fmt: skip
    summary = motmetrics.metrics.create().compute_many(
        [tracked, untracked], metrics=metrics, names=["tracker", "no tracking"]
    )
    print(f"{args.sequence}: {len(frames)} frames at {fps:g} fps, YOLOv8n fp32 (person), "
          f"MOT IoU >= {MIN_IOU}; tracker {settings}")  # fmt: skip
    print(f"{'':<12} {'MOTA':>6} {'IDF1':>6} {'MOTP':>6} {'IDsw':>5} {'MT':>4} {'ML':>4} "
          f"{'FP':>5} {'FN':>5} {'GT ids':>6}")  # fmt: skip
    for name, row in summary.iterrows():
        print(f"{name:<12} {row.mota:>6.3f} {row.idf1:>6.3f} {1 - row.motp:>6.3f} "
              f"{int(row.num_switches):>5} {int(row.mostly_tracked):>4} {int(row.mostly_lost):>4} "
              f"{int(row.num_false_positives):>5} {int(row.num_misses):>5} "
              f"{int(row.num_unique_objects):>6}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
