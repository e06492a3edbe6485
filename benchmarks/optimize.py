"""Model optimisation, before and after, in one run (long: not in CI).

Rows: the shared fp32 model; PTQ (this machine's INT8 recipe); prune + distill (`edge-models
prune`, --ratio (40 %) at --round-to 8 in --stages, --steps of recovery); prune + distill + PTQ;
QAT (`edge-models qat`, --qat-steps of fake-quantized fine-tuning with distillation from fp32).
Recovery frames are made only from ../shared/images (bus.jpg, zidane.jpg, multiplied into varied
crops by `calibration-set`), never from coco8, which is evaluation only; `--data coco8` checks
that. Each row: size, parameters, latency ratio to fp32 and FPS (interleaved on this CPU),
mAP50-95 and mAP50 on coco8, agreement with fp32.

Goals on this CPU: prune + distill + INT8 <= 0.4 x fp32 latency; its mAP50-95 drop as small as
the recovery budget allows, stated with the steps and the hardware.

Usage: python benchmarks/optimize.py [--steps 300] [--qat-steps 100] [--ratio 0.4] [--stages 3]
       [--rounds 40] [--report DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import shared_dir_or_exit

from agent.contract import detect
from agent.demo_inputs import DEMO_MODEL
from models.calibration import synthesise


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="recovery steps (300)")
    parser.add_argument("--qat-steps", type=int, default=100, help="QAT steps (100)")
    parser.add_argument("--ratio", type=float, default=0.4, help="pruning ratio (0.4)")
    parser.add_argument("--stages", type=int, default=3, help="pruning stages (3)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--report", type=Path, help="keep the report (and models) here")
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    host = detect()
    photos = [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]
    with tempfile.TemporaryDirectory(prefix="edge-optimize-") as tmp:
        work = Path(tmp)
        synthesise(photos, work / "frames", 64)  # calibration and recovery frames: never coco8
        report = args.report or work / "report"
        done = subprocess.run(
            [sys.executable, "-m", "models.cli", "optimize", "--model", str(shared / DEMO_MODEL),
             "--frames", str(work / "frames"), "--data", str(shared / "datasets" / "coco8"),
             "--target", host.target, "--report", str(report), "--ratio", str(args.ratio),
             "--steps", str(args.steps), "--stages", str(args.stages),
             "--qat-steps", str(args.qat_steps),
             "--rounds", str(args.rounds), "--overwrite"],
            text=True,
        )  # fmt: skip
        if done.returncode != 0:
            return done.returncode
        models = json.loads((report / "report.json").read_text())["models"]
    print(f"\nCPU: {host.describe()}; pruning {args.ratio:.0%} in {args.stages} stages, recovery: "
          f"{args.steps} steps, QAT: {args.qat_steps} steps, "
          "at 320 px on 128 frames made from bus.jpg and zidane.jpg, on this CPU")  # fmt: skip
    source, final = models[0], next(m for m in models if m["name"].startswith("prune+ptq"))
    ratio = final["latency_p50_ms"] / source["latency_p50_ms"]
    drop = (source["map50_95"] - final["map50_95"]) * 100
    print(f"prune+distill+PTQ: latency {ratio:.3f} x fp32 (goal <= 0.4) "
          f"{'PASS' if ratio <= 0.4 else 'MISS'}; mAP50-95 drop {drop:+.2f} points")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
