"""Our ONNX YOLOv8 made ready for torch: the same function, in a form that converts and prunes.

Three rewrites, each exact (the prepared graph gives the source's outputs bit for bit in ONNX
Runtime):

- every C2f's first convolution, whose output is split in two, becomes two convolutions (the
  weight's two halves), each with its own SiLU: DepGraph pruning cannot follow a split whose
  halves go different ways; two convolutions it prunes independently (torch-pruning's own YOLOv8
  recipe does the same on the PyTorch modules);
- the graph is cut at the six head convolutions (found by structure, as the RK3588 cut finds
  them; named ``head_box_p3`` ... ``head_class_p5`` so pruning leaves them): the body that is
  trained ends at the raw maps (DFL bins, class logits), which work at any input size, where the
  decode has 640 x 640 baked in. The decode is kept aside and grafted back, unchanged, onto the
  exported body (``attach_decode``);
- the opset is relabelled from 20 to 17: onnx2torch reads Split only up to 17, and the ops our
  models use mean the same in 17 (Split's sizes are an input in both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from agent.contract import ModelError
from models.convert.split_head import head_maps
from models.quantize import drop_unused_initializers, head_postprocess_nodes, splice_nodes

OPSET = 17
HEAD_NAMES = [f"head_{kind}_p{level}" for level in (3, 4, 5) for kind in ("box", "class")]
DFL_NAME = "head_dfl"


@dataclass
class Prepared:
    model: onnx.ModelProto  # the whole rewritten graph (its outputs: the decoded one)
    body: onnx.ModelProto  # image -> the six head maps: what is trained
    maps: list[str]  # the head maps' tensor names, in HEAD_NAMES order
    heads: list[str]  # node names of the six head convolutions (never pruned)
    dfl: str  # node name of the DFL convolution (part of the decode)
    split_convs: int  # C2f first convolutions split in two


def prepare(source: onnx.ModelProto) -> Prepared:
    """The rewritten copy of ``source`` (which is left alone).

    Raises:
        ModelError: not a YOLOv8 detect model (no head found, no DFL).
    """
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    maps = head_maps(model)  # raises ModelError for anything that is not a YOLOv8 detect head
    split = _split_c2f_convolutions(model)
    producers = {out: node for node in graph.node for out in node.output}
    heads = []
    for name, found in zip(HEAD_NAMES, maps, strict=True):
        producers[found.name].name = name
        heads.append(name)
    post = set(head_postprocess_nodes(model))
    dfl = [n for n in graph.node if n.name in post and n.op_type == "Conv"]
    if len(dfl) != 1:
        raise ModelError(f"expected one DFL convolution in the head, found {len(dfl)}")
    dfl[0].name = DFL_NAME
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > OPSET:
            opset.version = OPSET
    drop_unused_initializers(model)
    # the extractor needs every output's shape: a re-exported model may not carry them
    body = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(
        [_image_input(model)], [found.name for found in maps]
    )
    return Prepared(model, body, [found.name for found in maps], heads, DFL_NAME, split)


def _image_input(model: onnx.ModelProto) -> str:
    initializers = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def attach_decode(body: onnx.ModelProto, prepared: Prepared) -> onnx.ModelProto:
    """``body`` (an exported, maybe pruned body whose outputs carry the head maps' names) with the
    prepared model's decode grafted back: the same decoded output as the source's."""
    full = prepared.model
    upstream = _upstream(full, prepared.maps)
    decode = [n for n in full.graph.node if not set(n.output) & upstream]
    made = {out for node in decode for out in node.output}
    wanted = {name for node in decode for name in node.input} - made - set(prepared.maps)
    shared = [n for n in full.graph.node if n.op_type == "Constant" and n.output[0] in wanted]
    decode = shared + decode  # constants the body also uses: the exported body renamed its own
    needed = {name for node in decode for name in node.input}
    model = onnx.ModelProto()
    model.CopyFrom(body)
    taken = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(
        t for t in full.graph.initializer if t.name in needed and t.name not in taken
    )
    model.graph.node.extend(decode)
    del model.graph.output[:]
    model.graph.output.extend(full.graph.output)
    del model.opset_import[:]
    model.opset_import.extend(full.opset_import)
    return onnx.utils.Extractor(model).extract_model(
        [_image_input(model)], [o.name for o in full.graph.output]
    )


def _upstream(model: onnx.ModelProto, outputs: list[str]) -> set[str]:
    """Every tensor the given ones are computed from (themselves included)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(node.input)
    return seen


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _split_c2f_convolutions(model: onnx.ModelProto) -> int:
    """Each Split(SiLU(Conv(x))) with constant sizes on the channel axis -> one Conv + SiLU per
    part, the weight and bias cut the same way. Returns how many were split."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    weights = {t.name: t for t in graph.initializer}
    replace: dict[str, list[onnx.NodeProto]] = {}
    drop: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "Split" or len(node.input) < 2:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        mul = producers.get(node.input[0])
        if axis != 1 or mul is None or mul.op_type != "Mul" or consumers.get(mul.output[0]) != 1:
            continue
        conv, sigmoid = producers.get(mul.input[0]), producers.get(mul.input[1])
        sizes = _constant(model, node.input[1])
        if (conv is None or sigmoid is None or conv.op_type != "Conv"
                or sigmoid.op_type != "Sigmoid" or sigmoid.input[0] != conv.output[0]
                or consumers.get(conv.output[0]) != 2 or sizes is None
                or conv.input[1] not in weights or len(conv.input) < 3):  # fmt: skip
            continue
        weight = numpy_helper.to_array(weights[conv.input[1]])
        bias = numpy_helper.to_array(weights[conv.input[2]])
        attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        start, made = 0, []
        for part, (size, out) in enumerate(zip(sizes.tolist(), node.output, strict=True)):
            stem = f"{conv.name}.part{part}"
            graph.initializer.extend([
                numpy_helper.from_array(weight[start:start + size], f"{stem}.weight"),
                numpy_helper.from_array(bias[start:start + size], f"{stem}.bias"),
            ])  # fmt: skip
            made += [
                helper.make_node("Conv", [conv.input[0], f"{stem}.weight", f"{stem}.bias"],
                                 [f"{stem}.out"], name=stem, **attributes),
                helper.make_node("Sigmoid", [f"{stem}.out"], [f"{stem}.gate"],
                                 name=f"{stem}.sigmoid"),
                helper.make_node("Mul", [f"{stem}.out", f"{stem}.gate"], [out],
                                 name=f"{stem}.silu"),
            ]  # fmt: skip
            start += size
        if start != weight.shape[0]:
            continue
        replace[conv.name] = made
        drop |= {conv.name, sigmoid.name, mul.name, node.name}
    splice_nodes(graph, replace, drop)
    return len(replace)
