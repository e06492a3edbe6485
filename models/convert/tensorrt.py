"""A TensorRT engine from our ONNX, built on a device of the target class, with its record.

``edge-models build-engine`` runs where TensorRT and the GPU are (a Jetson of the class the
release is for): an engine only runs on the TensorRT version and GPU model that built it. It uses
the agent's own builder (``agent.vision.backends.tensorrt.build_engine``), so a prebuilt engine
and one a device builds for itself are made the same way, and writes ``<engine>.json`` beside it:
the source ONNX's sha256 (publish checks the engine was built from the model it ships), the
TensorRT version, GPU and compute capability (devices take the engine only when all three are
theirs), precision, input size and the source's metadata (class names).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from models.errors import FactoryError


def build(model: Path, out: Path, precision: str = "auto", workspace_mb: int = 1024) -> dict:
    """Build ``out`` (and its record) from ``model`` here; returns the record.

    Raises:
        FactoryError: TensorRT, pycuda/cuda-python or a GPU is not here (one line saying where
            to run it), or the build failed (TensorRT's reason).
    """
    try:
        from agent.vision import tensorrt_toolkit

        backend = tensorrt_toolkit()
    except ImportError as exc:
        raise FactoryError(
            f"build-engine needs TensorRT and the GPU the engine is for ({exc}): run it on a "
            "device of the target class (pip install 'edge-agent[tensorrt]' there), or publish "
            "the ONNX alone and let each device build its own engine"
        ) from None
    from agent.contract import AgentError, write_atomic
    from agent.vision import open_cuda_device, parse_imgsz, resolve_engine_precision

    try:
        metadata, quantized = backend.onnx_metadata(model)
        precision = resolve_engine_precision(precision, quantized, model)
        gpu = open_cuda_device()
        try:
            with gpu.active(), tempfile.TemporaryDirectory() as work:
                data = backend.build_engine(model, precision, Path(work) / "timing.cache",
                                            workspace_mb, backend.make_logger())  # fmt: skip
        finally:
            gpu.close()
    except AgentError as exc:
        raise FactoryError(str(exc)) from None
    record: dict[str, Any] = {
        "source": model.name,
        "source_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensorrt": backend.trt.__version__,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "precision": precision,
        "imgsz": list(parse_imgsz(metadata.get("imgsz")) or (640, 640)),
        "metadata": {**metadata, "precision": precision},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_name(out.name + ".json"), json.dumps(record, indent=1).encode())
    write_atomic(out, data)
    return record


def engine_record(engine: Path, source: Path) -> dict[str, Any]:
    """The record of a prebuilt ``engine``, checked to come from ``source``.

    Raises:
        FactoryError: no readable record, or an engine built from another model or changed since.
    """
    side = engine.with_name(engine.name + ".json")
    try:
        record = json.loads(side.read_text())
        needed = ("source_sha256", "sha256", "tensorrt", "gpu", "compute_capability")
        missing = [k for k in needed if not record.get(k)]
    except (OSError, ValueError) as exc:
        raise FactoryError(f"{engine}: its record {side.name} is missing or unreadable "
                           f"(edge-models build-engine writes it): {exc}") from None  # fmt: skip
    if missing:
        raise FactoryError(f"{side}: not an engine record (missing {', '.join(missing)})")
    if record["source_sha256"] != hashlib.sha256(source.read_bytes()).hexdigest():
        raise FactoryError(
            f"{engine.name} was built from another model than {source.name} "
            f"({record.get('source', '?')}): build it from the model you publish"
        )
    if record["sha256"] != hashlib.sha256(engine.read_bytes()).hexdigest():
        raise FactoryError(f"{engine.name} does not match its record (changed since it was built)")
    return record
