"""Where results go: stdout, JSON-lines and annotated-video sinks, built from the config.

A sink gets every ``FrameResult`` on the postprocess thread and must be quick; a sink that talks
to the network (MQTT, in the link wing) hands the message to its own queue and returns."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Protocol, TextIO

from agent.config import SinksConfig
from agent.vision.annotate import VideoSink
from agent.vision.postprocess import Detection
from agent.vision.result import FrameResult

log = logging.getLogger(__name__)


class Sink(Protocol):
    """A sink may also take object events (tracking on): ``emit_objects(events)``."""

    def emit(self, result: FrameResult) -> None: ...

    def close(self) -> None: ...


def describe(detections: list[Detection]) -> str:
    return ", ".join(f"{d.label} {d.score:.2f}" for d in detections) or "nothing"


class StdoutSink:
    def __init__(self, fmt: str = "json", stream: TextIO | None = None) -> None:
        self._fmt = fmt
        self._stream = stream or sys.stdout

    def emit(self, result: FrameResult) -> None:
        if self._fmt == "json":
            line = json.dumps(result.to_dict(), separators=(",", ":"))
        else:
            total = result.latency_ms.get("total", 0.0)
            line = (
                f"frame {result.frame.frame_id:>6}  {total:7.1f} ms  {describe(result.detections)}"
            )
        print(line, file=self._stream, flush=True)

    def emit_objects(self, events: list[dict]) -> None:
        for event in events:
            if self._fmt == "json":
                line = json.dumps(event, separators=(",", ":"))
            else:
                zones = f"  in {', '.join(event['zones'])}" if event["zones"] else ""
                changes = f"  ({', '.join(event['changes'])})" if event["changes"] else ""
                line = (f"object {event['event']:<6} {event['label']} #{event['track_id']} "
                        f"{event['best_score']:.2f}{zones}{changes}")  # fmt: skip
            print(line, file=self._stream, flush=True)

    def close(self) -> None:
        self._stream.flush()


class JsonlSink:
    """One JSON object per line, appended; line-buffered so a crash loses at most one line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8", buffering=1)

    def emit(self, result: FrameResult) -> None:
        self._handle.write(json.dumps(result.to_dict(), separators=(",", ":")) + "\n")

    def emit_objects(self, events: list[dict]) -> None:
        """Object events between the frames, told apart by their ``schema``."""
        for event in events:
            self._handle.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._handle.close()


def build_sinks(config: SinksConfig) -> list[Sink]:
    sinks: list[Sink] = []
    if config.stdout:
        sinks.append(StdoutSink(config.stdout_format))
    if config.jsonl is not None:
        sinks.append(JsonlSink(config.jsonl))
    if config.video is not None:
        sinks.append(VideoSink(config.video, config.video_width, config.video_fps))
    return sinks
