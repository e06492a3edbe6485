"""Cut a YOLOv8 ONNX model at its six head convolutions, found by structure, not by name.

NPUs that quantize the whole graph lose everything after those convolutions (one int8 scale for
the final Concat of 0..640 boxes and 0..1 scores collapses every score to 0; the 8400-wide decode
overflows an RK3588 register field), so an NPU model ends there and ``agent.vision.split_head``
finishes the head on the CPU. The convolutions are the inputs of the head's 4-D -> 3-D flattening
(the quantizer keeps everything after it in float for the same reason); a branch is a box branch
when its data reaches the DFL Softmax, a class branch when it reaches the Sigmoid first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import shape_inference

from agent.contract import ModelError
from agent.vision import STRIDES
from models.quantize import head_postprocess_nodes


@dataclass(frozen=True)
class HeadMap:
    name: str  # the tensor (a Conv output)
    kind: str  # "box" or "class"
    channels: int
    height: int
    width: int


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    graph = shape_inference.infer_shapes(model).graph
    dims = {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        shape = info.type.tensor_type.shape
        dims[info.name] = [d.dim_value for d in shape.dim]
    return dims


def head_maps(model: onnx.ModelProto) -> list[HeadMap]:
    """The six head maps in the order ``merge_split_head`` takes: box, class per stride 8, 16, 32.

    Raises:
        ModelError: not a YOLOv8 detect head (no flattening, not three box/class pairs).
    """
    nodes = {n.name: n for n in model.graph.node}
    flattening = [
        nodes[name]
        for name in head_postprocess_nodes(model)
        if nodes[name].op_type in ("Reshape", "Flatten")
    ]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dims = _dims(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    found = []
    for node in flattening:
        source = node.input[0]
        if producers.get(source) is None or producers[source].op_type != "Conv":
            continue  # a later reshape (the DFL's own), not a head map
        shape = dims.get(source, [])
        if len(shape) != 4 or 0 in shape:
            continue
        kind = _branch_kind(node, consumers)
        if kind is not None:
            found.append(HeadMap(source, kind, shape[1], shape[2], shape[3]))
    levels = sorted({(m.height, m.width) for m in found}, reverse=True)
    ordered = []
    for size in levels:
        pair = {m.kind: m for m in found if (m.height, m.width) == size}
        ordered += [pair.get("box"), pair.get("class")]
    if len(levels) != len(STRIDES) or None in ordered:
        raise ModelError(
            "cannot find the YOLOv8 head's six convolutions (a box and a class map at each of "
            f"3 strides); found {[(m.kind, m.channels, m.height, m.width) for m in found]}"
        )
    return ordered  # type: ignore[return-value]


def _branch_kind(start: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str | None:
    """Follow the data forward: the DFL's Softmax means box, the Sigmoid means class."""
    frontier, seen = [start], set()
    while frontier:
        following = []
        for node in frontier:
            if node.op_type == "Softmax":
                return "box"
            if node.op_type == "Sigmoid":
                return "class"
            for output in node.output:
                for nxt in consumers.get(output, []):
                    if nxt.name not in seen:
                        seen.add(nxt.name)
                        following.append(nxt)
        frontier = following
    return None


def cut_at_head(source: Path, out: Path) -> list[HeadMap]:
    """Write the graph from the image input to the six head maps; returns them in order.

    Raises:
        ModelError: not a readable YOLOv8 detect model.
    """
    try:
        model = onnx.load(str(source))
    except Exception as exc:
        raise ModelError(f"{source} is not a readable ONNX model: {exc}") from None
    maps = head_maps(model)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    extractor = onnx.utils.Extractor(model)
    cut = extractor.extract_model(inputs, [m.name for m in maps])
    cut.metadata_props.extend(model.metadata_props)
    del cut.opset_import[:]
    cut.opset_import.extend(model.opset_import)
    onnx.save(cut, str(out))
    return maps
