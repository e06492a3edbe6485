"""Evaluate models side by side: mAP (pycocotools), latency, FPS, size, parameters, agreement.

Everything a device would do is done by the agent's own code (letterbox, backend, decode + NMS),
so the figures are the device's. Latency is measured interleaved, one inference per model per
round, so a noisy shared machine slows every model alike. A model can be run on another target's
kernels (``models.kernels``: under emulation); its accuracy is then that target's, and its
latency is not measured (emulated time says nothing of the device's).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx

from agent.config import ModelConfig
from agent.vision import (
    Backend,
    Detection,
    DetectionParams,
    Preprocessor,
    box_iou,
    decode,
    load_backend,
)
from models.datasets import Dataset
from models.kernels import KernelRunner

log = logging.getLogger(__name__)

EVAL_PARAMS = DetectionParams(
    confidence=0.001, iou=0.7, max_detections=300
)  # the usual mAP setting
OPERATING_PARAMS = DetectionParams(
    confidence=0.25, iou=0.45, max_detections=100
)  # what devices run
WEIGHT_OPS = {
    "Conv",
    "ConvInteger",
    "QLinearConv",
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "ConvTranspose",
}


@dataclass
class ModelResult:
    path: str
    name: str
    precision: str
    scheme: str
    size_bytes: int
    parameters: int
    map50_95: float
    map50: float
    latency_p50_ms: float | None  # None: run under emulation, not timed
    latency_p95_ms: float | None
    fps: float | None
    detections_per_image: float  # at the operating thresholds
    mean_top_score: float  # mean over images of the best score: collapses when scores do
    agreement: float | None = None  # F1 of operating detections against the first model's
    quantization: dict[str, Any] = field(default_factory=dict)
    kernels: str = "native"  # where its outputs were computed
    backend: str = "onnxruntime"  # the runtime that ran it (agent.vision backends)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(path: Path) -> int:
    """Weights and biases of every weighted operator, also those behind a DequantizeLinear."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: int(np.prod(t.dims)) if t.dims else 1 for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    seen: set[str] = set()
    total = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for name in node.input[1:]:
            source = producers.get(name)
            if source is not None and source.op_type == "DequantizeLinear":
                name = source.input[0]
            if name in initializers and name not in seen and initializers[name] > 1:
                seen.add(name)
                total += initializers[name]
    return total


def _class_map(dataset: Dataset, names: dict[int, str]) -> dict[int, int]:
    """Dataset class id -> model class id (by name for COCO json, identity for YOLO folders)."""
    if not dataset.categories:
        return {i: i for i in names}
    by_name = {label: idx for idx, label in names.items()}
    return {cid: by_name.get(label, -1) for cid, label in dataset.categories.items()}


