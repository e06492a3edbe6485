"""Quantization-aware training: fake-quantized fine-tuning with distillation from the float model,
exported as the same QDQ form `edge-models quantize` writes for the target.

torch's FX graph mode (``prepare_qat_fx``) inserts fake quantizers around every convolution of the
converted body (onnx2torch's own op modules are left as they are: they are marked non-traceable),
with the target's recipe from ``models.recipes``: uint8 activations for x86 (ONNX Runtime fuses
only U8S8 there), int8 for aarch64, symmetric int8 for TensorRT; per-channel symmetric int8
weights (-128..127), 7-bit in the first convolution for ``cpu-x86_64`` (AVX2's vpmaddubsw
saturation). Activation ranges are calibrated as ``quantize`` calibrates them (the recipe's
percentile of every value on the same evenly picked frames), then held while the student trains
against the float teacher's raw head maps: training starts from PTQ's model and learns weights that
suit its ranges, instead of starting from min-max ranges of a few frames (min-max alone costs
PTQ about a point on voc2007-val) and chasing a moving average of them. Export: observers frozen,
``torch.onnx.export`` turns every fake quantizer into a QuantizeLinear/DequantizeLinear pair; the
weights' pairs are folded into integer initializers (ONNX Runtime fuses only constant-int8-weight
patterns into integer convolutions), and the float decode is grafted back, so the head's
post-processing stays float as in PTQ.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.ao.quantization import (
    FakeQuantize,
    MinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
)
from torch.ao.quantization.backend_config import (
    BackendConfig,
    ObservationType,
    get_native_backend_config,
)
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from models.activation_ranges import Tails
from models.calibration import even_picks
from models.optimize.torch_model import Detector
from models.recipes import recipe

CALIBRATION_FRAMES = 300  # as many as `edge-models quantize --count` takes by default


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


def qconfig_mapping(target: str, first_conv: str,
                    frames: int = 1) -> tuple[QConfigMapping, dict[str, Any]]:  # fmt: skip
    """The fake quantizers for ``target``'s recipe (activation ranges for ``frames`` calibration
    frames), and the recipe as recorded."""
    settings = recipe(target)
    observed = {"observer": PercentileObserver, "percentile": settings.percentile, "frames": frames}
    if settings.activations == "uint8":
        activation = FakeQuantize.with_args(
            quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
            **observed,
        )  # fmt: skip
    else:
        scheme = (
            torch.per_tensor_symmetric
            if settings.symmetric_activations
            else torch.per_tensor_affine
        )
        activation = FakeQuantize.with_args(
            quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=scheme, **observed,
        )  # fmt: skip

    def weights(bits: int) -> Any:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=low, quant_max=high,
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0,
        )  # fmt: skip

    seven_bit = settings.reduce_range in ("first", "all")
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weights(
        7 if settings.reduce_range == "all" else 8)))  # fmt: skip
    if settings.reduce_range == "first":
        mapping.set_module_name(first_conv, QConfig(activation=activation, weight=weights(7)))
    scheme = ("U8S8" if settings.activations == "uint8" else "S8S8") + (
        ", 7-bit first conv" if seven_bit and settings.reduce_range == "first" else ""
    )
    return mapping, {
        "target": target,
        "scheme": scheme,
        "method": "qat",
        "calibration": f"{settings.percentile}th percentile, {frames} frames",
    }


def as_functions(module: torch.fx.GraphModule) -> int:
    """onnx2torch's Add/Mul/Sub/Div and Concat modules as the torch functions they call, so that
    FX quantizes them too (SiLU's Mul, the residual Add, C2f's Concat): ONNX Runtime then runs
    them as integer ops, instead of converting every activation to float and back around them."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
    from onnx2torch.node_converters.concat import OnnxConcat

    replaced = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module":
            continue
        target = module.get_submodule(node.target)
        with module.graph.inserting_after(node):
            if (
                isinstance(target, OnnxBinaryMathOperation)
                and target.broadcast is None
                and (target.math_op_function in (torch.add, torch.mul, torch.sub))
            ):
                call = module.graph.call_function(target.math_op_function, tuple(node.args))
            elif isinstance(target, OnnxConcat):
                call = module.graph.call_function(torch.cat, (list(node.args), target.axis))
            else:
                continue
        node.replace_all_uses_with(call)
        module.graph.erase_node(node)
        replaced += 1
    module.graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    return replaced


