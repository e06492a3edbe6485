"""The periodic ``telemetry`` message: rates since the last, stage latencies, source, host probes.

Rates are frames counted between two messages over the time between them, so a message says how
the device did in its own interval, not since start. The link adds its outbox and MQTT counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.link.messages import TELEMETRY, model_ref
from agent.link.probes import SystemProbes
from agent.vision import Backend, CameraFeed, Pipeline

FRAME_COUNTERS = ("frames_in", "frames_out", "dropped", "late", "errors", "skipped")


class Telemetry:
    def __init__(
        self,
        device_id: str,
        session: str,
        started: float,
        pipeline: Pipeline,
        model: Callable[[], Backend],
    ) -> None:
        """``started``: the agent's start (monotonic), for uptime."""
        self.device_id, self.session, self.started = device_id, session, started
        self.pipeline, self.model = pipeline, model
        self.probes = SystemProbes()
        self._last = (time.monotonic(), 0, 0)  # when, frames in, frames out
        self._camera_last: dict[str, tuple[float, int, int, int]] = {}  # ... and skipped

    def message(self, link_counters: dict[str, Any] | None = None) -> dict[str, Any]:
        snap = self.pipeline.stats.snapshot()
        now = time.monotonic()
        last_t, last_in, last_out = self._last
        span = max(now - last_t, 1e-6)
        self._last = (now, snap["frames_in"], snap["frames_out"])
        source = self.pipeline.source
        return {
            "schema": TELEMETRY,
            "device_id": self.device_id,
            "session": self.session,
            "timestamp": round(time.time(), 3),
            "uptime_s": round(now - self.started, 3),
            "model": model_ref(self.model().info),
            "fps_in": round((snap["frames_in"] - last_in) / span, 2),
            "fps_out": round((snap["frames_out"] - last_out) / span, 2),
            "frames": {k: snap[k] for k in FRAME_COUNTERS},
            "latency_ms": snap["latency_ms"],
            "inference_ms": snap["latency_ms"]["inference"]["p50"],
            "inference_workers": self.pipeline.workers,
            "source": {"name": source.name, **source.stats.as_dict()},
            "cameras": {camera.name: self._camera(camera) for camera in self.pipeline.cameras},
            **self.probes.read(),
            **(link_counters or {}),
        }

    def _camera(self, camera: CameraFeed) -> dict[str, Any]:
        """A camera's counters since start, its rates since the last message (skipped: frames
        motion gating kept from the detector), its latency, its source's health, its scene."""
        snap, now = camera.stats.snapshot(), time.monotonic()
        last_t, last_in, last_out, last_skipped = self._camera_last.get(
            camera.name, (self.started, 0, 0, 0)
        )
        span = max(now - last_t, 1e-6)
        self._camera_last[camera.name] = (
            now,
            snap["frames_in"],
            snap["frames_out"],
            snap["skipped"],
        )
        section = {
            "fps_in": round((snap["frames_in"] - last_in) / span, 2),
            "fps_out": round((snap["frames_out"] - last_out) / span, 2),
            "fps_skipped": round((snap["skipped"] - last_skipped) / span, 2),
            **{k: snap[k] for k in FRAME_COUNTERS},
            "latency_ms": {k: snap["latency_ms"][k] for k in ("inference", "total")},
            "source": {"name": camera.source.name, **camera.source.stats.as_dict()},
        }
        if camera.scene is not None:
            section["scene"] = camera.scene.summary()
        return section

    def close(self) -> None:
        self.probes.close()
