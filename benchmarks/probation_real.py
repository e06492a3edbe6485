"""Real probations of a good model on a busy machine: how many are sent back (goal: none of 20).

The simulation in ``benchmarks/probation.py`` runs the real judge on recorded footage; this runs
the whole thing for real. The agent (in this process) plays a shared video paced as a live camera
on the shared fp32 YOLOv8n and follows a signed OTA channel (file://) with the default probation
limits. Each round publishes a new build of the running model (the same weights, other bytes) and
asks the agent to check: download, self-test, hot swap, then probation with pairs (every 2nd frame
through both models), which commits or sends the build back. ``--hogs`` busy processes spin on the
CPUs all the while (``benchmarks/cpu_hog.py``), as on a shared or overloaded device.

Every round's outcome is printed, with this process's RSS (each round loads a model and, once
judged, lets one go: RSS that climbs round after round is a leak); the goal (issue 24) is 0 false
rollbacks in 20 rounds with two hogs. A postponed verdict counts as sent back here: the device ran
the old model again.

Usage: python benchmarks/probation_real.py [--rounds 20] [--hogs 2] [--shared DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import ROOT, shared_dir_or_exit, wait_for

sys.path.insert(0, str(ROOT))

from agent.config import build_config
from agent.runtime import Agent
from models.golden import record_golden
from tests.ota_helpers import new_channel

VIDEO = "videos/person-bicycle-car-detection.mp4"


def new_build(model: Path, round_no: int, folder: Path) -> Path:
    """The same weights with one more metadata entry: a new file, a new digest, the same speed."""
    import onnx

    graph = onnx.load(str(model))
    entry = graph.metadata_props.add()
    entry.key, entry.value = "build", f"probation benchmark round {round_no}"
    out = folder / f"build-{round_no}.onnx"
    onnx.save(graph, str(out))
    return out


class Counter:
    """A sink counting frames, to wait for the loop to run before each round."""

    def __init__(self) -> None:
        self.frames = 0

    def emit(self, result) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hogs", type=int, default=2, help="busy processes beside the agent")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 200 or not 0 <= args.hogs <= 16:
        parser.error("--rounds 1..200, --hogs 0..16")
    shared = shared_dir_or_exit(args.shared)
    base = shared / "models" / "yolov8n-coco-fp32.onnx"
    images = [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]
    hog = None
    if args.hogs:
        hog = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "cpu_hog.py"),
                                "--processes", str(args.hogs), "--seconds", "14400"])  # fmt: skip
    outcomes: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="probation-real-") as folder:
        work = Path(folder)
        channel = new_channel(work / "ota")
        config = build_config({
            "device_id": "probation-bench",
            "state_dir": str(work / "state"),
            "log_level": "WARNING",
            "model": {"path": str(base)},
            "source": {"uri": str(shared / VIDEO), "loop": True, "pace": "realtime"},
            "ota": {"enabled": True, "channel": channel.folder.as_uri(),
                    "root": str(channel.root), "model_name": "yolov8n-coco",
                    "first_check_s": 3600, "poll_interval_s": 3600},
        })  # fmt: skip
        agent = Agent(config)
        counter = Counter()
        agent.pipeline.sinks.append(counter)
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        started = time.monotonic()
        try:
            for round_no in range(1, args.rounds + 1):
                build = new_build(base, round_no, work)
                version = f"1.{round_no}.0"
                channel.publish(build, version, record_golden(build, images))
                wait_for(lambda n=counter.frames + 20: counter.frames >= n, 300, "frames")
                result = agent.manager.call("check", {"trigger": "benchmark"})
                if not result.get("updated"):
                    raise SystemExit(f"round {round_no}: the build did not go live: {result}")
                wait_for(lambda: agent.manager.state.probation is None, 900, "the verdict")
                outcome = dict(agent.manager.state.last_outcome or {})
                outcomes.append(outcome)
                rss = psutil.Process(os.getpid()).memory_info().rss / 2**20
                print(f"round {round_no:>2}: {version} {outcome.get('result')} "
                      f"{outcome.get('reason') or ''} "
                      f"({time.monotonic() - started:.0f} s, RSS {rss:.0f} MB)",
                      flush=True)  # fmt: skip
                active = agent.manager.state.active
                if active is None or active.version != version:
                    # sent back: the next round is judged against the model that runs now
                    print(f"          running {active.version if active else 'base'} again")
        finally:
            agent.stop()
            runner.join(timeout=60)
            if hog is not None:
                hog.terminate()
                hog.wait(10)

    results = collections.Counter(o.get("result") for o in outcomes)
    sent_back = len(outcomes) - results.get("committed", 0)
    print()
    print(f"rounds {len(outcomes)} with {args.hogs} CPU hogs: {dict(results)}")
    print(f"good builds sent back: {sent_back} of {len(outcomes)}   goal 0 of 20   "
          f"{'PASS' if sent_back == 0 and len(outcomes) >= 20 else 'MISS'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
