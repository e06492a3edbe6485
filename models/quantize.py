"""Post-training static INT8 quantization of a YOLOv8 detector to QDQ ONNX.

Steps: validate the source with the agent's own backend (it must be a YOLOv8 detect head); run
ONNX Runtime's quantization pre-processing (shape inference + graph optimization); find the
detect head's post-processing in the graph; calibrate on images fed through the agent's
letterbox; write QDQ with that post-processing kept in float.

Why the post-processing stays float: the head's last Concat mixes box coordinates in pixels
(0..640) with class scores (0..1). One int8 scale across both leaves the scores a handful of
levels, and every detection's confidence collapses. DFL (softmax over 16 bins) and the box decode
are equally sensitive. They are found structurally: the Reshapes that flatten each level's 4-D
feature map into a 3-D sequence mark where post-processing begins, and everything downstream of
them is excluded. No node names are assumed.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from agent.config import ModelConfig
from agent.vision import file_digest, load_backend
from models.activation_ranges import percentile_ranges
from models.calibration import calibration_images, refuse_overlap, sample_frames, tensors
from models.errors import FactoryError, ModelError
from models.outputs import atomic_path, refuse_existing

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
REDUCE_RANGE = ("none", "first", "all")


@dataclass(frozen=True)
class QuantizeSettings:
    # percentile: every activation's range clipped at ``percentile`` of all calibration values
    # (models/activation_ranges.py); minmax: the extremes, which cost ~3 points on VOC
    method: str = "percentile"
    percentile: float = 99.999
    per_channel: bool = True
    activations: str = "int8"  # int8 = S8S8 (default); uint8 = U8S8 (x86-64 CPU execution provider)
    weights: str = "int8"
    keep_head_float: bool = True
    fast_dfl: bool = True  # softmax on the last axis: same numbers, ~4 ms less per frame on CPU
    # 7-bit weights where 8-bit ones could saturate x86's vpmaddubsw (no VNNI): none, first, all
    reduce_range: str = "none"
    symmetric_activations: bool = False  # TensorRT reads symmetric (zero point 0) activations

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FactoryError(
                f"unknown calibration method {self.method!r} (choose {', '.join(METHODS)})"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise FactoryError(
                f"the calibration percentile must be in (50, 100], not {self.percentile}"
            )
        if self.activations not in ("int8", "uint8"):
            raise FactoryError(f"activations must be int8 or uint8, not {self.activations!r}")
        if self.weights not in ("int8", "uint8"):
            raise FactoryError(f"weights must be int8 or uint8, not {self.weights!r}")
        if self.reduce_range not in REDUCE_RANGE:
            raise FactoryError(
                f"reduce_range must be one of {', '.join(REDUCE_RANGE)}, not {self.reduce_range!r}"
            )


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    ranks = {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks


def _links(
    graph: onnx.GraphProto,
) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Each tensor's producing node, and the nodes that read it."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producers, consumers


def head_postprocess_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes downstream of where the detect head flattens its feature maps.

    Raises:
        ModelError: no 4-D -> 3-D flattening is found (not a YOLOv8-style detect head).
    """
    ranks = _ranks(model)
    graph = model.graph
    seeds = [
        node
        for node in graph.node
        if node.op_type in ("Reshape", "Flatten")
        and ranks.get(node.input[0]) == 4
        and ranks.get(node.output[0]) == 3
    ]
    if not seeds:
        raise ModelError(
            "cannot find the detect head's post-processing (no 4-D -> 3-D Reshape in the graph)"
        )
    consumers = _links(graph)[1]
    found: dict[str, onnx.NodeProto] = {}
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if node.name in found:
            continue
        found[node.name] = node
        for output in node.output:
            stack.extend(consumers.get(output, []))
    return sorted(found)


