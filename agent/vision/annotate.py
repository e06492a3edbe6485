"""Draw a frame's detections on a copy of its image (snapshots, annotated clips)."""

from __future__ import annotations

from typing import Any

import cv2

from agent.vision.sinks import FrameResult


def annotate(result: FrameResult) -> Any:
    """A BGR copy of the frame with each detection's box, label and score."""
    image = result.frame.image.copy()
    for d in result.detections:
        x1, y1, x2, y2 = (round(v) for v in d.box)
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 200, 255), 2)
        cv2.putText(
            image,
            f"{d.label} {d.score:.2f}",
            (x1, max(12, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 200, 255),
            1,
            cv2.LINE_AA,
        )
    return image
