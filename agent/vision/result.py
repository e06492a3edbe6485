"""One frame's result, as every sink receives it and as the ``detections`` record is written.

Its own room so that the sinks and what they build on (the annotated video) share it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.vision.backends.base import BackendInfo
from agent.vision.postprocess import Detection
from agent.vision.sources import Frame

DETECTIONS = "edge-agent/detections/v1"  # schema id of a detections record, on every sink


@dataclass(slots=True)
class FrameResult:
    frame: Frame
    model: BackendInfo
    detections: list[Detection]
    latency_ms: dict[str, float] = field(default_factory=dict)
    objects: list[dict[str, Any]] = field(default_factory=list)  # object events (tracking on)
    camera: str = ""  # the camera's name (its source's, with one camera)

    def to_dict(self) -> dict[str, Any]:
        height, width = self.frame.image.shape[:2]
        return {
            "schema": DETECTIONS,
            "frame_id": self.frame.frame_id,
            "timestamp": round(self.frame.timestamp, 6),
            "source": self.frame.source,
            "camera": self.camera or self.frame.source,
            "model": {"name": self.model.model_name, "version": self.model.model_version},
            "image": {"width": width, "height": height},
            "detections": [d.to_dict() for d in self.detections],
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
        }
