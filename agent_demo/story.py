"""The demo's story: broker, signed channel, agent on float, INT8 over the air, before/after.

Everything is real and local: a mosquitto on a free loopback port (``agent_demo.services``, the
broker the tests start too), a file:// TUF channel with fresh keys, the agent as its own process
on a camera-paced 1080p clip, and the factory's Python API (``models.release``, quantize,
evaluate) quantizing for this machine's target and publishing. This package sits outside the
daemon: the agent never imports the factory; the showcase uses both. Every figure in the summary
comes from the MQTT topics a subscriber receives. Ctrl-C (or any failure) stops every process the
story started.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agent.config import MqttConfig
from agent.contract.errors import AgentError
from agent.demo_inputs import DEMO_MODEL, cache_dir, demo_images, synthesise_video
from agent.fleet_screen import render
from agent.link import FleetView, Watcher
from agent_demo.services import Mosquitto, mosquitto_binary

VERSION = "1.1.0"
MODEL_LINE = "yolov8n-coco"  # the model line the device follows and the release is published to
DEVICE = "demo-camera"
PREFIX = "edge"
CHANNEL = "stable"


class StoryError(AgentError):
    """The story could not be told: what is missing or what went wrong, in one line."""


@dataclass
class StoryOptions:
    shared: Path
    out_dir: Path
    work_dir: Path | None = None
    int8: Path | None = None  # a ready INT8 model (else quantized for this target, cached)
    target: str | None = None  # default: this machine's
    broker: tuple[str, int] | None = None  # an existing broker (else one is started)
    before_s: float = 12.0
    after_s: float = 12.0
    frames_per_image: int = 12
    fps: float = 10.0
    data: Path | None = None  # a labelled dataset for mAP (default: coco8 when present)
    measure_map: bool = True
    say: Any = print


@dataclass
class Recorder:
    """Telemetry and detections as a subscriber receives them, kept per model version."""

    telemetry: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)

    def take(self, topic: str, payload: bytes, received: float) -> None:
        leaf = topic.rsplit("/", 1)[-1]
        if leaf not in ("telemetry", "detections"):
            return
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if leaf == "telemetry":
            self.telemetry.append(data)
        else:
            data["_received"] = received
            self.detections.append(data)


def percentile(values: list[float], q: float) -> float | None:
    """As the agent's own latency windows compute it (numpy, interpolated)."""
    return round(float(np.percentile(values, q)), 2) if values else None


def phase_figures(recorder: Recorder, version: str, since: float, until: float) -> dict[str, Any]:
    """One model's figures over a window: rates from telemetry, per-frame figures from the
    detections messages (each carries its model and its stage latencies)."""
    telemetry = [
        t
        for t in recorder.telemetry
        if (t.get("model") or {}).get("version") == version and since <= t["timestamp"] <= until
    ]
    detections = [
        d
        for d in recorder.detections
        if d["model"]["version"] == version and since <= d["timestamp"] <= until
    ]
    fps = [t["fps_out"] for t in telemetry]
    skipped = [t["frames"]["dropped"] for t in telemetry]
    inference = [d["latency_ms"]["inference"] for d in detections if "inference" in d["latency_ms"]]
    to_mqtt = [d["capture_to_publish_ms"] for d in detections]
    to_subscriber = [(d["_received"] - d["timestamp"]) * 1000 for d in detections]
    return {
        "version": version,
        "window": [round(since, 3), round(until, 3)],  # capture / message times, wall clock
        "precision": (telemetry[-1]["model"] or {}).get("precision") if telemetry else None,
        "telemetry_messages": len(telemetry),
        "detection_messages": len(detections),
        "fps_out": round(statistics.fmean(fps), 2) if fps else None,
        "inference_ms_p50": percentile(inference, 50),
        "inference_ms_p95": percentile(inference, 95),
        "capture_to_mqtt_ms_p50": percentile(to_mqtt, 50),
        "capture_to_mqtt_ms_p95": percentile(to_mqtt, 95),
        "capture_to_subscriber_ms_p50": percentile(to_subscriber, 50),
        "skipped_by_newest_frame_policy": skipped[-1] - skipped[0] if skipped else None,
    }


