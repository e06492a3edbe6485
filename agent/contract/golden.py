"""The golden self-test set's format: what ``edge-models golden`` writes and a device reads.

A set is ``{"schema": GOLDEN_SCHEMA, "images": [...]}``; each image carries its JPEG bytes in
base64 and the detections the model gave on exactly those pixels when it was published. The
factory records it, the device decodes the same bytes and compares (``agent.updates.selftest``).
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np

GOLDEN_SCHEMA = "edge-agent/golden/v1"


def decode_image(entry: dict[str, Any]) -> np.ndarray:
    """The BGR pixels of one golden image entry; ValueError when its bytes are not a JPEG."""
    data = np.frombuffer(base64.b64decode(entry["jpeg_base64"]), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"golden image {entry.get('name')!r} cannot be decoded")
    return image
