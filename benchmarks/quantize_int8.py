"""Issue 4 targets, fp32 vs INT8 side by side in one run, ONNX Runtime CPU on this machine:

- INT8 latency <= 0.5 x fp32 latency (interleaved: one inference per model per round);
- mAP50-95 drop <= 0.5 points on coco8 (fp32 reference 0.696);
- INT8 file size <= 0.3 x fp32.

Calibration uses only ../shared/images (bus.jpg, zidane.jpg), multiplied into 32 frames by crops,
mirror images and exposure changes; coco8 is evaluation only. Both INT8 schemes are made: S8S8
(the quantize default, for aarch64 and TensorRT) and U8S8 (for ONNX Runtime on x86-64), and the
shared int8-dynamic model is included.

Usage: python benchmarks/quantize_int8.py [--report DIR] [--rounds 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx
from common import shared_dir_or_exit

from agent.demo import DEMO_MODEL
from models.calibration import synthesise
from models.datasets import load_dataset
from models.evaluate import evaluate
from models.quantize import QuantizeSettings, fast_dfl_layout, quantize
from models.report import table, write_report

NOTES = """## Why static QDQ, and which scheme

- The shared `int8-dynamic` model (ConvInteger) quantizes activations at run time, on every
  inference: it is no faster than fp32 on the CPU, and ConvInteger runs on the CPU provider only.
- Static QDQ fixes the activation scales at calibration time, so ONNX Runtime fuses each
  DequantizeLinear -> Conv -> QuantizeLinear into one integer QLinearConv: that is the speed-up.
  QDQ is also what TensorRT and other accelerators read to build INT8 engines.
- On x86-64, ONNX Runtime's CPU provider fuses QDQ only with uint8 activations (U8S8); with int8
  activations (S8S8) it leaves float Convs wrapped in Q/DQ pairs (session option
  `session.qdqisint8allowed` is off by default on x86, on for ARM), which is slower than fp32.
  Ship U8S8 to x86-64 CPUs and S8S8 to aarch64 and TensorRT targets.
- The detect head's post-processing (DFL, box decode, the Concat that mixes 0..640 pixel boxes with
  0..1 scores) stays float: quantized with one scale, the scores collapse to 0.
- The INT8 models also carry a float-only rewrite of the DFL softmax onto the last axis (identical
  outputs, ~4 ms less on this CPU). `yolov8n-fp32-fast-dfl` is fp32 with the same rewrite, so the
  table shows INT8's own share of the speed-up too.
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--report", type=Path, help="also write report.md/json/png here")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    fp32 = shared / DEMO_MODEL
    dynamic = shared / "models" / "yolov8n-coco-int8-dynamic.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthesise(
            [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"], work / "calib", 16
        )
        u8s8, s8s8 = work / "yolov8n-int8-u8s8.onnx", work / "yolov8n-int8-s8s8.onnx"
        quantize(fp32, work / "calib", u8s8, QuantizeSettings(activations="uint8"), progress=False)
        quantize(fp32, work / "calib", s8s8, QuantizeSettings(activations="int8"), progress=False)
        # the INT8 models carry a float-only layout change of the DFL softmax (models/quantize.py);
        # fp32 with the same change shows how much of the speed-up is INT8's own
        same_layout = work / "yolov8n-fp32-fast-dfl.onnx"
        float_model = onnx.load(str(fp32))
        fast_dfl_layout(float_model)
        onnx.save(float_model, str(same_layout))
        dataset = load_dataset(shared / "datasets" / "coco8")
        results = evaluate(
            [fp32, u8s8, s8s8, dynamic, same_layout], dataset, latency_rounds=args.rounds
        )
        if args.report:
            write_report(results, dataset, args.report, NOTES)
    print(table(results))
    reference, ship = results[0], results[1]
    latency = ship.latency_p50_ms / reference.latency_p50_ms
    drop = (reference.map50_95 - ship.map50_95) * 100
    size = ship.size_bytes / reference.size_bytes

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print(
        f"\nINT8 (U8S8) latency / fp32 latency = {latency:.3f}   target <= 0.5  "
        f"{verdict(latency <= 0.5)}"
    )
    print(
        f"mAP50-95 drop = {drop:+.2f} points ({reference.map50_95:.4f} -> {ship.map50_95:.4f})   "
        f"target <= 0.5  {verdict(drop <= 0.5)}"
    )
    print(f"INT8 size / fp32 size = {size:.3f}   target <= 0.3  {verdict(size <= 0.3)}")
    s8, dyn, same = results[2], results[3], results[4]
    own = ship.latency_p50_ms / same.latency_p50_ms
    print(f"INT8 (U8S8) / fp32 with the same DFL layout = {own:.3f} (INT8's own share)")
    print(
        f"S8S8 on this x86 CPU: {s8.latency_p50_ms / reference.latency_p50_ms:.2f} x fp32; "
        f"int8-dynamic: {dyn.latency_p50_ms / reference.latency_p50_ms:.2f} x fp32"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