def fast_dfl_layout(model: onnx.ModelProto) -> int:
    """Rewrite DFL's Transpose(0,2,1,3) -> Softmax(axis=1) -> 1x1 Conv into
    Transpose(0,1,3,2) -> Softmax(axis=-1) -> MatMul with the same bin weights.

    The result is identical (the rows come out in the same order, so the Reshape after it is
    unchanged) but ONNX Runtime's softmax is several times faster on the last axis. The DFL stays
    float either way. Returns how many were rewritten (0 when the pattern is not there).
    """
    graph = model.graph
    producers, consumers = _links(graph)
    initializers = {init.name: init for init in graph.initializer}
    rewritten = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        transpose = producers.get(softmax.input[0])
        after = consumers.get(softmax.output[0], [])
        if transpose is None or transpose.op_type != "Transpose" or len(after) != 1:
            continue
        conv = after[0]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), None)
        if conv.op_type != "Conv" or perm != [0, 2, 1, 3] or axis != 1 or len(conv.input) != 2:
            continue
        if conv.input[1] not in initializers or len(consumers.get(transpose.output[0], [])) != 1:
            continue
        weights = numpy_helper.to_array(initializers[conv.input[1]])
        if weights.ndim != 4 or weights.shape[2:] != (1, 1):
            continue
        bins = weights.shape[1]
        matrix = numpy_helper.from_array(
            weights.reshape(weights.shape[0], bins).T.astype(np.float32), f"{conv.name}/bins_matrix"
        )
        graph.initializer.append(matrix)
        replacement = [
            helper.make_node(
                "Transpose",
                [transpose.input[0]],
                [f"{transpose.output[0]}/last"],
                perm=[0, 1, 3, 2],
                name=f"{transpose.name}/last",
            ),
            helper.make_node(
                "Softmax",
                [f"{transpose.output[0]}/last"],
                [f"{softmax.output[0]}/last"],
                axis=-1,
                name=f"{softmax.name}/last",
            ),
            helper.make_node(
                "MatMul",
                [f"{softmax.output[0]}/last", matrix.name],
                [conv.output[0]],
                name=f"{conv.name}/matmul",
            ),
        ]
        position = list(graph.node).index(transpose)
        for node in (transpose, softmax, conv):
            graph.node.remove(node)
        for info in [v for v in graph.value_info if v.name == conv.output[0]]:
            graph.value_info.remove(info)  # its shape changes from [1,1,4,N] to [1,4,N,1]
        if not any(conv.input[1] in n.input for n in graph.node):
            graph.initializer.remove(initializers[conv.input[1]])
        for offset, node in enumerate(replacement):
            graph.node.insert(position + offset, node)
        rewritten += 1
    return rewritten


def merge_split_convolutions(model: onnx.ModelProto) -> int:
    """Undo the split ``models.optimize.graph.prepare`` makes for pruning, before quantizing.

    Each pair of convolutions on one input with the same attributes, each followed by its SiLU,
    whose outputs are the first two inputs of one Concat (C2f's first convolution, split in two
    so that its halves prune independently), becomes one convolution (weights and biases
    stacked), one SiLU and a Split back into the two tensors: exact, and in INT8 one integer
    convolution and one SiLU run where two of each did (a pruned model 1-4 % faster on ONNX
    Runtime; in float the Split costs a reorder, so pruned float models keep the split). Returns
    how many pairs were merged."""
    graph = model.graph
    producers, consumers = _links(graph)
    weights = {t.name: t for t in graph.initializer}

    def silu_of(output: str) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
        mul = producers.get(output)
        if mul is None or mul.op_type != "Mul":
            return None
        conv, sigmoid = producers.get(mul.input[0]), producers.get(mul.input[1])
        if (conv is None or sigmoid is None or conv.op_type != "Conv"
                or sigmoid.op_type != "Sigmoid" or sigmoid.input[0] != conv.output[0]
                or len(consumers.get(conv.output[0], [])) != 2
                or len(consumers.get(sigmoid.output[0], [])) != 1 or len(conv.input) < 3
                or conv.input[1] not in weights or conv.input[2] not in weights):  # fmt: skip
            return None
        return conv, sigmoid, mul

    replace: dict[str, list[onnx.NodeProto]] = {}
    drop: set[str] = set()
    for concat in list(graph.node):
        if concat.op_type != "Concat" or len(concat.input) < 2:
            continue
        axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
        first, second = silu_of(concat.input[0]), silu_of(concat.input[1])
        if axis != 1 or first is None or second is None:
            continue
        (conv0, sig0, mul0), (conv1, sig1, mul1) = first, second
        if conv0.input[0] != conv1.input[0] or conv0.attribute != conv1.attribute:
            continue
        parts = [numpy_helper.to_array(weights[conv.input[1]]) for conv in (conv0, conv1)]
        biases = [numpy_helper.to_array(weights[conv.input[2]]) for conv in (conv0, conv1)]
        stem = conv0.name.rsplit("/", 2)[0] if "/" in conv0.name else conv0.name
        stem = f"{stem}.merged"
        graph.initializer.extend([
            numpy_helper.from_array(np.concatenate(parts), f"{stem}.weight"),
            numpy_helper.from_array(np.concatenate(biases), f"{stem}.bias"),
            numpy_helper.from_array(
                np.array([len(parts[0]), len(parts[1])], dtype=np.int64), f"{stem}.sizes"
            ),
        ])  # fmt: skip
        attributes = {a.name: helper.get_attribute_value(a) for a in conv0.attribute}
        at = next(n.name for n in graph.node if n.name in (conv0.name, conv1.name))  # the first
        replace[at] = [
            helper.make_node("Conv", [conv0.input[0], f"{stem}.weight", f"{stem}.bias"],
                             [f"{stem}.out"], name=stem, **attributes),
            helper.make_node("Sigmoid", [f"{stem}.out"], [f"{stem}.gate"], name=f"{stem}.sigmoid"),
            helper.make_node("Mul", [f"{stem}.out", f"{stem}.gate"], [f"{stem}.silu"],
                             name=f"{stem}.silu"),
            helper.make_node("Split", [f"{stem}.silu", f"{stem}.sizes"],
                             [mul0.output[0], mul1.output[0]], name=f"{stem}.split", axis=1),
        ]  # fmt: skip
        drop |= {n.name for n in (conv0, sig0, mul0, conv1, sig1, mul1)}
    splice_nodes(graph, replace, drop)
    drop_unused_initializers(model)
    return len(replace)


