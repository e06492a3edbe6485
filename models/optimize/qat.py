"""Quantization-aware training: fake-quantized fine-tuning with distillation from the float model,
exported as the same QDQ form `edge-models quantize` writes for the target.

The converted body is captured by ``torch.export`` and fake-quantized by torchao's pt2e
``prepare_qat_pt2e`` (torch's FX quantization, used before, is deprecated and leaves
onnx2torch's own modules float). ``RecipeQuantizer`` annotates the graph where ONNX Runtime's
quantizer puts its QuantizeLinear/DequantizeLinear pairs for the target's recipe
(``models.recipes``): every convolution's input, weights and output, Sigmoid, Mul, Add and Concat
with ranges of their own (a concat too: torch's default shares one range across it and its
inputs), MaxPool and the upsample sharing their input's range; uint8 activations for x86 (ONNX
Runtime fuses only U8S8 there), int8 for aarch64, symmetric int8 for TensorRT; per-channel
symmetric int8 weights, 7-bit in the first convolution for ``cpu-x86_64`` (AVX2's vpmaddubsw
saturation). Activation ranges are calibrated as ``quantize`` calibrates them (the recipe's
percentile of every value on the same evenly picked frames), then held while the student trains
against the float teacher's raw head maps: training starts from PTQ's model and learns weights that
suit its ranges. Export: observers frozen, ``torch.onnx.export`` turns every fake quantizer into a
QuantizeLinear/DequantizeLinear pair; the weights' pairs are folded into integer initializers
(ONNX Runtime fuses only constant-int8-weight patterns into integer convolutions), and the float
decode is grafted back, so the head's post-processing stays float as in PTQ.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantize,
    MinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    allow_exported_model_train_eval,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
)
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from models.activation_ranges import Tails
from models.calibration import CALIBRATION_FRAMES, even_picks
from models.errors import FactoryError
from models.optimize.torch_model import Detector
from models.recipes import recipe

ANNOTATION = "quantization_annotation"  # the node.meta key pt2e reads (torchao's Q_ANNOTATION_KEY)
aten = torch.ops.aten
# ops with ranges of their own (ONNX Runtime's QLinear* forms), and ops that keep their input's
OWN_RANGE = (aten.sigmoid.default, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor,
             aten.cat.default)  # fmt: skip
INPUT_RANGE = (aten.max_pool2d.default, aten.upsample_nearest2d.vec)
# C2f's Split: each part keeps its input's range, so ONNX Runtime splits int8 (PTQ's layout)
SPLITS = (aten.split_with_sizes.default, aten.split.Tensor)


class PercentileObserver(MinMaxObserver):
    """An activation's range as ``quantize`` takes it: the ``percentile``-th percentile of every
    value the calibration frames produce (and its mirror), spanning 0, kept exactly in tails
    sized for ``frames`` frames (``models.activation_ranges``)."""

    def __init__(self, percentile: float = 99.999, frames: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.share = (100.0 - percentile) / 100.0
        self.frames = frames
        self.tails: Tails | None = None

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        values = x_orig.detach().float().cpu().numpy()
        if self.tails is None:
            self.tails = Tails.for_share(self.share, values[0].size, self.frames)
        self.tails.add(values)
        low, high = self.tails.bounds()
        self.min_val.copy_(torch.tensor(min(low, 0.0)))
        self.max_val.copy_(torch.tensor(max(high, 0.0)))
        return x_orig


class RecipeQuantizer(Quantizer):
    """Fake quantizers where ONNX Runtime's quantizer puts Q/DQ pairs, with ``target``'s recipe
    (ranges for ``frames`` calibration frames)."""

    def __init__(self, target: str, frames: int = 1) -> None:
        super().__init__()
        settings = recipe(target)
        observed = PercentileObserver.with_args(percentile=settings.percentile, frames=frames)
        if settings.activations == "uint8":
            low, high, dtype, scheme = 0, 255, torch.uint8, torch.per_tensor_affine
        else:
            low, high, dtype = -128, 127, torch.int8
            scheme = (torch.per_tensor_symmetric if settings.symmetric_activations
                      else torch.per_tensor_affine)  # fmt: skip
        self.activation = QuantizationSpec(
            dtype=dtype, quant_min=low, quant_max=high, qscheme=scheme,
            observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observed),
        )  # fmt: skip
        self.first_weight = self._weights(7 if settings.reduce_range in ("first", "all") else 8)
        self.weight = self._weights(7 if settings.reduce_range == "all" else 8)
        seven_bit = settings.reduce_range == "first"
        self.record = {
            "target": target,
            "scheme": ("U8S8" if settings.activations == "uint8" else "S8S8")
            + (", 7-bit first conv" if seven_bit else ""),
            "method": "qat",
            "calibration": f"{settings.percentile}th percentile, {frames} frames",
        }

    @staticmethod
    def _weights(bits: int) -> QuantizationSpec:
        return QuantizationSpec(
            dtype=torch.int8, quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
            qscheme=torch.per_channel_symmetric, ch_axis=0,
            observer_or_fake_quant_ctr=FakeQuantize.with_args(
                observer=MovingAveragePerChannelMinMaxObserver),
        )  # fmt: skip

    def annotate(self, model: GraphModule) -> GraphModule:
        act = self.activation
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target == aten.conv2d.default:
                image, weight = node.args[0], node.args[1]
                first = isinstance(image, Node) and image.op == "placeholder"
                inputs = {image: act, weight: self.first_weight if first else self.weight}
                output: Any = act
            elif node.target in OWN_RANGE:
                values = node.args[0] if node.target == aten.cat.default else node.args[:2]
                inputs = {v: act for v in values if isinstance(v, Node)}
                output = act
            elif node.target in INPUT_RANGE:
                inputs = {node.args[0]: act}
                output = SharedQuantizationSpec((node.args[0], node))
            elif node.target in SPLITS:  # its parts are the getitems after it
                inputs, output = {node.args[0]: act}, None
            elif node.target is operator.getitem and _is_split(node.args[0]):
                split = node.args[0]
                inputs, output = {}, SharedQuantizationSpec((split.args[0], split))
            else:
                continue
            node.meta[ANNOTATION] = QuantizationAnnotation(
                input_qspec_map=inputs, output_qspec=output, _annotated=True)  # fmt: skip
        return model

    def validate(self, model: GraphModule) -> None:
        """Every convolution annotated (a form of it ``annotate`` does not know, left float, would
        run as a float Conv on the device)."""
        convs = [n for n in model.graph.nodes
                 if n.op == "call_function" and "conv" in str(n.target)]  # fmt: skip
        missing = [n.name for n in convs if ANNOTATION not in n.meta]
        if missing:
            raise FactoryError(f"QAT: convolutions this quantizer does not know: {missing[:5]}")


def _is_split(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in SPLITS


def fixed_upsamples(module: GraphModule) -> int:
    """onnx2torch's Resize reads its scales from a tensor at run time, which ``torch.export``
    cannot trace; YOLOv8's two are a fixed x2 nearest upsample, written here as that call.
    Returns how many were replaced."""
    from onnx2torch.node_converters.resize import OnnxResize

    replaced = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module":
            continue
        if not isinstance(module.get_submodule(node.target), OnnxResize):
            continue
        scales = node.kwargs.get("scales")
        if scales is not None and scales.op == "get_attr":  # an initializer
            factors = module.get_buffer(scales.target).tolist()
        elif scales is not None and scales.op == "call_module" and not scales.args:
            factors = module.get_submodule(scales.target)().tolist()  # a Constant node (re-export)
        else:
            factors = []
        if module.get_submodule(node.target).onnx_mode != "nearest" or len(factors) != 4:
            raise FactoryError(
                f"QAT: {node.target} is not a nearest Resize with constant scales (YOLOv8's)"
            )
        with module.graph.inserting_after(node):
            call = module.graph.call_function(
                torch.nn.functional.interpolate, (node.args[0],),
                {"scale_factor": tuple(float(f) for f in factors[2:]), "mode": "nearest"},
            )  # fmt: skip
        node.replace_all_uses_with(call)
        module.graph.erase_node(node)
        replaced += 1
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return replaced


def capture(module: GraphModule, example: torch.Tensor) -> GraphModule:
    """The converted body as ``torch.export`` sees it (ATen ops; any batch and image size), the
    form pt2e quantizes."""
    module = copy.deepcopy(module)
    fixed_upsamples(module)
    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, (example,),
                                       dynamic_shapes=({0: auto, 2: auto, 3: auto},))  # fmt: skip
    return exported.module()


def prepare(detector: Detector, target: str, frames: Any,
            progress: Callable[[int], None] | None = None) -> tuple[Detector, dict]:  # fmt: skip
    """A fake-quantized copy of ``detector``, its activation ranges calibrated on up to
    ``CALIBRATION_FRAMES`` of ``frames`` (picked evenly, as ``quantize --frames`` picks them) and
    then held; the weights' quantizers follow the weights as they train. ``progress(n)`` is
    called as each n frames have been calibrated on."""
    picks = even_picks(len(frames), CALIBRATION_FRAMES)
    quantizer = RecipeQuantizer(target, len(picks))
    # two images: torch.export fixes any dimension it sees at size 1 (one calibration frame)
    example = torch.from_numpy(frames[picks[:1]]).repeat(2, 1, 1, 1)
    quantized = prepare_qat_pt2e(capture(detector.module, example), quantizer)
    allow_exported_model_train_eval(quantized)  # distillation calls train() and eval()
    quantized.apply(disable_fake_quant)  # ranges of the float model's values, as PTQ takes them
    with torch.no_grad():
        for start in range(0, len(picks), 4):
            batch = picks[start : start + 4]
            quantized(torch.from_numpy(frames[batch]))
            if progress is not None:
                progress(len(batch))
    quantized.apply(enable_fake_quant)
    hold_activation_ranges(quantized)
    record = dict(quantizer.record)
    record["fake_quantizers"] = sum(isinstance(m, FakeQuantize) for m in quantized.modules())
    return dataclasses.replace(detector, module=quantized), record


def weight_quantizers(module: GraphModule) -> list[tuple[str, FakeQuantize]]:
    """(weight's name, its fake quantizer) for every quantized weight, in graph order."""
    found = []
    for node in module.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        source = node.args[0]
        layer = module.get_submodule(node.target)
        if isinstance(layer, FakeQuantize) and isinstance(source, Node) \
                and source.op == "get_attr":  # fmt: skip
            found.append((source.target, layer))
    return found


def hold_activation_ranges(module: torch.nn.Module) -> None:
    """Every activation quantizer keeps its calibrated range from now on (the weights' quantizers
    go on observing); the percentile tails, no longer needed, are let go."""
    for layer in module.modules():
        if isinstance(layer, FakeQuantize) and isinstance(
            layer.activation_post_process, PercentileObserver
        ):
            layer.disable_observer()
            layer.activation_post_process.tails = None


def freeze(detector: Detector) -> None:
    """Observers off (their ranges are final), and 7-bit weights in the 8-bit form ONNX takes,
    for export."""
    detector.module.eval()
    detector.module.apply(disable_observer)
    widen_narrow_weights(detector.module)


def widen_narrow_weights(module: GraphModule) -> int:
    """ONNX's QuantizeLinear takes only the int8 (and uint8) range, so a 7-bit weight quantizer
    (-64..63) cannot be exported as it is. Each such weight is clamped to its 7-bit range (the
    training's last steps may have moved it past the observed one) and its quantizer set to
    -128..127 with the same scales: it computes exactly the same integers, in the form the
    exporter accepts. Returns how many were widened."""
    widened = 0
    with torch.no_grad():
        for name, quantizer in weight_quantizers(module):
            if (quantizer.quant_min, quantizer.quant_max) != (-64, 63):
                continue
            weight = module.get_parameter(name)
            scale = quantizer.scale.reshape(-1, *[1] * (weight.dim() - 1))
            weight.copy_(torch.maximum(torch.minimum(weight, 63 * scale), -64 * scale))
            quantizer.quant_min, quantizer.quant_max = -128, 127
            observer = quantizer.activation_post_process  # what forward() reads the range from
            observer.quant_min, observer.quant_max = -128, 127
            widened += 1
    return widened


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Each QuantizeLinear of a constant (a weight) becomes that constant in int8: DequantizeLinear
    reads the integers directly, the pattern ONNX Runtime fuses. Returns how many were folded."""
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def constant(name: str) -> np.ndarray | None:
        while name not in values and name in producers:
            node = producers[name]
            if node.op_type == "Identity":
                name = node.input[0]
            elif node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t)
            else:
                return None
        return numpy_helper.to_array(values[name]) if name in values else None

    # the exporter passes shared constants (scales, zero points) through Identity nodes; ONNX
    # Runtime fuses a Q/DQ pair only when its scale and zero point are initializers
    renamed = {n.output[0]: n.input[0] for n in graph.node
               if n.op_type == "Identity" and n.input[0] in values}  # fmt: skip
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    folded, drop = (
        0,
        {id(n) for n in graph.node if n.op_type == "Identity" and n.output[0] in renamed},
    )
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        weight, scale = constant(node.input[0]), constant(node.input[1])
        zero = constant(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if weight is None or scale is None or zero is None or weight.ndim != 4:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale_b = scale.reshape(shape) if scale.ndim else scale
        zero_b = zero.reshape(shape) if zero.ndim else zero
        info = np.iinfo(zero.dtype)
        integers = np.clip(np.round(weight / scale_b) + zero_b.astype(np.int32), info.min, info.max)
        name = f"{node.output[0]}.int"
        graph.initializer.append(numpy_helper.from_array(integers.astype(zero.dtype), name))
        for consumer in graph.node:
            consumer.input[:] = [name if i == node.output[0] else i for i in consumer.input]
        drop.add(id(node))
        folded += 1
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    _scalar_quantization_parameters(model)
    return folded


def _scalar_quantization_parameters(model: onnx.ModelProto) -> None:
    """Per-tensor scales and zero points as scalars, not [1] tensors: ONNX Runtime fuses Mul, Add
    and Sigmoid into their integer forms only with scalar ones (Conv accepts either)."""
    graph = model.graph
    names = {n.input[k] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
             for k in (1, 2) if len(n.input) > k}  # fmt: skip
    for index, tensor in enumerate(graph.initializer):
        if tensor.name in names and list(tensor.dims) == [1]:
            value = numpy_helper.to_array(tensor).reshape(())
            graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
