"""A fleet as its MQTT topics show it: per device status, model, telemetry, detections, events.

Built only from what any subscriber receives (``edge-agent watch`` and the demo's summary use
it), so what it shows is what an operator's own tools would see. A payload that is not the JSON
object its topic promises is counted and skipped; it never breaks the view.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from agent.link.messages import BadPayload, parse_object

MAX_VIEWED_BYTES = 1 << 20  # a device's status, model, telemetry or detections: far below this

LEAVES = ("status", "model", "telemetry", "detections", "events")
STAGES = ("capture", "preprocess", "inference", "postprocess")


@dataclass
class DeviceView:
    device_id: str
    status: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    detections: dict[str, Any] | None = None
    camera_detections: dict[str, dict[str, Any]] = field(default_factory=dict)  # several cameras
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=8))
    messages: int = 0
    last_seen: float = 0.0  # wall clock

    def ota_state(self) -> str:
        """``probation 1.1.0``, ``committed 1.1.0``, ``rolled_back 1.1.0``... or ``-``."""
        ota = (self.model or {}).get("ota") or {}
        if ota.get("probation"):
            return f"probation {ota['probation'].get('version')}"
        outcome = ota.get("last_outcome") or {}
        if outcome.get("result"):
            return f"{outcome['result']} {outcome.get('version') or ''}".strip()
        if not ota:
            return "-"
        line, target = ota.get("model_name"), ota.get("target")  # ``agent.updates.following``
        return f"following {line} for {target}" if line and target else "following"

    def row(self) -> dict[str, Any]:
        """The figures one line of ``watch`` shows, flat and JSON-ready."""
        status = self.status or {}
        active = (self.model or {}).get("active") or {}
        telemetry = self.telemetry or {}
        latency = telemetry.get("latency_ms") or {}
        system = telemetry.get("system") or {}
        gpus = telemetry.get("gpus") or []
        temperatures = system.get("temperatures_c") or {}
        latest = [self.detections or {}, *self.camera_detections.values()]
        labels = Counter(
            detection.get("label", "?") for message in latest
            for detection in message.get("detections") or []
        )  # fmt: skip
        cameras = {
            name: {
                "fps_out": camera.get("fps_out"),
                "skipped": camera.get("fps_skipped"),
                "objects": (camera.get("scene") or {}).get("objects"),
            }
            for name, camera in (telemetry.get("cameras") or {}).items()
            if isinstance(camera, dict)
        }
        return {
            "device_id": self.device_id,
            "state": status.get("state", "unknown"),
            "agent_version": status.get("agent_version"),
            "model": active.get("name") or (status.get("model") or {}).get("name"),
            "version": active.get("version") or (status.get("model") or {}).get("version"),
            "precision": active.get("precision"),
            "ota": self.ota_state(),
            "fps_in": telemetry.get("fps_in"),
            "fps_out": telemetry.get("fps_out"),
            "stages_ms": {
                stage: {k: latency[stage].get(k) for k in ("p50", "p95")}
                for stage in STAGES
                if isinstance(latency.get(stage), dict)
            },
            "cpu_percent": system.get("cpu_percent"),
            "temperature_c": max(temperatures.values()) if temperatures else None,
            "gpu_percent": gpus[0].get("util_percent") if gpus else None,
            "npu_percent": (telemetry.get("npu") or {}).get("load_percent"),
            "outbox_depth": (telemetry.get("outbox") or {}).get("depth"),
            "last_detections": dict(labels),
            "cameras": cameras,
            "events": [
                {k: e.get(k) for k in ("timestamp", "level", "kind", "message")}
                for e in self.events
            ],
            "last_seen": round(self.last_seen, 3),
        }


class FleetView:
    def __init__(
        self, prefix: str = "edge", device: str | None = None, leaves: tuple[str, ...] = LEAVES
    ) -> None:
        self.prefix = prefix
        self.device = device  # None: every device under the prefix
        self.leaves = leaves  # the topics followed (a rollout reads only status and model)
        self.devices: dict[str, DeviceView] = {}
        self.malformed = 0

    def topics(self) -> list[str]:
        who = self.device or "+"
        topics = [f"{self.prefix}/{who}/{leaf}" for leaf in self.leaves]
        if "detections" in self.leaves:  # several cameras: {device}/{camera}/detections
            topics.append(f"{self.prefix}/{who}/+/detections")
        return topics

    def update(self, topic: str, payload: bytes) -> DeviceView | None:
        """Take one message; returns the device it was about (None: not a topic of the view)."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        camera = None
        if len(parts) == len(head) + 3 and parts[-1] == "detections":
            camera = parts.pop(-2)
        if (
            len(parts) != len(head) + 2
            or parts[: len(head)] != head
            or parts[-1] not in self.leaves
        ):
            return None
        device_id, leaf = parts[-2], parts[-1]
        if self.device is not None and device_id != self.device:
            return None
        try:
            data = parse_object(payload, MAX_VIEWED_BYTES)
        except BadPayload:
            self.malformed += 1
            return None
        view = self.devices.setdefault(device_id, DeviceView(device_id))
        view.messages += 1
        view.last_seen = time.time()
        if leaf == "events":
            view.events.append(data)
        elif camera is not None:
            view.camera_detections[camera] = data
        else:
            setattr(view, leaf, data)
        return view

    def snapshot(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "devices": {d: v.row() for d, v in sorted(self.devices.items())},
            "malformed": self.malformed,
        }
