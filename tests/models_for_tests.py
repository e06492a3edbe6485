"""Small ONNX graphs built at test time: valid models that are not YOLOv8 detectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(graph: onnx.GraphProto, path: Path, metadata: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def classifier(path: Path) -> Path:
    """Image in, [1, 1000] logits out: a classifier, not a detector."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])
    weight = numpy_helper.from_array(np.zeros((3, 1000), np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    return save(helper.make_graph(nodes, "classifier", [x], [y], [weight]), path)


def identity(path: Path) -> Path:
    """Image in, the same image out."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 64, 64])
    return save(
        helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "id", [x], [y]), path
    )


def tiny_detector(
    path: Path, classes: int = 2, side: int = 64, metadata: dict[str, str] | None = None
) -> Path:
    """A graph with a YOLOv8-shaped head ([1, 4+nc, anchors]) whose output is all zeros."""
    anchors = sum((side // s) ** 2 for s in (8, 16, 32))
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, side, side])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + classes, anchors])
    zeros = numpy_helper.from_array(np.zeros((1, 4 + classes, anchors), np.float32), "zeros")
    nodes = [
        helper.make_node("ReduceSum", ["images"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero_scalar"], ["nothing"]),
        helper.make_node("Add", ["zeros", "nothing"], ["output0"]),
    ]
    zero_scalar = numpy_helper.from_array(np.array(0, np.float32), "zero_scalar")
    graph = helper.make_graph(nodes, "tiny", [x], [y], [zeros, zero_scalar])
    return save(graph, path, metadata)


def warmup_crasher(path: Path, side: int = 64) -> Path:
    """A well-formed YOLOv8-shaped detector (2 classes) that fails on its first inference: its
    Reshape cannot fit the image into the declared head."""
    anchors = sum((side // s) ** 2 for s in (8, 16, 32))
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, side, side])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, anchors])
    shape = numpy_helper.from_array(np.array([1, 6, anchors], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["images", "shape"], ["output0"])]
    graph = helper.make_graph(nodes, "crasher", [x], [y], [shape])
    return save(graph, path, {"names": "{0: 'person', 1: 'car'}", "task": "detect"})
