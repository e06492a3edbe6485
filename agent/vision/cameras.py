"""Many cameras, one model: each camera's share of the loop, and the fair queue between them.

Every camera has its own capture thread, frame numbering, thresholds, scene (tracker, zones,
lines), motion gate and counters; they all feed one ``FairQueue`` from which the single
preprocess -> inference -> postprocess chain takes frames round-robin, so one loaded model serves
every camera and a busy camera cannot starve a quiet one. A live camera's lane keeps only its
newest frame (latency beats backlog); a file's lane holds a few and makes its reader wait.
A camera that stalls or reconnects leaves its lane empty: the others go on being served.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.config import DetectionConfig
from agent.vision.motion import MotionGate
from agent.vision.scene import Scene
from agent.vision.sources import Frame, FrameSource
from agent.vision.stats import PipelineStats


@dataclass(eq=False)
class CameraFeed:
    """One camera as the loop runs it."""

    name: str
    source: FrameSource
    detection: DetectionConfig
    scene: Scene | None = None
    gate: MotionGate | None = None
    stats: PipelineStats = field(default_factory=PipelineStats)
    last_result: Any = None  # its latest FrameResult (snapshot command)
    numbering: tuple[FrameSource | None, int] = (None, 0)  # (source, frame id offset)
    last_frame_id: int = -1

    def numbered(self, source: FrameSource, frame: Frame) -> Frame:
        """Frame ids go on rising across a reopened source, which counts from 0 again: a
        subscriber takes a (session, frame_id) it has seen for a resend and drops it."""
        if source is not self.numbering[0]:
            self.numbering = (source, self.last_frame_id + 1 - frame.frame_id)
        if self.numbering[1]:
            frame.frame_id += self.numbering[1]
        self.last_frame_id = frame.frame_id
        return frame


class FairQueue:
    """One lane per camera; ``get`` serves the lanes in turn and returns ``None`` once every
    lane has ended and drained."""

    def __init__(self, lanes: dict[str, int], aborted: threading.Event) -> None:
        """``lanes``: camera name -> how many frames its lane holds."""
        self._lanes = {name: deque[Frame]() for name in lanes}
        self._sizes = dict(lanes)
        self._ended: set[str] = set()
        self._order = list(lanes)
        self._next = 0
        self._aborted = aborted
        self._changed = threading.Condition()

    def put(self, camera: str, frame: Frame) -> None:
        """Wait while the lane is full (a file: back-pressure), unless the loop has crashed."""
        with self._changed:
            while len(self._lanes[camera]) >= self._sizes[camera]:
                if self._aborted.is_set():
                    return
                self._changed.wait(0.1)
            self._lanes[camera].append(frame)
            self._changed.notify_all()

    def put_latest(self, camera: str, frame: Frame) -> Frame | None:
        """Never wait: a full lane drops its oldest frame, which is returned (a live camera)."""
        with self._changed:
            lane = self._lanes[camera]
            dropped = lane.popleft() if len(lane) >= self._sizes[camera] else None
            lane.append(frame)
            self._changed.notify_all()
            return dropped

    def end(self, camera: str) -> None:
        with self._changed:
            self._ended.add(camera)
            self._changed.notify_all()

    def get(self) -> tuple[str, Frame] | None:
        """The next camera's oldest waiting frame, cameras in turn; None when all have ended."""
        with self._changed:
            while True:
                for step in range(len(self._order)):
                    index = (self._next + step) % len(self._order)
                    name = self._order[index]
                    if self._lanes[name]:
                        self._next = index + 1
                        frame = self._lanes[name].popleft()
                        self._changed.notify_all()
                        return name, frame
                if self._ended >= set(self._order):
                    return None
                self._changed.wait(0.5)
