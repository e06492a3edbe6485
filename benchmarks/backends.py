"""Issue 13: the runtimes that run here, fp32 and INT8, side by side in one run.

ONNX Runtime and OpenVINO each run the shared fp32 YOLOv8n and this machine's INT8 recipe (QDQ,
`edge-models quantize`), interleaved one inference per model per round so the shared host's
noise weighs on all alike; each gets its coco8 mAP through the agent's own letterbox, decode and
NMS, and its agreement with ONNX Runtime fp32. Then the RK3588 INT8 .rknn (`edge-models convert
--target rk3588`) gets its coco8 mAP on rknn-toolkit2's simulator (accuracy only). Calibration
uses only ../shared/images.

Usage: python benchmarks/backends.py [--rounds 60] [--shared DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import shared_dir_or_exit

from agent.contract import detect
from agent.demo_inputs import DEMO_MODEL
from agent.vision import available_backends
from models.calibration import synthesise
from models.datasets import load_dataset
from models.evaluate import evaluate
from models.quantize import quantize
from models.recipes import recipe

RUNTIMES = ("onnxruntime", "openvino")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--shared", type=Path)
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    host = detect()
    here = available_backends()
    missing = [name for name in RUNTIMES if here.get(name) != "available"]
    if missing:
        print(f"cannot run {', '.join(missing)}: {here}", file=sys.stderr)
        return 2
    fp32 = shared / DEMO_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthesise([shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"],
                   work / "calib", 16)  # fmt: skip
        int8 = work / f"int8-{host.target}.onnx"
        quantize(fp32, work / "calib", int8, recipe(host.target), progress=False,
                 target=host.target)  # fmt: skip
        models = [fp32, int8] * len(RUNTIMES)
        runtimes = [name for name in RUNTIMES for _ in (fp32, int8)]
        results = evaluate(
            models, load_dataset(shared / "datasets" / "coco8"), args.rounds, runtimes=runtimes
        )
    reference = results[0]
    print(f"{'runtime':<12} {'model':<8} {'mAP50-95':>8} {'mAP50':>6} {'p50 ms':>7} "
          f"{'x ORT fp32':>10} {'x own fp32':>10} {'agreement':>9}")  # fmt: skip
    for i, result in enumerate(results):
        own_fp32 = results[i - i % 2]
        print(
            f"{result.backend:<12} {result.precision:<8} {result.map50_95:>8.4f} "
            f"{result.map50:>6.3f} {result.latency_p50_ms:>7.1f} "
            f"{result.latency_p50_ms / reference.latency_p50_ms:>10.3f} "
            f"{result.latency_p50_ms / own_fp32.latency_p50_ms:>10.3f} "
            f"{(result.agreement if result.agreement is not None else 1.0):>9.3f}"
        )
    print(f"\nCPU: {host.describe()}; {args.rounds} interleaved rounds; coco8 (8 images)")
    print(rknn_row(shared, fp32, reference.map50_95))
    return 0


def rknn_row(shared: Path, fp32: Path, float_map: float) -> str:
    """The RK3588 INT8 model's coco8 mAP on rknn-toolkit2's simulator (accuracy only: the
    simulator's speed says nothing of the NPU's)."""
    from agent.config import ModelConfig
    from agent.vision import load_backend
    from models.convert.rknn import convert
    from models.errors import FactoryError
    from models.evaluate import letterboxed, outputs_matches
    from models.metrics import scores

    dataset = load_dataset(shared / "datasets" / "coco8")
    reference = load_backend("onnxruntime", fp32, ModelConfig(path=fp32))
    names = reference.info.class_names
    items = list(letterboxed(reference, dataset))  # coco8: 8 images
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthesise([shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"],
                   work / "calib", 16)  # fmt: skip
        try:
            done = convert(fp32, work / "calib", work / "m.rknn", [t for t, _ in items])
        except FactoryError as exc:
            return f"RKNN (RK3588 NPU) simulator: not run: {exc}"
    figures = scores(outputs_matches(dataset, done.outputs, [box for _, box in items], names))
    map50_95, map50 = figures.map50_95, figures.map50
    return (
        f"RKNN rk3588 int8, rknn-toolkit2 simulator: mAP50-95 {map50_95:.4f} (fp32 "
        f"{float_map:.4f}, {100 * (map50_95 - float_map):+.2f} points), mAP50 {map50:.3f}; "
        "speed needs a board"
    )


if __name__ == "__main__":
    sys.exit(main())
