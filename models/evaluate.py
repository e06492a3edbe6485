"""Evaluate models side by side: mAP (models.metrics, pycocotools' rules, with intervals),
latency, FPS, size, parameters, agreement.

Everything a device would do is done by the agent's own code (letterbox, backend, decode + NMS),
so the figures are the device's. Latency is measured interleaved, one inference per model per
round, so a noisy shared machine slows every model alike. A model can be run on another target's
kernels (``models.kernels``: under emulation); its accuracy is then that target's, and its
latency is not measured (emulated time says nothing of the device's).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
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
from models.errors import FactoryError
from models.kernels import KernelRunner
from models.metrics import Matches, match, paired_difference, scores

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
    images: int = 0  # evaluation images
    # AP per class with ground truth (the mAP is their mean: the classes present in the set)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    # vs the first model: mAP50-95 difference in points with its paired bootstrap 95 % interval
    map_difference: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)  # what a reader must know to trust it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_bytes(path: Path) -> int:
    """The file's size; an OpenVINO IR's with its weights (``.bin``)."""
    weights = path.with_suffix(".bin")
    extra = weights.stat().st_size if path.suffix.lower() == ".xml" and weights.is_file() else 0
    return path.stat().st_size + extra


def count_parameters(path: Path) -> int:
    """Weights and biases of every weighted operator, also those behind a DequantizeLinear (an
    OpenVINO IR's: behind its FakeQuantize or decompression)."""
    if path.suffix.lower() == ".xml":
        return _ir_parameters(path)
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


def unseen_classes(name: str, metadata: dict[str, str], evaluated: list[str]) -> list[str]:
    """Warnings for a model recovered by distillation (a ``pruning`` or ``distillation`` record
    with ``frame_classes``, see ``models.optimize.seen``) that is evaluated on classes none of its
    sampled recovery frames showed: its AP on them was never recovered."""
    warnings = []
    for key in ("pruning", "distillation"):
        try:
            record = json.loads(metadata.get(key) or "null")
        except ValueError:
            continue
        seen = record.get("frame_classes") if isinstance(record, dict) else None
        if not isinstance(seen, dict):
            continue
        frames_with = seen.get("frames_with") or {}
        missing = [c for c in evaluated if c in frames_with and not frames_with[c]]
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            warnings.append(
                f"{name}: its {key} recovery frames show no {shown} (the teacher finds none in "
                f"{seen.get('sampled')} sampled frames at {seen.get('threshold')}): its AP on "
                f"{'them' if len(missing) > 1 else 'it'} was not recovered; judge it on the "
                "classes its cameras see"
            )
    return warnings


def _unrecorded_scheme(path: Path, backend: Backend) -> str:
    """What a model says of its quantization when no recipe of ours is recorded in it."""
    if backend.info.precision != "int8":
        return "float"
    return "IR int8" if path.suffix.lower() == ".xml" else "dynamic"


def _ir_parameters(path: Path) -> int:
    import openvino as ov

    def constant_behind(node: Any) -> Any:
        while node.get_type_name() != "Constant" and node.get_input_size() > 0:
            node = node.input_value(0).get_node()
        return node if node.get_type_name() == "Constant" else None

    weighted = ("Convolution", "GroupConvolution", "MatMul")
    seen: set[str] = set()
    total = 0
    for op in ov.Core().read_model(str(path)).get_ops():
        kind = op.get_type_name()
        if kind in weighted:
            source = constant_behind(op.input_value(1).get_node())
        elif kind == "Add" and op.input_value(0).get_node().get_type_name() in weighted:
            source = constant_behind(op.input_value(1).get_node())  # a bias
        else:
            continue
        if source is None or source.get_friendly_name() in seen:
            continue
        size = int(np.prod(list(source.get_output_shape(0))))
        if size > 1:
            seen.add(source.get_friendly_name())
            total += size
    return total


def _class_map(dataset: Dataset, names: dict[int, str]) -> dict[int, int]:
    """Dataset class id -> model class id (by name for COCO json, identity for YOLO folders)."""
    if not dataset.categories:
        return {i: i for i in names}
    by_name = {label: idx for idx, label in names.items()}
    return {cid: by_name.get(label, -1) for cid, label in dataset.categories.items()}


def outputs_matches(
    dataset: Dataset, outputs: Iterable[np.ndarray], boxes: Iterable[Any], names: dict[int, str]
) -> Matches:
    """Raw head outputs (one per dataset image, with its letterbox) decoded as the agent does and
    matched to the ground truth: for outputs computed elsewhere (an NPU simulator). Each output
    is decoded as it comes, so a lazy sequence stays lazy. Its scores give mAP; two of them on
    the same images give a paired interval."""
    found = [decode(o, box, EVAL_PARAMS, names) for o, box in zip(outputs, boxes, strict=True)]
    return _matches(dataset, found, names)


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


def letterboxed(backend: Backend, dataset: Dataset) -> Iterator[tuple[np.ndarray, Any]]:
    """Each dataset image as the agent feeds ``backend``: the tensor and its letterbox geometry,
    one image at a time (990 of them in float32 are 4.9 GB)."""
    pre = Preprocessor(backend.info.imgsz, np.dtype(backend.info.input_dtype), pool_size=1)
    for sample in dataset.samples:
        yield pre(
            _read(sample), out=np.empty((1, 3, *backend.info.imgsz), backend.info.input_dtype)
        )


CHUNK = 32  # images letterboxed at a time: bounded memory, and one emulated process per chunk
TIMING_IMAGES = 8  # the images the interleaved latency rounds cycle through


@dataclass
class _Pass:
    """One model's pass over the set: its detections, and a few inputs kept for timing."""

    for_map: list[list[Detection]] = field(default_factory=list)
    operating: list[list[Detection]] = field(default_factory=list)
    timing: list[tuple[np.ndarray, Any]] = field(default_factory=list)


def _read(sample: Any) -> np.ndarray:
    image = cv2.imread(str(sample.image), cv2.IMREAD_COLOR)
    if image is None:
        raise FactoryError(f"cannot decode the evaluation image {sample.image}")
    return image


def _passes(
    paths: list[Path],
    backends: list[Backend],
    runners: list[KernelRunner | None],
    dataset: Dataset,
    keep: int,
    progress: bool = False,
) -> list[_Pass]:
    """Every model over the set, ``CHUNK`` images at a time (each image decoded once for all):
    only detections stay in memory, never the whole set's tensors or raw outputs."""
    pres = [Preprocessor(b.info.imgsz, np.dtype(b.info.input_dtype), pool_size=1) for b in backends]
    passes = [_Pass() for _ in backends]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset.samples), desc=f"evaluating {len(paths)} model(s)", unit="img")
    for start in range(0, len(dataset.samples), CHUNK):
        images = [_read(sample) for sample in dataset.samples[start : start + CHUNK]]
        for path, backend, runner, pre, done in zip(
            paths, backends, runners, pres, passes, strict=True
        ):
            shape = (1, 3, *backend.info.imgsz)
            items = [pre(image, out=np.empty(shape, backend.info.input_dtype)) for image in images]
            tensors = [t for t, _ in items]
            if runner is not None:
                raw = runner.run(path, tensors, backend)
            else:
                raw = [backend.infer(t) for t in tensors]
            names = backend.info.class_names
            for output, (tensor, box) in zip(raw, items, strict=True):
                done.for_map.append(decode(output, box, EVAL_PARAMS, names))
                done.operating.append(decode(output, box, OPERATING_PARAMS, names))
                if len(done.timing) < keep:
                    done.timing.append((tensor, box))
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    return passes