def splice_nodes(
    graph: onnx.GraphProto, replace: dict[str, list[onnx.NodeProto]], drop: set[str]
) -> None:
    """Rewrite ``graph.node`` in order: ``replace[name]`` goes in where the node ``name`` stood,
    and the nodes named in ``drop`` leave."""
    nodes = []
    for node in graph.node:
        nodes += replace.get(node.name, [])
        if node.name not in drop:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads any more (left behind by a rewrite)."""
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def scheme_name(settings: QuantizeSettings) -> str:
    """U8S8, S8S8, U8U8...: activation then weight type, as ONNX Runtime's docs name them."""
    letter = {"int8": "S8", "uint8": "U8"}
    return letter[settings.activations] + letter[settings.weights]


def first_conv_weights(model: onnx.ModelProto) -> list[str]:
    """The weight initializer of each Conv that reads the graph's image input directly."""
    image_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    initializers = {t.name for t in model.graph.initializer}
    return [
        node.input[1]
        for node in model.graph.node
        if node.op_type == "Conv"
        and node.input[0] in image_inputs
        and node.input[1] in initializers
    ]


def _finite(images: Sequence[Path], imgsz: tuple[int, int]) -> Iterator[np.ndarray]:
    """Letterboxed calibration inputs; one that is not finite everywhere is refused with its
    image's name: one NaN turns the calibrated ranges, and so the model, into garbage."""
    for path, tensor in zip(images, tensors(images, imgsz), strict=True):
        if not np.isfinite(tensor).all():
            raise FactoryError(f"calibration input made from {path} is not finite (NaN or inf)")
        yield tensor


class _Reader:
    """ONNX Runtime's CalibrationDataReader over input tensors, with a progress bar."""

    def __init__(
        self, input_name: str, inputs: Iterable[np.ndarray], total: int, progress: bool
    ) -> None:
        self._input_name = input_name
        self._iterator = iter(inputs)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="calibrating", unit="img")

    def get_next(self) -> dict[str, Any] | None:
        tensor = next(self._iterator, None)
        if tensor is None:
            if self._bar is not None:
                self._bar.close()
            return None
        if self._bar is not None:
            self._bar.update(1)
        return {self._input_name: tensor}

    def rewind(self) -> None:  # part of ORT's reader interface; one pass is enough here
        pass


