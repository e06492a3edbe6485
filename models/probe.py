"""Cut a QDQ model's first convolution out as a tiny probe model that travels in the golden set.

The first convolution is where int8 kernels are pushed hardest: raw pixels (0..255 once
quantized) meet the stem's weights, and that is where x86 kernels without VNNI saturate (see
``agent.contract.targets``). The probe holds that convolution with its own scales and weights (a
few KB) and the quantizer of its output, so a device can check its kernels on it
(``agent.updates.kernel_check``) without any tool beyond ONNX Runtime. Found by structure: graph
input -> QuantizeLinear -> DequantizeLinear -> Conv (weights through DequantizeLinear) ->
QuantizeLinear.
"""

from __future__ import annotations

import onnx
from onnx import helper


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _only(nodes: list[onnx.NodeProto], op_type: str) -> onnx.NodeProto | None:
    matching = [n for n in nodes if n.op_type == op_type]
    return matching[0] if len(matching) == 1 else None


def first_conv_probe(model: onnx.ModelProto) -> bytes | None:
    """The serialized probe model, or None when the first convolution is not static QDQ int8
    (a float model, dynamic quantization, or a graph of another shape)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None
    consumers = _consumers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    quant_in = _only(consumers.get(inputs[0].name, []), "QuantizeLinear")
    dequant_in = quant_in and _only(consumers.get(quant_in.output[0], []), "DequantizeLinear")
    conv = dequant_in and _only(consumers.get(dequant_in.output[0], []), "Conv")
    quant_out = conv and _only(consumers.get(conv.output[0], []), "QuantizeLinear")
    if not (quant_in and dequant_in and conv and quant_out):
        return None
    weight_dq = producers.get(conv.input[1])
    if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
        return None
    nodes = [quant_in, dequant_in]
    nodes += [producers[name] for name in conv.input[1:] if name in producers]
    nodes += [conv, quant_out]
    constants = [
        producers[name]
        for node in nodes
        for name in node.input
        if name in producers and producers[name].op_type == "Constant"
    ]
    needed = {name for node in [*constants, *nodes] for name in node.input}
    zero_point = initializers.get(quant_out.input[2]) if len(quant_out.input) > 2 else None
    out_type = zero_point.data_type if zero_point is not None else onnx.TensorProto.UINT8
    image = helper.make_tensor_value_info(
        inputs[0].name, onnx.TensorProto.FLOAT, [1, 3, "height", "width"]
    )
    result = helper.make_tensor_value_info(quant_out.output[0], out_type, [1, "c", "h", "w"])
    probe = helper.make_model(
        helper.make_graph(
            [*constants, *nodes],
            "first-conv-probe",
            [image],
            [result],
            [initializers[name] for name in sorted(needed) if name in initializers],
        ),
        opset_imports=model.opset_import,
    )
    probe.ir_version = model.ir_version
    return probe.SerializeToString()
