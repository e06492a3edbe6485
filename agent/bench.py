"""The performance figures for ``edge-agent bench`` and benchmarks/: all measured in one run.

Bare inference runs ``backend.infer`` on one fixed tensor in a tight loop; the pipeline runs the
full overlapped loop over a 1080p source flat out with the same backend. The two alternate over a
number of short rounds, and each side's FPS is its frames over its time summed across all rounds,
so slow spells on a shared machine weigh on both sides alike. Pre/postprocess cost is also timed
alone on a real 1080p frame, since inside the pipeline their wall time includes waiting for the
cores that inference holds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from agent.config import DetectionConfig, PipelineConfig
from agent.vision import Backend, DetectionParams, FrameSource, Pipeline, Preprocessor, decode


def bare_inference(backend: Backend, frames: int, warmup: int = 3) -> dict[str, float]:
    rng = np.random.default_rng(0)
    tensor = rng.random(backend.info.input_shape, dtype=np.float32).astype(backend.info.input_dtype)
    for _ in range(warmup):
        backend.infer(tensor)
    timings = np.empty(frames)
    started = time.perf_counter()
    for i in range(frames):
        t0 = time.perf_counter()
        backend.infer(tensor)
        timings[i] = time.perf_counter() - t0
    elapsed = time.perf_counter() - started
    return {
        "fps": frames / elapsed,
        "frames": frames,
        "seconds": elapsed,
        "p50_ms": float(np.percentile(timings, 50) * 1000),
    }


def pipeline_run(backend: Backend, source: FrameSource, frames: int) -> dict[str, Any]:
    pipeline = Pipeline(
        source,
        lambda: backend,
        [],
        DetectionConfig(),
        PipelineConfig(summary_interval_s=3600),
        max_frames=frames,
    )
    pipeline.run()
    if pipeline.error is not None:
        raise pipeline.error
    snap = pipeline.stats.snapshot()
    stats = pipeline.stats
    return {
        "fps": snap["fps_out"] or 0.0,
        "steady_frames": max(0, stats.frames_out - 1),
        "steady_seconds": (stats.last_out or 0.0) - (stats.first_out or 0.0),
        "frames": snap["frames_out"],
        "stage_p50_ms": {stage: values["p50"] for stage, values in snap["latency_ms"].items()},
        "dropped": snap["dropped"],
        "errors": snap["errors"],
    }


def isolated_pre_post(backend: Backend, image: np.ndarray, repeats: int = 50) -> dict[str, float]:
    """p50 of preprocess and of postprocess on one real frame, one thread, nothing else running."""
    pre = Preprocessor(backend.info.imgsz, np.dtype(backend.info.input_dtype), pool_size=1)
    tensor = pre.pool.acquire()
    tensor, box = pre(image, out=tensor)
    output = backend.infer(tensor)
    params = DetectionParams()
    pre_ms, post_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pre(image, out=tensor)
        t1 = time.perf_counter()
        decode(output, box, params, backend.info.class_names)
        t2 = time.perf_counter()
        pre_ms.append((t1 - t0) * 1000)
        post_ms.append((t2 - t1) * 1000)
    return {
        "preprocess_p50_ms": statistics.median(pre_ms),
        "postprocess_p50_ms": statistics.median(post_ms),
        "sum_p50_ms": statistics.median(pre_ms) + statistics.median(post_ms),
    }


def run_benchmark(
    backend: Backend, open_source: Any, frames: int, rounds: int = 3
) -> dict[str, Any]:
    """Alternate bare inference and the pipeline ``rounds`` times.

    ``open_source()`` must give a fresh source for each round.
    """
    per_round = []
    first_frame = None
    for _ in range(rounds):
        bare = bare_inference(backend, max(5, frames // 2), warmup=1)
        source = open_source()
        try:
            if first_frame is None:
                probe = source.read(timeout=5.0)
                first_frame = None if probe is None else probe.image
            pipe = pipeline_run(backend, source, frames)
        finally:
            source.close()
        per_round.append({"bare": bare, "pipeline": pipe, "ratio": pipe["fps"] / bare["fps"]})
    if first_frame is None:
        raise ValueError("the benchmark source gave no frame")
    bare_fps = sum(r["bare"]["frames"] for r in per_round) / sum(
        r["bare"]["seconds"] for r in per_round
    )
    pipe_fps = sum(r["pipeline"]["steady_frames"] for r in per_round) / sum(
        r["pipeline"]["steady_seconds"] for r in per_round
    )
    in_pipeline = {
        stage: statistics.median(r["pipeline"]["stage_p50_ms"][stage] or 0.0 for r in per_round)
        for stage in per_round[0]["pipeline"]["stage_p50_ms"]
    }
    return {
        "model": backend.info.summary(),
        "source_frame": {"width": int(first_frame.shape[1]), "height": int(first_frame.shape[0])},
        "rounds": per_round,
        "bare_inference_fps": bare_fps,
        "pipeline_fps": pipe_fps,
        "pipeline_over_bare": pipe_fps / bare_fps,
        "stage_p50_ms": in_pipeline,
        "pre_post_p50_ms_in_pipeline": (in_pipeline["preprocess"] or 0)
        + (in_pipeline["postprocess"] or 0),
        "pre_post_isolated": isolated_pre_post(backend, first_frame),
    }


def print_bench(report: dict[str, Any]) -> None:
    model, frame, alone = report["model"], report["source_frame"], report["pre_post_isolated"]
    print(f"model                 {model['name']} ({model['precision']}, {model['provider']})")
    print(
        f"source                {frame['width']}x{frame['height']}, {len(report['rounds'])} rounds"
    )
    for i, r in enumerate(report["rounds"], 1):
        print(
            f"  round {i}: bare {r['bare']['fps']:.2f} fps, "
            f"pipeline {r['pipeline']['fps']:.2f} fps, "
            f"ratio {r['ratio']:.3f}"
        )
    print(f"bare inference        {report['bare_inference_fps']:.2f} fps (all rounds)")
    print(f"pipeline              {report['pipeline_fps']:.2f} fps (all rounds)")
    print(f"pipeline / bare       {report['pipeline_over_bare']:.3f}")
    print(
        f"pre + post p50 alone  {alone['sum_p50_ms']:.2f} ms "
        f"(pre {alone['preprocess_p50_ms']:.2f}, post {alone['postprocess_p50_ms']:.2f})"
    )
    print(f"pre + post p50 in pipeline {report['pre_post_p50_ms_in_pipeline']:.2f} ms")
    print(
        "stage p50 ms          " + "  ".join(f"{k} {v}" for k, v in report["stage_p50_ms"].items())
    )
