"""Record a golden set: a few small JPEGs and the model's detections on exactly those pixels.

It travels with the model in the channel; the device re-runs it (agent.selftest) before a new
model goes live. Images are downscaled and re-encoded first, and detections are taken on the
decoded JPEG, so device and publisher see identical input. Detections are taken on the kernels
of the target the model ships to (``models.kernels``: here, or under emulation), since those are
the numbers a device must reproduce. A static INT8 model's set also carries its first convolution
as a kernel probe (``models.probe``), which the device runs against its own int8 kernels.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx

from agent.config import ModelConfig
from agent.contract import GOLDEN_SCHEMA, decode_image
from agent.vision import DetectionParams, Preprocessor, decode, load_backend
from models.errors import FactoryError
from models.kernels import KernelRunner
from models.outputs import atomic_path, refuse_existing
from models.probe import first_conv_probe


def golden_images(images: list[Path], max_side: int = 480, quality: int = 90) -> list[dict]:
    """The set's images: each downscaled and re-encoded as the JPEG that travels in the set."""
    entries: list[dict[str, Any]] = []
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
        entries.append(
            {"name": path.name, "jpeg_base64": base64.b64encode(jpeg.tobytes()).decode()}
        )
    return entries


def golden_inputs(
    entries: list[dict], imgsz: tuple[int, int], dtype: str = "float32"
) -> list[tuple[np.ndarray, Any]]:
    """The tensors a device feeds its model for these entries (the decoded JPEG, letterboxed)."""
    pre = Preprocessor(imgsz, np.dtype(dtype), pool_size=1)
    return [pre(decode_image(e), out=np.empty((1, 3, *imgsz), dtype)) for e in entries]


def record_golden(
    model: Path,
    images: list[Path],
    max_side: int = 480,
    quality: int = 90,
    params: DetectionParams | None = None,
    runner: KernelRunner | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """The golden set of ``model`` on ``images``, detected with ``runner`` (default: here)."""
    params = params or DetectionParams()
    backend = load_backend("onnxruntime", model, ModelConfig(path=model))
    try:
        entries = golden_images(images, max_side, quality)
        info = backend.info
        prepared = golden_inputs(entries, info.imgsz, info.input_dtype)
        tensors = [tensor for tensor, _ in prepared]
        outputs = (
            runner.run(model, tensors, backend) if runner else [backend.infer(t) for t in tensors]
        )
        for entry, (_, box), output in zip(entries, prepared, outputs, strict=True):
            entry["detections"] = [
                d.to_dict() for d in decode(output, box, params, info.class_names)
            ]
    finally:
        backend.close()
    if not any(e["detections"] for e in entries):
        raise FactoryError(
            "the model detects nothing on these images: a golden set needs objects to check"
        )
    golden: dict[str, Any] = {
        "schema": GOLDEN_SCHEMA,
        "model": {"name": backend.info.model_name, "version": backend.info.model_version},
        "params": {"confidence": params.confidence, "iou": params.iou},
        "images": entries,
    }
    if runner is not None:
        golden["recorded_on"] = runner.describe()
    probe = first_conv_probe(onnx.load(str(model), load_external_data=False))
    if probe is not None:
        golden["kernel_probe"] = {
            "onnx_base64": base64.b64encode(probe).decode(),
            "target": target or backend.info.metadata.get("target"),
        }
    return golden


def write_golden(golden: dict[str, Any], output: Path, overwrite: bool = False) -> None:
    refuse_existing(output, overwrite)
    with atomic_path(output) as partial:
        partial.write_text(json.dumps(golden))