def concat_with_ranges_of_its_own() -> BackendConfig:
    """torch's native lowering, except that ``torch.cat`` observes its output apart from its
    inputs, as ``quantize`` does. torch shares one range between a concat and everything it
    joins, so each C2f branch (which also feeds the next bottleneck and the residual add) took
    the widest branch's step: up to 60 % coarser, half a point of mAP50-95 on every 5th
    voc2007-val image before any training. ONNX Runtime's QLinearConcat requantizes inputs of
    different scales, so the integer graph stays the same."""
    config = get_native_backend_config()
    for pattern in config.configs:
        if pattern.pattern is torch.cat:
            pattern.set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
    return config


def prepare(detector: Detector, target: str, frames: Any,
            progress: Callable[[int], None] | None = None) -> tuple[Detector, dict]:  # fmt: skip
    """A fake-quantized copy of ``detector``, its activation ranges calibrated on up to
    ``CALIBRATION_FRAMES`` of ``frames`` (picked evenly, as ``quantize --frames`` picks them) and
    then held; the weights' quantizers follow the weights as they train. ``progress(n)`` is
    called as each n frames have been calibrated on."""
    module = copy.deepcopy(detector.module)
    as_functions(module)
    leaves = sorted({type(m) for m in module.modules()
                     if type(m).__module__.startswith("onnx2torch")}, key=str)  # fmt: skip
    first = next(name for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d))
    picks = even_picks(len(frames), CALIBRATION_FRAMES)
    mapping, record = qconfig_mapping(target, first, len(picks))
    example = torch.from_numpy(frames[picks[:1]])
    with warnings.catch_warnings():  # torch warns for every fixed-range op (sigmoid) it keeps
        warnings.simplefilter("ignore", UserWarning)
        quantized = prepare_qat_fx(
            module.train(), mapping, (example,),
            prepare_custom_config=PrepareCustomConfig().set_non_traceable_module_classes(leaves),
            backend_config=concat_with_ranges_of_its_own(),
        )  # fmt: skip
    quantized.apply(disable_fake_quant)  # ranges of the float model's values, as PTQ takes them
    with torch.no_grad():
        for start in range(0, len(picks), 4):
            batch = picks[start : start + 4]
            quantized(torch.from_numpy(frames[batch]))
            if progress is not None:
                progress(len(batch))
    quantized.apply(enable_fake_quant)
    hold_activation_ranges(quantized)
    record["fake_quantizers"] = sum(isinstance(m, FakeQuantize) for m in quantized.modules())
    return dataclasses.replace(detector, module=quantized), record


def hold_activation_ranges(module: torch.nn.Module) -> None:
    """Every activation quantizer keeps its calibrated range from now on (the weights' quantizers
    go on observing); the percentile tails, no longer needed, are let go."""
    for name, layer in module.named_modules():
        if isinstance(layer, FakeQuantize) and not name.endswith("weight_fake_quant"):
            layer.disable_observer()
            if isinstance(layer.activation_post_process, PercentileObserver):
                layer.activation_post_process.tails = None


def freeze(detector: Detector) -> None:
    """Observers off (their ranges are final), and 7-bit weights in the 8-bit form ONNX takes,
    for export."""
    detector.module.eval()
    detector.module.apply(disable_observer)
    widen_narrow_weights(detector.module)


def widen_narrow_weights(module: torch.nn.Module) -> int:
    """ONNX's QuantizeLinear takes only the int8 (and uint8) range, so a 7-bit weight quantizer
    (-64..63) cannot be exported as it is. Each such weight is clamped to its 7-bit range (the
    training's last steps may have moved it past the observed one) and its quantizer set to
    -128..127 with the same scales: it computes exactly the same integers, in the form the
    exporter accepts. Returns how many were widened."""
    widened = 0
    with torch.no_grad():
        for layer in module.modules():
            quantizer = getattr(layer, "weight_fake_quant", None)
            if quantizer is None or (quantizer.quant_min, quantizer.quant_max) != (-64, 63):
                continue
            scale = quantizer.scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
            layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, 63 * scale), -64 * scale))
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
