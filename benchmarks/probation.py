"""How often probation sends back a good model, and how often it catches a bad one.

The real judge (``agent.updates.probation.judge``, default ``ota.probation`` limits) on windows of
real footage: the real fp32 YOLOv8n runs over the shared videos once, recording each frame's
inference time and detections. Each simulated probation picks a random swap point in a video, so
scene changes (people walking in and out of an empty room) and the load drift of this machine over
time are real. On top, load bursts like a busy shared machine's: on a random 5-15 % of inferences
one takes 2-4x longer, and the new model's first inference takes 5x (warming up).

Two ways of judging, side by side on the same footage:
- **recent past** (no pairs: models with different inputs): the previous model's 200 frames before
  the swap against the new model's 100 after it;
- **paired** (the default): every 2nd frame of the 100 runs through both models at the same moment
  (same load; a burst hits one of the two), the sign tests decide as soon as they can.

Scenarios: the same model again (every failure is false), a model 1.5x slower, and (paired only)
a model whose boxes are shifted by 30 px. A soft failure is sent back once and tried again
(``probation.retries``): a model is rejected for good only when two probations both fail.
Goals (issue 24): false rejection of an identical model < 1 %; a 1.5x slower model and a shifted
one sent back >= 95 %.

Usage: python benchmarks/probation.py [--trials 300] [--stride 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from common import shared_dir_or_exit

from agent.config import ModelConfig, ProbationConfig
from agent.updates.probation import EXTEND, PairedEvidence, judge
from agent.vision import (
    Detection,
    DetectionParams,
    PairedFrame,
    Preprocessor,
    decode,
    load_backend,
)
from agent.vision.stats import ModelStats

VIDEOS = ("one-by-one-person-detection.mp4", "person-bicycle-car-detection.mp4")
BEFORE, AFTER = 200, 100


def record(model: Path, video: Path, stride: int) -> list[tuple[float, list]]:
    """(inference ms, detections as [class, x1, y1, x2, y2]) for every ``stride``-th frame."""
    backend = load_backend("onnxruntime", model, ModelConfig(path=model))
    pre = Preprocessor(backend.info.imgsz, np.dtype(backend.info.input_dtype), pool_size=1)
    capture = cv2.VideoCapture(str(video))
    frames: list[tuple[float, bool]] = []
    index = 0
    while True:
        ok, image = capture.read()
        if not ok:
            break
        index += 1
        if index % stride:
            continue
        tensor, box = pre(image)
        started = time.perf_counter()
        output = backend.infer(tensor)
        millis = (time.perf_counter() - started) * 1000
        pre.pool.release(tensor)
        found = decode(output, box, DetectionParams(), backend.info.class_names)
        frames.append((millis, [[d.class_id, *d.box] for d in found]))
    capture.release()
    backend.close()
    return frames


def stats_of(
    frames: list[tuple[float, bool]], scale: float, bursts: float, rng, warm_up: bool
) -> ModelStats:
    """One model's counters over ``frames``: times x ``scale``, a share ``bursts`` of them
    slowed 2-4x by other work, the first one 5x when the model has just been loaded."""
    stats = ModelStats()
    for position, (millis, found) in enumerate(frames):
        value = millis * scale
        if rng.random() < bursts:
            value *= rng.uniform(2.0, 4.0)
        if warm_up and position == 0:
            value *= 5.0
        stats.inference.add(value)
        stats.frames += 1
        stats.empty += 0 if found else 1
    return stats


def detections(found: list, shift: float = 0.0) -> list[Detection]:
    return [Detection(int(c), str(c), 0.9, (x1 + shift, y1, x2 + shift, y2))
            for c, x1, y1, x2, y2 in found]  # fmt: skip


def paired_probation(footage, scale: float, shift: float, limits: ProbationConfig, rng):
    """The paired judge, looked at after every frame as the model manager does (it looks every
    0.25 s); the new model's counters grow frame by frame as they do live."""
    video = footage[rng.integers(len(footage))]
    swap = int(rng.integers(BEFORE, len(video) - EXTEND * AFTER))  # room to watch an empty scene
    bursts = rng.uniform(0.05, 0.15)
    old = stats_of(video[swap - BEFORE : swap], 1.0, bursts, rng, warm_up=False)
    new = ModelStats()
    evidence = PairedEvidence(warmup=limits.warmup_frames)
    verdict = None
    for index, (millis, found) in enumerate(video[swap : swap + EXTEND * AFTER]):
        load = [rng.uniform(2, 4) if rng.random() < bursts else 1.0 for _ in range(2)]
        new_ms = millis * scale * rng.uniform(0.97, 1.03) * load[0] * (5.0 if index == 0 else 1)
        new.inference.add(new_ms)
        new.frames += 1
        new.empty += 0 if found else 1
        if index % limits.pair_every == 0:
            evidence.add(PairedFrame(new_ms, millis * load[1], detections(found, shift),
                                     detections(found)))  # fmt: skip
        verdict = judge(new, old, (index + 1) / 10.0, limits, evidence)
        if verdict.state != "pending":
            return verdict
    return verdict