class Story:
    def __init__(self, options: StoryOptions) -> None:
        self.o = options
        self.say = options.say
        self.children: list[subprocess.Popen] = []
        self.work = options.work_dir or cache_dir() / "demo" / time.strftime("run-%Y%m%d-%H%M%S")
        self.recorder = Recorder()
        self.watcher: Watcher | None = None
        self.broker: Mosquitto | None = None

    # -- the parts ----------------------------------------------------------------------------
    def check(self) -> None:
        if not (self.o.shared / DEMO_MODEL).is_file():
            raise StoryError(f"the demo needs {self.o.shared / DEMO_MODEL} (the shared data)")
        if self.o.broker is None and mosquitto_binary() is None:
            raise StoryError(
                "the demo needs mosquitto (Debian: apt-get install mosquitto; scripts/demo.sh "
                "installs it), or run the file-only demo: edge-agent demo --no-services"
            )
        if importlib.util.find_spec("models") is None or importlib.util.find_spec("onnx") is None:
            raise StoryError(
                "the demo needs the model factory: pip install 'edge-agent[models]' "
                "(scripts/demo.sh does), or run: edge-agent demo --no-services"
            )

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A factory step; its failure ends the story with what failed and why."""
        try:
            yield
        except AgentError as exc:
            raise StoryError(f"{what} failed: {exc}") from None

    def int8_model(self, target: str) -> Path:
        if self.o.int8 is not None:
            return self.o.int8
        fp32 = self.o.shared / DEMO_MODEL
        key = hashlib.sha256(fp32.read_bytes()).hexdigest()[:12]
        cached = cache_dir() / "demo" / f"yolov8n-int8-{target}-{key}.onnx"
        if cached.is_file():
            self.say(f"INT8 model for {target}: {cached} (cached)")
            return cached
        calib = cache_dir() / "demo" / f"calibration-{key}"
        if not calib.is_dir():
            from models.calibration import synthesise

            with self.step("calibration set"):
                synthesise(sorted((self.o.shared / "images").glob("*.jpg")), calib)
        self.say(f"quantizing the float model for {target} (once; about a minute on 2 cores)")
        from models.quantize import quantize
        from models.recipes import recipe

        with self.step("quantize"):
            quantize(fp32, calib, cached, recipe(target), progress=False, target=target)
        return cached

    def start_broker(self) -> tuple[str, int]:
        if self.o.broker is not None:
            return self.o.broker
        self.broker = Mosquitto(self.work / "broker").start()
        return "127.0.0.1", self.broker.port

    def make_channel(self) -> tuple[Path, Path]:
        from models.channel import create, init_keys

        keys, channel = self.work / "keys", self.work / "channel"
        with self.step("channel keys"):
            _, root = init_keys(keys, channel)
            create(channel, keys, root, CHANNEL)
        return keys, channel

    def agent_config(self, broker: tuple[str, int], channel: Path, video: Path) -> Path:
        config = {
            "device_id": DEVICE,
            "state_dir": str(self.work / "state"),
            "log_level": "INFO",
            "model": {"path": str(self.o.shared / DEMO_MODEL)},
            "source": {"uri": str(video), "pace": "live", "loop": True},
            "sinks": {"every_frame": True, "video": str(self.o.out_dir / "demo-annotated.mp4")},
            "mqtt": {
                "enabled": True,
                "host": broker[0],
                "port": broker[1],
                "prefix": PREFIX,
                "telemetry_interval_s": 2.0,
            },
            "ota": {
                "enabled": True,
                "channel": channel.as_uri(),
                "channel_name": CHANNEL,
                "model_name": MODEL_LINE,
                "root": str(channel / "metadata" / "1.root.json"),
                "first_check_s": 3600,
                "poll_interval_s": 3600,
                "announce_jitter_s": 0.5,
                "probation": {"frames": 40, "seconds": 8},
            },
        }
        path = self.work / "agent.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def spawn(self, command: list[str], log: Path) -> subprocess.Popen:
        handle = log.open("ab")
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.children):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    # -- the story ----------------------------------------------------------------------------
    def wait(self, what: str, timeout: float, ready: Any, agent: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.watcher is not None
            with self.watcher.lock:
                if ready(self.watcher.view.devices.get(DEVICE)):
                    return
            if agent.poll() is not None:
                raise StoryError(
                    f"the agent exited ({agent.returncode}) while waiting for {what};"
                    f" see {self.work / 'agent.log'}"
                )
            time.sleep(0.2)
        raise StoryError(f"no {what} within {timeout:g} s; see {self.work / 'agent.log'}")

    def tell(self) -> dict[str, Any]:
        o = self.o
        self.check()
        self.work.mkdir(parents=True, exist_ok=True)
        o.out_dir.mkdir(parents=True, exist_ok=True)
        from agent.contract.targets import detect

        target = o.target or detect().target
        self.say(f"target of this machine: {target}; working in {self.work}")
        video = synthesise_video(demo_images(o.shared), cache_dir(), o.frames_per_image, o.fps)
        int8 = self.int8_model(target)
        broker = self.start_broker()
        keys, channel = self.make_channel()
        config = self.agent_config(broker, channel, video)
        self.say(f"broker mqtt://{broker[0]}:{broker[1]}, channel {channel.as_uri()}")

        view = FleetView(PREFIX, DEVICE)
        self.watcher = Watcher(MqttConfig(host=broker[0], port=broker[1], prefix=PREFIX), view)
        self.watcher.client.message_callback_add(f"{PREFIX}/{DEVICE}/#", self._on_device_message)
        self.watcher.connect()
        command = [sys.executable, "-m", "agent.cli", "run", "-c", str(config)]
        agent = self.spawn(command, self.work / "agent.log")
        self.say("agent started on the float model; waiting for it to come online")
        self.wait("telemetry", 120, lambda v: v is not None and v.telemetry, agent)
        before_start = round(time.time(), 3)
        self.say(f"float model running: measuring for {o.before_s:g} s")
        time.sleep(o.before_s)
        before_end = round(time.time(), 3)
        self.show()

        self.say(f"publishing the INT8 model as {VERSION} and announcing it to the fleet")
        from models.release import GateSettings, ReleaseRequest, release

        golden = tuple(sorted((o.shared / "images").glob("*.jpg")))
        request = ReleaseRequest(channel, keys, int8, VERSION, name=MODEL_LINE, target=target,
                                 golden_images=golden, gate=GateSettings(skip=True))  # fmt: skip
        with self.step("publish"):
            release(request)  # the demo's INT8 is judged on the topics, not gated here
        announced = time.time()
        self.watcher.client.publish(f"{PREFIX}/fleet/{CHANNEL}/announce", b"{}", qos=1)

        def live(v: Any) -> bool:
            return v is not None and ((v.model or {}).get("active") or {}).get("version") == VERSION

        self.wait(f"swap to {VERSION}", 180, live, agent)
        went_live = time.time()
        self.say(f"{VERSION} is live ({went_live - announced:.1f} s after the announce); probation")

        def settled(v: Any) -> bool:
            ota = (v.model or {}).get("ota") or {}
            outcome = (ota.get("last_outcome") or {}).get("result")
            return ota.get("probation") is None and outcome in ("committed", "rolled_back")

        self.wait("probation verdict", 180, settled, agent)
        after_start = round(time.time(), 3)
        self.say(f"measuring the INT8 model for {o.after_s:g} s")
        time.sleep(o.after_s)
        after_end = round(time.time(), 3)
        self.show()
        with self.watcher.lock:
            device = self.watcher.view.devices[DEVICE]
            model_message = dict(device.model or {})
            events = [dict(e) for e in device.events]
        self.stop_all()
        base_version = self.base_version()
        summary = {
            "target": target,
            "before": phase_figures(self.recorder, base_version, before_start, before_end),
            "after": phase_figures(self.recorder, VERSION, after_start, after_end),
            "swap": self.swap_figures(base_version, announced, went_live),
            "outcome": ((model_message.get("ota") or {}).get("last_outcome") or {}),
            "map50_95": self.mean_average_precision(int8),
            "video": str(o.out_dir / "demo-annotated.mp4"),
            "events": [e.get("kind") for e in events],
            "work_dir": str(self.work),
        }
        (o.out_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _on_device_message(self, client: Any, userdata: Any, message: Any) -> None:
        """Everything from the device: into the recorder, and on into the watch view."""
        self.recorder.take(message.topic, message.payload, time.time())
        if self.watcher is not None:
            self.watcher.take(message.topic, message.payload)

    def show(self) -> None:
        if self.watcher is None:
            return
        from rich.console import Console

        Console(width=160).print(render(self.watcher.snapshot()))

    def base_version(self) -> str:
        for message in self.recorder.telemetry:
            version = (message.get("model") or {}).get("version")
            if version and version != VERSION:
                return version
        raise StoryError("no telemetry from the float model was received")

    def swap_figures(self, base: str, announced: float, went_live: float) -> dict[str, Any]:
        """The frames either side of the swap, as the subscriber received them.

        A frame the swap lost would show as a hole between the last float frame and the first
        INT8 frame that the newest-frame policy does not account for, and as a gap in time
        longer than the usual interval between two messages.
        """
        ordered = sorted(self.recorder.detections, key=lambda d: d["frame_id"])
        ids = [d["frame_id"] for d in ordered]
        old = [d for d in ordered if d["model"]["version"] == base]
        new = [d for d in ordered if d["model"]["version"] == VERSION]
        if not old or not new:
            raise StoryError("the subscriber did not see frames on both sides of the swap")
        last, first = old[-1], new[0]
        arrivals = [d["_received"] for d in ordered]
        intervals = [b - a for a, b in itertools.pairwise(arrivals)]
        window = [
            t for t in self.recorder.telemetry if announced - 3 <= t["timestamp"] <= went_live + 3
        ]
        skipped = [t["frames"]["dropped"] for t in window]
        return {
            "announce_to_live_s": round(went_live - announced, 2),
            "last_frame_on_float": last["frame_id"],
            "first_frame_on_int8": first["frame_id"],
            "frames_between": first["frame_id"] - last["frame_id"] - 1,
            "skipped_by_policy_around_swap": skipped[-1] - skipped[0] if skipped else None,
            "gap_ms": round((first["_received"] - last["_received"]) * 1000, 1),
            "median_interval_ms": round(statistics.median(intervals) * 1000, 1),
            "frames_published": len(ids),
            "duplicate_frames": len(ids) - len(set(ids)),
        }

    def mean_average_precision(self, int8: Path) -> dict[str, float] | None:
        data = self.o.data or self.o.shared / "datasets" / "coco8"
        if not self.o.measure_map or not data.exists():
            return None
        fp32 = self.o.shared / DEMO_MODEL
        key = hashlib.sha256(fp32.read_bytes() + int8.read_bytes()).hexdigest()[:12]
        cached = cache_dir() / "demo" / f"map-{key}.json"
        if not cached.is_file():
            self.say(f"evaluating both models on {data.name} (once)")
            from models.datasets import load_dataset
            from models.evaluate import evaluate

            with self.step("evaluate"):
                rows = evaluate([fp32, int8], load_dataset(data), latency_rounds=3)
            figures = {"float": round(rows[0].map50_95, 4), "int8": round(rows[1].map50_95, 4)}
            cached.write_text(json.dumps(figures))
        return json.loads(cached.read_text())


# -- small helpers ------------------------------------------------------------------------------
def summary_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="before / after (figures from the MQTT topics)", title_justify="left")
    table.add_column("")
    before, after = summary["before"], summary["after"]
    table.add_column(f"float {before['version']}")
    table.add_column(f"{after['precision'] or 'int8'} {after['version']}")
    rows = [
        ("fps out", "fps_out"),
        ("inference ms p50", "inference_ms_p50"),
        ("inference ms p95", "inference_ms_p95"),
        ("capture -> MQTT ms p50", "capture_to_mqtt_ms_p50"),
        ("capture -> MQTT ms p95", "capture_to_mqtt_ms_p95"),
        ("capture -> subscriber ms p50", "capture_to_subscriber_ms_p50"),
        ("frames skipped (newest-frame policy)", "skipped_by_newest_frame_policy"),
    ]
    for label, key in rows:
        table.add_row(label, str(before[key]), str(after[key]))
    if summary["map50_95"]:
        table.add_row(
            "mAP50-95 (coco8)", str(summary["map50_95"]["float"]), str(summary["map50_95"]["int8"])
        )
    return table


def run(options: StoryOptions) -> int:
    """Tell the story; print the summary; returns the exit status."""
    from rich.console import Console

    story = Story(options)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C
        signal.signal(signal.SIGTERM, lambda *_: _raise_interrupt())
    try:
        summary = story.tell()
    finally:
        story.stop_all()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    console = Console(width=120)
    console.print(summary_table(summary))
    swap = summary["swap"]
    outcome = summary["outcome"].get("result")
    options.say(
        f"swap: live {swap['announce_to_live_s']} s after the announce; last float frame "
        f"{swap['last_frame_on_float']}, first int8 frame {swap['first_frame_on_int8']}, gap "
        f"{swap['gap_ms']} ms (median interval {swap['median_interval_ms']} ms); frames skipped "
        f"by the newest-frame policy around the swap: {swap['skipped_by_policy_around_swap']}; "
        f"probation: {outcome}"
    )
    options.say(f"annotated video: {summary['video']}")
    options.say(f"summary: {options.out_dir / 'demo-summary.json'}")
    return 0 if outcome == "committed" else 1


def _raise_interrupt() -> None:
    raise KeyboardInterrupt