def quantize(
    source: Path,
    calibration: Path,
    output: Path,
    settings: QuantizeSettings = QuantizeSettings(),
    overwrite: bool = False,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
    target: str | None = None,
    frames: int | None = None,
    evaluation: Sequence[Path] = (),
) -> dict[str, Any]:
    """Quantize ``source`` to INT8 QDQ at ``output``; returns the calibration summary.

    ``calibration`` is a folder: with ``frames``, a user's frames of which that many are picked
    evenly (files that are not images or do not decode are skipped and reported through
    ``on_stage``); without, every image in it, each of which must decode. An image that is
    also one of ``evaluation`` (by content) is refused.

    ``target`` (see ``models.recipes``, which picks ``settings`` for it) is recorded in the
    summary and in the model's metadata: what the model was made for.

    Raises:
        ModelError: ``source`` is missing, unreadable or not a YOLOv8 detector.
        FactoryError: bad calibration folder or output path. No partial output is ever left.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    refuse_existing(output, overwrite)
    reference = load_backend("onnxruntime", source, ModelConfig(path=source))  # validates the head
    info = reference.info
    reference.close()
    stage = on_stage or (lambda text: log.info("%s", text))
    available = None
    if frames is None:
        images = calibration_images(calibration)
    else:
        sampled = sample_frames(calibration, frames, "calibration frames")
        images, available = sampled.paths, sampled.available
        for line in sampled.skipped:
            stage(f"skipped {line}")
        stage(f"calibrating on {len(images)} of the {available} frames in {calibration}")
    refuse_overlap(images, evaluation, "calibration")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        stage("pre-processing (shape inference, graph optimization)")
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        except (
            Exception
        ) as exc:  # ORT raises many types here; any of them means the model is unusable
            raise ModelError(
                f"{source}: ONNX Runtime's quantization pre-processing failed: {exc}"
            ) from None
        prepared_model = onnx.load(str(prepared))
        moved = settings.fast_dfl and fast_dfl_layout(prepared_model)
        if moved:
            stage("DFL softmax moved to the last axis (same numbers, faster on CPU)")
        merged = merge_split_convolutions(prepared_model)
        if merged:
            stage(f"{merged} split C2f convolution(s) merged back (same numbers, faster in INT8)")
        if moved or merged:
            onnx.save(prepared_model, str(prepared))
        excluded = head_postprocess_nodes(prepared_model) if settings.keep_head_float else []
        stage(f"keeping {len(excluded)} head post-processing node(s) in float")
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.MinMax,  # then clipped by the overrides
        }[settings.method]
        activation_type = QuantType.QInt8 if settings.activations == "int8" else QuantType.QUInt8
        weight_type = QuantType.QInt8 if settings.weights == "int8" else QuantType.QUInt8
        overrides: dict[str, list[dict[str, Any]]] = {}
        if settings.method == "percentile":
            stage(f"activation ranges: {settings.percentile}th percentile of every value")
            inputs = _finite(images, info.imgsz)
            if progress:
                from tqdm import tqdm

                inputs = tqdm(inputs, total=len(images), desc="activation ranges", unit="img")
            ranges = percentile_ranges(prepared, inputs, len(images), settings.percentile, excluded)
            overrides = {
                name: [{"rmin": np.float32(low), "rmax": np.float32(high)}]
                for name, (low, high) in ranges.items()
            }
        if settings.reduce_range == "first":
            overrides.update(
                {name: [{"reduce_range": True}] for name in first_conv_weights(prepared_model)}
            )
        inputs = _finite(images, info.imgsz)
        reader = _Reader(info.input_name, inputs, len(images), progress)
        with atomic_path(output) as partial:
            quantize_static(
                str(prepared),
                str(partial),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                activation_type=activation_type,
                weight_type=weight_type,
                nodes_to_exclude=excluded,
                calibrate_method=method,
                reduce_range=settings.reduce_range == "all",
                extra_options={
                    "CalibTensorRangeSymmetric": False,
                    "ActivationSymmetric": settings.symmetric_activations,
                    "TensorQuantOverrides": overrides,
                },
            )
            refuse_broken_scales(partial)
            summary = {
                "target": target,
                "format": "QDQ",
                "scheme": scheme_name(settings),
                **asdict(settings),
                "calibration_images": len(images),
                "calibration_folder": str(calibration),
                "calibration_sampled_from": available,
                "float_nodes": len(excluded),
                "source_sha256": file_digest(source),
                "seconds": round(time.monotonic() - started, 1),
            }
            _write_metadata(partial, info.metadata, summary)
    return summary


MAX_SCALE = 1e4  # a step wider than this spans more than any YOLOv8 activation ever reaches


def broken_scales(model: onnx.ModelProto) -> list[str]:
    """Quantization scales no calibration of a working model gives: not finite, not positive,
    or absurdly large (the input's scale came out 2.67e36 from NaN padding, issue 27)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    broken = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        scale = values.get(node.input[1])
        if scale is None or scale.dtype.kind != "f":
            continue
        if not (np.isfinite(scale).all() and (scale > 0).all() and (scale < MAX_SCALE).all()):
            broken.append(node.input[1])
    return sorted(set(broken))


def refuse_broken_scales(path: Path) -> None:
    """Raises FactoryError when calibration gave scales that destroy the model."""
    broken = broken_scales(onnx.load(str(path)))
    if broken:
        raise FactoryError(
            f"calibration gave {len(broken)} unusable quantization scale(s) (not finite, not "
            f"positive or over {MAX_SCALE:g}), e.g. {', '.join(broken[:3])}: the calibration "
            "images or the model produce non-finite activations; nothing was written"
        )


def _write_metadata(path: Path, source_metadata: dict[str, str], summary: dict[str, Any]) -> None:
    """The source model's metadata, plus what was done to it."""
    model = onnx.load(str(path))
    metadata = {
        **source_metadata,
        "precision": "int8",
        "quantization": json.dumps(summary, sort_keys=True),
    }
    if summary.get("target"):
        metadata["target"] = summary["target"]
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))
