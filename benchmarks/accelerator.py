"""Inference off the CPU: bare inference FPS and pipeline FPS on the 1080p demo video, per-stage
p50, for ONNX Runtime on the CPU, ONNX Runtime's CUDA provider and the TensorRT backend (INT8),
side by side in one run (rounds of bare inference and the pipeline alternate per runtime).

Goal: pipeline FPS >= 0.9 x min(bare inference FPS, 1000 / slowest CPU stage ms): with inference
on an accelerator, capture, letterbox and NMS must overlap it, so the pipeline runs at the pace of
its slowest stage. CPU stages are capture, preprocess and postprocess, their p50 inside the
running pipeline. Rows this machine cannot run (no CUDA provider, no TensorRT or GPU) are listed
with the reason, never faked.

The TensorRT row needs an INT8 QDQ model made for TensorRT (``edge-models quantize --target
jetson-orin``); pass it with --trt-model, or the script makes one from the shared fp32 model with
the frames in ../shared/images.

Usage: python benchmarks/accelerator.py [--frames 40] [--rounds 3] [--trt-model M] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import shared_dir_or_exit

from agent.bench import run_benchmark
from agent.config import ModelConfig
from agent.contract import AgentError
from agent.demo_inputs import DEMO_MODEL, open_demo_source
from agent.vision.backends import load_backend

CPU_STAGES = ("capture", "preprocess", "postprocess")


def rows_to_run(fp32: Path, trt_model: Path | None, shared: Path, work: Path) -> list[dict]:
    """Each row: a label, how to load it, or why it cannot run here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    cpu = ["CPUExecutionProvider"]
    rows: list[dict[str, Any]] = [
        row("ONNX Runtime CPU, fp32", "onnxruntime", fp32, providers=cpu),
    ]
    if "CUDAExecutionProvider" in available:
        cuda = ["CUDAExecutionProvider", *cpu]
        rows.append(row("ONNX Runtime CUDA, fp32", "onnxruntime", fp32, providers=cuda))
    else:
        reason = f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)})"
        rows.append({"label": "ONNX Runtime CUDA, fp32", "skip": reason})
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        rows.append({"label": "TensorRT INT8", "skip": f"tensorrt is not installed here ({exc})"})
        return rows
    if trt_model is None:
        trt_model = _quantize_for_tensorrt(fp32, shared, work)
    rows.append(row("TensorRT INT8", "tensorrt", trt_model, engine_cache_dir=work / "engines"))
    return rows


def row(label: str, backend: str, model: Path, **options: Any) -> dict[str, Any]:
    return {"label": label, "backend": backend, "model": model, "options": options}


def _quantize_for_tensorrt(fp32: Path, shared: Path, work: Path) -> Path:
    from models.calibration import synthesise
    from models.quantize import quantize
    from models.recipes import recipe

    synthesise(sorted((shared / "images").glob("*.jpg")), work / "calib", 16)
    out = work / "yolov8n-jetson-int8.onnx"
    quantize(fp32, work / "calib", out, recipe("jetson-orin"), target="jetson-orin")
    return out


def measure(planned: dict, frames: int, rounds: int, source: Any) -> dict:
    options = ModelConfig(path=planned["model"], backend=planned["backend"], **planned["options"])
    backend = load_backend(planned["backend"], planned["model"], options)
    try:
        report = run_benchmark(backend, source, frames, rounds)
    finally:
        backend.close()
    stages = report["stage_p50_ms"]
    slowest = max((stages.get(s) or 0.0) for s in CPU_STAGES)
    bound = min(report["bare_inference_fps"], 1000.0 / slowest if slowest else float("inf"))
    return {
        "label": planned["label"],
        "provider": report["model"]["provider"],
        "bare_fps": report["bare_inference_fps"],
        "pipeline_fps": report["pipeline_fps"],
        "stage_p50_ms": stages,
        "bound_fps": bound,
        "ratio_to_bound": report["pipeline_fps"] / bound,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trt-model", type=Path, help="QDQ INT8 ONNX for the TensorRT row")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    fp32 = shared / DEMO_MODEL
    results, skipped = [], []

    def demo() -> Any:
        return open_demo_source(None, args.shared, "fast")

    with tempfile.TemporaryDirectory(prefix="edge-accelerator-") as tmp:
        for planned in rows_to_run(fp32, args.trt_model, shared, Path(tmp)):
            if "skip" in planned:
                skipped.append(planned)
                continue
            try:
                results.append(measure(planned, args.frames, args.rounds, demo))
            except AgentError as exc:
                skipped.append({"label": planned["label"], "skip": str(exc)})
    stages = ("capture", "preprocess", "inference", "inference_device", "postprocess")
    print(f"{'runtime':<26} {'bare fps':>9} {'pipe fps':>9} {'bound':>7} {'pipe/bound':>10}  "
          + "  ".join(f"{s} p50" for s in stages))  # fmt: skip
    for r in results:
        p50 = "  ".join(
            f"{r['stage_p50_ms'].get(s):>{len(s) + 4}.1f}" if r["stage_p50_ms"].get(s) is not None
            else f"{'-':>{len(s) + 4}}" for s in stages
        )  # fmt: skip
        verdict = "PASS" if r["ratio_to_bound"] >= 0.9 else "MISS"
        print(f"{r['label']:<26} {r['bare_fps']:>9.1f} {r['pipeline_fps']:>9.1f} "
              f"{r['bound_fps']:>7.1f} {r['ratio_to_bound']:>9.3f} {verdict}  {p50}")  # fmt: skip
    for row in skipped:
        print(f"not run: {row['label']}: {row['skip']}")
    print("goal: pipeline fps >= 0.9 x min(bare inference fps, 1000 / slowest CPU stage p50 ms)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "not_run": skipped}, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
