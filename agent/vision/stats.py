"""Rolling latency windows and pipeline counters (system probes join them with the MQTT link)."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

STAGES = ("capture", "preprocess", "inference", "postprocess", "sink", "total")


class LatencyWindow:
    """The last ``size`` samples of one stage, in milliseconds; percentiles computed on demand."""

    def __init__(self, size: int = 1000) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, millis: float) -> None:
        with self._lock:
            self._samples.append(millis)
            self.count += 1

    def values(self) -> np.ndarray:
        with self._lock:
            return np.fromiter(self._samples, dtype=np.float64, count=len(self._samples))

    def percentiles(self, qs: Iterable[float] = (50, 95, 99)) -> dict[str, float | None]:
        data = self.values()
        qs = list(qs)
        if data.size == 0:
            return {f"p{q:g}": None for q in qs}
        values = np.percentile(data, qs)
        return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}


class ModelStats:
    """What one model did since it became active: the evidence a probation is judged on."""

    def __init__(self, window: int = 1000) -> None:
        self.inference = LatencyWindow(window)
        self.frames = 0  # finished frames
        self.failures = 0  # inferences that raised (a watchdog cancel counts too)
        self.empty = 0  # finished frames with no detection
        self.late = 0  # finished frames past the deadline

    @property
    def attempts(self) -> int:
        return self.frames + self.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "failures": self.failures,
            "empty": self.empty,
            "late": self.late,
            "inference_ms": self.inference.percentiles(),
        }


class PipelineStats:
    """Counters and per-stage latency windows shared by the pipeline's threads."""

    def __init__(self, window: int = 1000) -> None:
        self.latency = {stage: LatencyWindow(window) for stage in STAGES}
        self._lock = threading.Lock()
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.late = 0
        self.errors = 0
        self.skipped = 0  # motion gating: frames that did not need the detector
        self.inference_failures = 0  # current streak of failed inferences
        self.first_in: float | None = None
        self.first_out: float | None = None
        self.last_out: float | None = None
        self.first_handled: float | None = None  # the first frame out or skipped
        self._recent_in: deque[float] = deque(maxlen=4096)  # monotonic times of recent input
        self._recent_out: deque[float] = deque(maxlen=4096)  # ... and of recent output
        self._window = window
        self._per_model: weakref.WeakKeyDictionary[Any, ModelStats] = weakref.WeakKeyDictionary()

    def for_model(self, model: Any) -> ModelStats:
        """The counters of one loaded model (kept while the model object lives)."""
        with self._lock:
            stats = self._per_model.get(model)
            if stats is None:
                stats = self._per_model[model] = ModelStats(self._window)
            return stats

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def add_device_time(self, millis: float) -> None:
        """Inference as the accelerator timed it (CUDA events), beside the wall time the
        ``inference`` stage measures around the call; only backends that report it have it."""
        with self._lock:
            window = self.latency.get("inference_device")
            if window is None:
                window = self.latency["inference_device"] = LatencyWindow(self._window)
        window.add(millis)

    def mark_in(self, now: float) -> None:
        with self._lock:
            self.frames_in += 1
            if self.first_in is None:
                self.first_in = now
            self._recent_in.append(now)

    def mark_out(self, now: float) -> None:
        with self._lock:
            self.frames_out += 1
            if self.first_out is None:
                self.first_out = now
            self.first_handled = self.first_handled or now
            self.last_out = now
            self._recent_out.append(now)

    def mark_skipped(self, now: float) -> None:
        """A frame motion gating judged still: handled (the watchdog's rate counts it, so a
        quiet scene is not a slow device), but it never reaches the sinks."""
        with self._lock:
            self.skipped += 1
            self.first_handled = self.first_handled or now
            self._recent_out.append(now)

    def recent_fps(self, now: float, window_s: float, side: str = "out") -> float | None:
        """Frames handled (out, or skipped by motion gating; ``side="in"``: taken from the
        source) per second over the last
        ``window_s`` (or since the first one): unlike the run's average, this falls to 0 when the
        frames stop, which is what a watchdog must see."""
        with self._lock:
            first, times = (
                (self.first_handled, self._recent_out)
                if side == "out"
                else (self.first_in, self._recent_in)
            )
            if first is None:
                return None
            span = min(window_s, now - first)
            if span <= 0:
                return None
            recent = sum(1 for t in times if t > now - span)
        return recent / span

    def throughput_fps(self) -> float | None:
        """Steady-state output rate: frames between the first and last result over that span."""
        with self._lock:
            if self.first_out is None or self.last_out is None or self.frames_out < 2:
                return None
            span = self.last_out - self.first_out
            return (self.frames_out - 1) / span if span > 0 else None

    def snapshot(self) -> dict:
        with self._lock:
            counters = {
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "dropped": self.dropped,
                "late": self.late,
                "errors": self.errors,
                "skipped": self.skipped,
            }
        return {
            **counters,
            "fps_out": self.throughput_fps(),
            "latency_ms": {stage: w.percentiles() for stage, w in list(self.latency.items())},
        }
