"""Issue 26: many cameras on one model, side by side in one run.

1. Bare model throughput, measured again just before each run of 2: back-to-back inference of the
   shared YOLOv8n on one tensor with the runtime's own threads (one run at a time: the target's
   reference), and W runs at once on the same session, each with its share of the cores (the
   model's best on this host; W = the inference workers the loop uses for N cameras).
2. One pipeline with N = 1, 2, 4, 8 cameras: the real clips of ../shared/videos, each played as a
   live camera (own frame rate, newest frame only, looping), all sharing one model loaded as the
   agent loads it. Total frames out per second over a window after warm-up, as a ratio of both
   bare figures (the target: >= 0.95 of one-at-a-time at saturation), and the spread of
   per-camera rates (max/min <= 1.2).
3. One `edge-agent run` with 4 cameras against 4 `edge-agent run` with one camera each: frames
   out per second (from their JSON-lines output), resident memory and CPU seconds over the same
   window (the target: memory >= 2.5x lower for the one agent).

Usage: python benchmarks/multicam.py [--window 20] [--warmup 6] [--backend openvino] [--shared DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import psutil
import yaml
from common import ROOT, shared_dir_or_exit

from agent.config import DetectionConfig, ModelConfig, PipelineConfig, SourceConfig
from agent.demo_inputs import DEMO_MODEL
from agent.loading import options_for_workers
from agent.vision import (
    ActiveModel,
    CameraFeed,
    Pipeline,
    inference_workers,
    load_backend,
    open_source,
    usable_cores,
)

CLIPS = ("person-bicycle-car-detection.mp4", "one-by-one-person-detection.mp4",
         "bottle-detection.mp4")  # fmt: skip


class Discard:
    def emit(self, result) -> None:
        pass

    def close(self) -> None:
        pass


def bare_fps(backend, seconds: float, runs: int = 1) -> float:
    """Back-to-back inferences per second, ``runs`` of them at once on the one backend."""
    tensor = np.random.default_rng(0).random((1, 3, *backend.info.imgsz), dtype=np.float32)
    backend.infer(tensor)
    done = [0] * runs
    started = time.perf_counter()

    def loop(index: int) -> None:
        while time.perf_counter() - started < seconds:
            backend.infer(tensor)
            done[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def load_as_the_agent_does(backend: str, model: Path, workers: int):
    """The model as the agent loads it for ``workers`` runs at once."""
    options = options_for_workers(ModelConfig(path=model, backend=backend), workers)
    return load_backend(backend, model, options)


def cameras_run(backend, videos: Path, count: int, warmup: float, window: float) -> list[float]:
    """Per-camera frames out per second over ``window`` after ``warmup``."""
    cameras = [
        CameraFeed(
            f"cam{i}",
            open_source(SourceConfig(uri=str(videos / clip), pace="live", loop=True)),
            DetectionConfig(),
        )
        for i, clip in enumerate(islice(cycle(CLIPS), count))
    ]
    pipeline = Pipeline(None, ActiveModel(backend), [Discard()], DetectionConfig(),
                        PipelineConfig(), emit_empty=True, cameras=cameras)  # fmt: skip
    pipeline.start()
    time.sleep(warmup)
    before = [c.stats.frames_out for c in cameras]
    time.sleep(window)
    after = [c.stats.frames_out for c in cameras]
    pipeline.stop()
    pipeline.wait(timeout=30)
    for camera in cameras:
        camera.source.close()
    return [(b - a) / window for a, b in zip(before, after, strict=True)]


def agents_run(configs: list[Path], outputs: list[Path], warmup: float,
               window: float) -> tuple[float, int, float]:  # fmt: skip
    """Frames out per second (all agents), resident memory (bytes, all agents) and CPU seconds
    (all agents) over ``window`` after ``warmup``."""
    procs = [subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "-c", str(c)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for c in configs]  # fmt: skip
    watched = [psutil.Process(p.pid) for p in procs]

    def lines() -> int:
        return sum(len(o.read_bytes().splitlines()) if o.exists() else 0 for o in outputs)

    def cpu() -> float:
        return sum(w.cpu_times().user + w.cpu_times().system for w in watched)

    try:
        time.sleep(warmup)
        frames0, cpu0 = lines(), cpu()
        time.sleep(window)
        frames1, cpu1 = lines(), cpu()
        rss = sum(w.memory_info().rss for w in watched)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    return (frames1 - frames0) / window, rss, cpu1 - cpu0


def agent_config(work: Path, name: str, model: Path, cameras: list[dict],
                 backend: str) -> tuple[Path, Path]:  # fmt: skip
    out = work / f"{name}.jsonl"
    data = {
        "device_id": name,
        "state_dir": str(work / f"state-{name}"),
        "log_level": "WARNING",
        "model": {"path": str(model), "backend": backend},
        "sinks": {"jsonl": str(out), "every_frame": True},
        "watchdog": {"enabled": False},
    }
    if len(cameras) == 1:
        data["source"] = cameras[0]
    else:
        data["cameras"] = cameras
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    parser.add_argument("--shared", type=Path)
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    videos, model = shared / "videos", shared / DEMO_MODEL
    single = load_as_the_agent_does(args.backend, model, 1)
    print(f"CPU: {usable_cores()} usable cores ({os.cpu_count()} on the host); YOLOv8n fp32 on "
          f"{args.backend}; bare throughputs measured for 8 s each just before each run (the host "
          "drifts); W: inference workers (runs at once)")  # fmt: skip
    print(f"{'cameras':>7} {'W':>2} {'bare 1':>7} {'bare W':>7} {'total fps':>9} {'/ bare 1':>8} "
          f"{'/ bare W':>8} {'min fps':>7} {'max fps':>7} {'max/min':>7}")  # fmt: skip
    for count in (int(n) for n in args.counts.split(",")):
        workers = inference_workers(0, count)
        backend = load_as_the_agent_does(args.backend, model, workers)
        bare = bare_fps(single, 8.0)
        bare_w = bare_fps(backend, 8.0, workers) if workers > 1 else bare
        rates = cameras_run(backend, videos, count, args.warmup, args.window)
        backend.close()
        total = sum(rates)
        spread = max(rates) / min(rates) if min(rates) > 0 else float("inf")
        print(f"{count:>7} {workers:>2} {bare:>7.1f} {bare_w:>7.1f} {total:>9.1f} "
              f"{total / bare:>8.3f} {total / bare_w:>8.3f} {min(rates):>7.1f} {max(rates):>7.1f} "
              f"{spread:>7.2f}")  # fmt: skip
    single.close()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cams = [{"name": f"cam{i}", "uri": str(videos / clip), "pace": "live", "loop": True}
                for i, clip in enumerate(islice(cycle(CLIPS), 4))]  # fmt: skip
        separate = [agent_config(work, f"solo{i}", model, [c], args.backend)
                    for i, c in enumerate(cams)]  # fmt: skip
        together = agent_config(work, "four", model, cams, args.backend)
        solo = agents_run([c for c, _ in separate], [o for _, o in separate], args.warmup * 2,
                          args.window)  # fmt: skip
        one = agents_run([together[0]], [together[1]], args.warmup * 2, args.window)
    print()
    print(f"{'4 cameras as':<22} {'fps out':>7} {'RSS MiB':>8} {'CPU s':>6} {'CPU s/frame':>11}")
    for name, (fps, rss, cpu) in (("4 agents, 1 camera", solo), ("1 agent, 4 cameras", one)):
        print(f"{name:<22} {fps:>7.1f} {rss / 2**20:>8.0f} {cpu:>6.1f} "
              f"{cpu / max(fps * args.window, 1):>11.4f}")  # fmt: skip
    print(
        f"memory: 4 agents / 1 agent = {solo[1] / one[1]:.2f}x (target >= 2.5x); "
        f"throughput: 1 agent / 4 agents = {one[0] / solo[0]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
