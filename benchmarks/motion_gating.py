"""Issue 26: motion gating on real footage: detector calls and CPU saved, object events kept.

Each frame of a real clip (../shared/videos) goes two ways side by side, one frame at a time:
the detector on every frame, and the agent's motion gate (agent/vision/motion.py) deciding
whether the detector runs. Each way feeds its own scene (tracker + object events, the agent's
defaults). Printed: detector calls and CPU seconds of each way, and every object the ungated way
found that the gated way did not (same class, overlapping lifetime): a miss is an event lost.
Frames are timed by the clip's own clock (frame index / fps), as a live camera would deliver them.

Usage: python benchmarks/motion_gating.py [--clip one-by-one-person-detection.mp4] [--shared DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
from common import shared_dir_or_exit

from agent.config import ModelConfig
from agent.demo_inputs import DEMO_MODEL
from agent.vision import DetectionParams, Frame, Scene, detect_image, load_backend
from agent.vision.motion import MotionGate
from agent.vision.preprocess import Preprocessor

CONFIDENCE = 0.25  # the agent's default detection.confidence


def lifetimes(events: list[dict]) -> list[tuple[str, float, float]]:
    """(label, first seen, last seen) of every object that ended."""
    return [(e["label"], e["first_seen"], e["last_seen"]) for e in events if e["event"] == "end"]


def missed(full: list[tuple[str, float, float]], gated: list[tuple[str, float, float]],
           slack: float) -> list[tuple[str, float, float]]:  # fmt: skip
    """Objects of ``full`` with no object of the same class alive at an overlapping time."""
    return [
        (label, first, last)
        for label, first, last in full
        if not any(g[0] == label and g[1] <= last + slack and first <= g[2] + slack for g in gated)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="one-by-one-person-detection.mp4")
    parser.add_argument("--shared", type=Path)
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    clip = shared / "videos" / args.clip
    capture = cv2.VideoCapture(str(clip))
    if not capture.isOpened():
        print(f"cannot open {clip}", file=sys.stderr)
        return 2
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    model = shared / DEMO_MODEL
    backend = load_backend("onnxruntime", model, ModelConfig(path=model))
    pre = Preprocessor(backend.info.imgsz, backend.info.input_dtype, pool_size=1)
    scenes = {"every frame": Scene(args.clip), "motion gated": Scene(args.clip)}
    params = DetectionParams(confidence=scenes["every frame"].tracker.settings.low_score)
    gate = MotionGate()
    events: dict[str, list[dict]] = {name: [] for name in scenes}
    calls = dict.fromkeys(scenes, 0)
    with_boxes = dict.fromkeys(scenes, 0)  # detections messages: frames with a box shown
    cpu = dict.fromkeys(scenes, 0.0)
    index = 0
    while True:
        ok, image = capture.read()
        if not ok:
            break
        now = index / fps
        frame = Frame(image, index, now, now, args.clip)
        for name, scene in scenes.items():
            started = time.process_time()
            run = name == "every frame" or gate.admit(image, now, scene.busy())
            if run:
                detections = detect_image(backend, image, params, pre)
                seen = scene.observe(frame, detections, CONFIDENCE)
                events[name] += seen.events
                with_boxes[name] += bool(seen.detections)
                calls[name] += 1
            cpu[name] += time.process_time() - started
        index += 1
    for name, scene in scenes.items():
        events[name] += scene.close()
    backend.close()
    keepalive = gate.settings.keepalive_s
    lost = missed(lifetimes(events["every frame"]), lifetimes(events["motion gated"]), keepalive)
    print(f"{args.clip}: {index} frames at {fps:g} fps, YOLOv8n fp32 on ONNX Runtime, "
          f"gate {gate.settings}")  # fmt: skip
    print(f"{'':<14} {'detector calls':>14} {'CPU s':>7} {'objects':>7} {'events':>6} "
          f"{'detections msgs':>15}")  # fmt: skip
    for name in scenes:
        objects = len(lifetimes(events[name]))
        print(f"{name:<14} {calls[name]:>14} {cpu[name]:>7.1f} {objects:>7} "
              f"{len(events[name]):>6} {with_boxes[name]:>15}")  # fmt: skip
    print(f"gated / every frame: calls {calls['motion gated'] / calls['every frame']:.3f}, "
          f"CPU {cpu['motion gated'] / cpu['every frame']:.3f}; why frames ran: "
          f"{dict(gate.reasons)}")  # fmt: skip
    print(f"objects of the ungated run the gated run missed: {len(lost)} {lost}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