def detect(backend: Backend, dataset: Dataset) -> list[list[Detection]]:
    """``backend``'s detections of every image of ``dataset`` at the mAP thresholds
    (``EVAL_PARAMS``), through the agent's letterbox and decode."""
    return _passes([Path(backend.info.model_path)], [backend], [None], dataset, keep=0)[0].for_map


def _matches(dataset: Dataset, found: list[list[Detection]], names: dict[int, str]) -> Matches:
    mapping = _class_map(dataset, names)
    truths = [[(mapping.get(c, -1), box) for c, box in s.boxes] for s in dataset.samples]
    detections = [
        [
            (d.class_id, d.score, (d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]))
            for d in image
        ]
        for image in found
    ]
    return match(truths, detections)


def evaluate(
    paths: list[Path],
    dataset: Dataset,
    latency_rounds: int = 30,
    threads: int = 0,
    runners: list[KernelRunner | None] | None = None,
    runtimes: list[str] | None = None,
    resamples: int = 200,
    progress: bool = False,
) -> list[ModelResult]:
    """Evaluate every model on ``dataset``; the first is the reference for agreement and for
    the paired bootstrap interval of each other model's mAP50-95 difference (``resamples``
    draws of the images; 0: no interval). ``progress``: a bar with an ETA on stderr.

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
        passes = _passes(paths, backends, runners, dataset, TIMING_IMAGES, progress)
        timed = [i for i, r in enumerate(runners) if r is None or r.measures_speed]
        measured = _interleaved_latency(
            [backends[i] for i in timed], [passes[i].timing for i in timed], latency_rounds
        )
        latencies: list[list[float] | None] = [None] * len(paths)
        for i, times in zip(timed, measured, strict=True):
            latencies[i] = times
        results: list[ModelResult] = []
        reference: Matches | None = None
        for path, backend, done, times, runner in zip(
            paths, backends, passes, latencies, runners, strict=True
        ):
            names = backend.info.class_names
            matches = _matches(dataset, done.for_map, names)
            figures = scores(matches)
            interval = None
            if reference is not None and resamples > 0:
                interval = paired_difference(reference, matches, resamples)
            quantization = json.loads(backend.info.metadata.get("quantization", "{}") or "{}")
            per_class = {
                names.get(c, str(c)): {"ap50_95": round(ap, 4), "ap50": round(ap50, 4),
                                       "boxes": boxes}
                for c, (ap, ap50, boxes) in sorted(figures.per_class.items())
            }  # fmt: skip
            results.append(
                ModelResult(
                    path=str(path),
                    name=path.name,
                    precision=backend.info.precision,
                    scheme=quantization.get("scheme", _unrecorded_scheme(path, backend)),
                    size_bytes=model_bytes(path),
                    parameters=count_parameters(path),
                    map50_95=figures.map50_95,
                    map50=figures.map50,
                    latency_p50_ms=float(np.percentile(times, 50)) if times else None,
                    latency_p95_ms=float(np.percentile(times, 95)) if times else None,
                    fps=1000.0 / float(np.mean(times)) if times else None,
                    detections_per_image=sum(len(d) for d in done.operating) / len(done.operating),
                    mean_top_score=float(
                        np.mean(
                            [max((d.score for d in found), default=0.0) for found in done.for_map]
                        )
                    ),
                    agreement=None
                    if not results
                    else agreement(passes[0].operating, done.operating),
                    quantization=quantization,
                    kernels=runner.describe() if runner is not None else "native",
                    backend=backend.info.backend,
                    images=len(dataset.samples),
                    per_class=per_class,
                    map_difference=None if interval is None else asdict(interval),
                    warnings=unseen_classes(path.name, backend.info.metadata, list(per_class)),
                )
            )
            if reference is None:
                reference = matches
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