def recent_past_probation(footage, scale: float, limits: ProbationConfig, rng):
    video = footage[rng.integers(len(footage))]
    swap = int(rng.integers(BEFORE, len(video) - AFTER))
    bursts = rng.uniform(0.05, 0.15)
    old = stats_of(video[swap - BEFORE : swap], 1.0, bursts, rng, warm_up=False)
    new = stats_of(video[swap : swap + AFTER], scale, bursts, rng, warm_up=True)
    return judge(new, old, AFTER / 10.0, limits)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--stride", type=int, default=2, help="every Nth frame of the videos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--recording", type=Path,
                        help="keep the recorded frames here and reuse them next time")  # fmt: skip
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    model = shared / "models" / "yolov8n-coco-fp32.onnx"
    started = time.perf_counter()
    if args.recording is not None and args.recording.is_file():
        footage = json.loads(args.recording.read_text())
    else:
        footage = [record(model, shared / "videos" / name, args.stride) for name in VIDEOS]
        if args.recording is not None:
            args.recording.write_text(json.dumps(footage))
    footage = [frames for frames in footage if len(frames) > BEFORE + EXTEND * AFTER]
    if not footage:
        print("the shared videos are too short for a probation window", file=sys.stderr)
        return 2
    recorded = time.perf_counter() - started
    limits = ProbationConfig()
    rng = np.random.default_rng(args.seed)
    results: dict[str, dict[str, float]] = {}
    scenarios = (
        ("recent past: identical", 1.0, None),
        ("recent past: 1.5x slower", 1.5, None),
        ("paired: identical", 1.0, 0.0),
        ("paired: 1.5x slower", 1.5, 0.0),
        ("paired: boxes +30 px", 1.0, 30.0),
    )
    for name, scale, shift in scenarios:

        def once(scale=scale, shift=shift):
            if shift is None:
                return recent_past_probation(footage, scale, limits, rng)
            return paired_probation(footage, scale, shift, limits, rng)

        verdicts = [once() for _ in range(args.trials)]
        second = [once() for _ in range(args.trials)]
        failed = [v.state == "fail" for v in verdicts]
        rejected = [a and b.state == "fail" for a, b in zip(failed, second, strict=True)]
        rules = {"time": "x the previous", "blind": "blind", "late": "late",
                 "paired time": "same frames", "agreement": "disagrees"}  # fmt: skip
        results[name] = {
            "trials": args.trials,
            "sent_back": round(sum(failed) / args.trials, 4),
            "rejected_for_good": round(sum(rejected) / args.trials, 4),
            "inconclusive": round(
                sum(v.state == "inconclusive" for v in verdicts) / args.trials, 4
            ),
            "pending_at_the_end": round(
                sum(v.state == "pending" for v in verdicts) / args.trials, 4
            ),
            "by_rule": {
                rule: round(
                    sum(any(text in r for r in v.reasons) for v in verdicts) / args.trials, 4
                )
                for rule, text in rules.items()
            },
        }
    report = {
        "frames_recorded": sum(len(f) for f in footage),
        "recording_s": round(recorded, 1),
        "median_inference_ms": round(float(np.median([m for f in footage for m, _ in f])), 1),
        "scenarios": results,
        "goals": {
            "identical_rejected_below": 0.01,
            "slower_sent_back_at_least": 0.95,
        },
        "pass": results["paired: identical"]["rejected_for_good"] < 0.01
        and results["paired: 1.5x slower"]["sent_back"] >= 0.95
        and results["paired: boxes +30 px"]["sent_back"] >= 0.95,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"recorded {report['frames_recorded']} real frames in {report['recording_s']} s "
          f"(median inference {report['median_inference_ms']} ms)")  # fmt: skip
    for name, figures in results.items():
        rules = ", ".join(f"{k} {v:.1%}" for k, v in figures["by_rule"].items())
        print(f"{name:<26} sent back {figures['sent_back']:.1%} ({rules}), rejected for good "
              f"{figures['rejected_for_good']:.1%} ({figures['trials']} probations)")  # fmt: skip
    print("goals (paired): identical rejected < 1 %, 1.5x slower and shifted sent back >= 95 %: "
          + ("PASS" if report["pass"] else "MISS"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
