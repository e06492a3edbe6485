"""What a compiled model file does not say about itself: class names, input size, identity.

An .rknn (and a TensorRT engine) carries none of the ONNX metadata the decode needs. Two records
can say it: the one the factory writes beside the file (``model.rknn.json``, by ``edge-models
convert``), or, for a model installed over the air, the signed descriptor its slot keeps
(``descriptor.json``). Plain Python: the backends that need it import the vendor runtime, this
does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.contract.errors import ModelError
from agent.vision.backends.base import parse_names


@dataclass(frozen=True)
class ModelRecord:
    names: dict[int, str]
    imgsz: tuple[int, int]
    metadata: dict[str, str] = field(default_factory=dict)
    identity: str = ""  # a version to report when the metadata has none


def read_record(path: Path) -> ModelRecord:
    """The record of compiled model ``path``: its converter's sidecar, else its OTA descriptor.

    Raises:
        ModelError: neither is there or readable; the message names both.
    """
    sidecar = path.with_name(path.name + ".json")
    descriptor = path.with_name("descriptor.json")
    for source, parse in ((sidecar, _from_sidecar), (descriptor, _from_descriptor)):
        if not source.is_file():
            continue
        try:
            return parse(json.loads(source.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: its {source.name} is unreadable: {exc}") from None
    raise ModelError(
        f"{path}: no {sidecar.name} (edge-models convert writes it) and no descriptor.json "
        "(an OTA slot keeps it): class names and input size are unknown"
    )


def _from_sidecar(data: dict[str, Any]) -> ModelRecord:
    metadata = {k: str(v) for k, v in (data.get("metadata") or {}).items()}
    height, width = data.get("imgsz") or (640, 640)
    return ModelRecord(
        names=dict(parse_names(metadata.get("names")) or {}),
        imgsz=(int(height), int(width)),
        metadata=metadata,
        identity=str(data.get("sha256", ""))[:12],
    )


def _from_descriptor(data: dict[str, Any]) -> ModelRecord:
    names = {int(k): str(v) for k, v in data["class_names"].items()}
    metadata = {"model_name": str(data["name"]), "model_version": str(data["version"])}
    if data.get("precision"):
        metadata["precision"] = str(data["precision"])
    return ModelRecord(
        names=names,
        imgsz=(int(data["input"]["height"]), int(data["input"]["width"])),
        metadata=metadata,
        identity=str(data["file"]["sha256"])[:12],
    )
