"""Record a golden set: a few small JPEGs and the model's detections on exactly those pixels.

It travels with the model in the channel; the device re-runs it (agent.selftest) before a new
model goes live. Images are downscaled and re-encoded first, and detections are taken on the
decoded JPEG, so device and publisher see identical input.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cv2

from agent.backends import load_backend
from agent.config import ModelConfig
from agent.postprocess import DetectionParams, detect_image
from agent.selftest import GOLDEN_SCHEMA, decode_image
from models.errors import FactoryError
from models.outputs import atomic_path, refuse_existing


def record_golden(
    model: Path,
    images: list[Path],
    max_side: int = 480,
    quality: int = 90,
    params: DetectionParams | None = None,
) -> dict[str, Any]:
    params = params or DetectionParams()
    backend = load_backend("onnxruntime", model, ModelConfig(path=model))
    entries = []
    try:
        for path in images:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise FactoryError(f"golden image cannot be decoded: {path}")
            scale = min(1.0, max_side / max(image.shape[:2]))
            if scale < 1.0:
                image = cv2.resize(
                    image,
                    (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                    interpolation=cv2.INTER_AREA,
                )
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise FactoryError(f"cannot encode {path} as JPEG")
            entry: dict[str, Any] = {
                "name": path.name,
                "jpeg_base64": base64.b64encode(jpeg.tobytes()).decode(),
            }
            entry["detections"] = [
                d.to_dict() for d in detect_image(backend, decode_image(entry), params)
            ]
            entries.append(entry)
    finally:
        backend.close()
    if not any(e["detections"] for e in entries):
        raise FactoryError(
            "the model detects nothing on these images: a golden set needs objects to check"
        )
    return {
        "schema": GOLDEN_SCHEMA,
        "model": {"name": backend.info.model_name, "version": backend.info.model_version},
        "params": {"confidence": params.confidence, "iou": params.iou},
        "images": entries,
    }


def write_golden(golden: dict[str, Any], output: Path, overwrite: bool = False) -> None:
    refuse_existing(output, overwrite)
    with atomic_path(output) as partial:
        partial.write_text(json.dumps(golden))