def coco_map(
    dataset: Dataset, detections: list[list[Detection]], class_map: dict[int, int]
) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    classes: set[int] = set()
    for index, sample in enumerate(dataset.samples):
        truth["images"].append({"id": index, "width": sample.width, "height": sample.height})
        for cls, (x, y, w, h) in sample.boxes:
            model_cls = class_map.get(cls, -1)
            classes.add(model_cls)
            truth["annotations"].append(
                {
                    "id": len(truth["annotations"]) + 1,
                    "image_id": index,
                    "category_id": model_cls,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    results = []
    for index, found in enumerate(detections):
        for d in found:
            classes.add(d.class_id)
            x1, y1, x2, y2 = d.box
            results.append(
                {
                    "image_id": index,
                    "category_id": d.class_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": d.score,
                }
            )
    truth["categories"] = [{"id": c} for c in sorted(classes)]
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = truth
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def outputs_map(
    dataset: Dataset, outputs: list[np.ndarray], boxes: list[Any], names: dict[int, str]
) -> tuple[float, float]:
    """mAP50-95 and mAP50 of raw head outputs (one per dataset image, with its letterbox), through
    the agent's decode: for outputs computed elsewhere (an NPU simulator)."""
    found = [decode(o, box, EVAL_PARAMS, names) for o, box in zip(outputs, boxes, strict=True)]
    return coco_map(dataset, found, _class_map(dataset, names))


def agreement(reference: list[list[Detection]], candidate: list[list[Detection]]) -> float:
    """F1 of the candidate's detections against the reference's (same class, IoU >= 0.5)."""
    matched = total_ref = total_cand = 0
    for ref, cand in zip(reference, candidate, strict=True):
        total_ref += len(ref)
        total_cand += len(cand)
        used: set[int] = set()
        for d in sorted(cand, key=lambda x: -x.score):
            best = max(
                (
                    (box_iou(d.box, r.box), i)
                    for i, r in enumerate(ref)
                    if i not in used and r.class_id == d.class_id
                ),
                default=(0.0, -1),
            )
            if best[0] >= 0.5:
                used.add(best[1])
                matched += 1
    if total_ref + total_cand == 0:
        return 1.0
    return 2 * matched / (total_ref + total_cand)


def letterboxed(backend: Backend, dataset: Dataset) -> list[tuple[np.ndarray, Any]]:
    """Each dataset image as the agent feeds ``backend``: the tensor and its letterbox geometry."""
    pre = Preprocessor(backend.info.imgsz, np.dtype(backend.info.input_dtype), pool_size=1)
    prepared = []
    for sample in dataset.samples:
        image = cv2.imread(str(sample.image), cv2.IMREAD_COLOR)
        tensor, box = pre(
            image, out=np.empty((1, 3, *backend.info.imgsz), backend.info.input_dtype)
        )
        prepared.append((tensor, box))
    return prepared


def evaluate(
    paths: list[Path],
    dataset: Dataset,
    latency_rounds: int = 30,
    threads: int = 0,
    runners: list[KernelRunner | None] | None = None,
    runtimes: list[str] | None = None,
) -> list[ModelResult]:
    """Evaluate every model on ``dataset``; the first is the reference for agreement.

    ``runners[i]``, when given and not None, computes model i's outputs on its target's kernels;
    only models run natively are timed. ``runtimes[i]`` names the agent backend that runs model
    i (default onnxruntime), so the same file can be compared across runtimes.
    """
    runners = runners or [None] * len(paths)
    runtimes = runtimes or ["onnxruntime"] * len(paths)
    backends = [
        load_backend(name, p, ModelConfig(path=p, backend=name, threads=threads))
        for p, name in zip(paths, runtimes, strict=True)
    ]
    try:
        inputs = [letterboxed(b, dataset) for b in backends]
        outputs = [
            runner.run(path, [t for t, _ in items], b)
            if runner is not None
            else [b.infer(t) for t, _ in items]
            for path, runner, b, items in zip(paths, runners, backends, inputs, strict=True)
        ]
        timed = [i for i, r in enumerate(runners) if r is None or r.measures_speed]
        measured = _interleaved_latency(
            [backends[i] for i in timed], [inputs[i] for i in timed], latency_rounds
        )
        latencies: list[list[float] | None] = [None] * len(paths)
        for i, times in zip(timed, measured, strict=True):
            latencies[i] = times
        results = []
        operating_ref: list[list[Detection]] | None = None
        for path, backend, items, raw, times, runner in zip(
            paths, backends, inputs, outputs, latencies, runners, strict=True
        ):
            names = backend.info.class_names
            for_map = [
                decode(o, box, EVAL_PARAMS, names) for o, (_, box) in zip(raw, items, strict=True)
            ]
            operating = [
                decode(o, box, OPERATING_PARAMS, names)
                for o, (_, box) in zip(raw, items, strict=True)
            ]
            map50_95, map50 = coco_map(dataset, for_map, _class_map(dataset, names))
            quantization = json.loads(backend.info.metadata.get("quantization", "{}") or "{}")
            results.append(
                ModelResult(
                    path=str(path),
                    name=path.name,
                    precision=backend.info.precision,
                    scheme=quantization.get(
                        "scheme", "dynamic" if backend.info.precision == "int8" else "float"
                    ),
                    size_bytes=path.stat().st_size,
                    parameters=count_parameters(path),
                    map50_95=map50_95,
                    map50=map50,
                    latency_p50_ms=float(np.percentile(times, 50)) if times else None,
                    latency_p95_ms=float(np.percentile(times, 95)) if times else None,
                    fps=1000.0 / float(np.mean(times)) if times else None,
                    detections_per_image=sum(len(d) for d in operating) / len(operating),
                    mean_top_score=float(
                        np.mean([max((d.score for d in found), default=0.0) for found in for_map])
                    ),
                    agreement=None
                    if operating_ref is None
                    else agreement(operating_ref, operating),
                    quantization=quantization,
                    kernels=runner.describe() if runner is not None else "native",
                    backend=backend.info.backend,
                )
            )
            if operating_ref is None:
                operating_ref = operating
        return results
    finally:
        for backend in backends:
            backend.close()


def _interleaved_latency(
    backends: list[Backend], inputs: list[list[tuple[np.ndarray, Any]]], rounds: int
) -> list[list[float]]:
    for backend, items in zip(backends, inputs, strict=True):
        backend.infer(items[0][0])  # warm-up
    times: list[list[float]] = [[] for _ in backends]
    for r in range(rounds):
        for i, (backend, items) in enumerate(zip(backends, inputs, strict=True)):
            tensor = items[r % len(items)][0]
            started = time.perf_counter()
            backend.infer(tensor)
            times[i].append((time.perf_counter() - started) * 1000)
    return times
