"""The INT8 recipe for each target: the form its kernels run fast and compute right.

Every recipe takes activation ranges at the 99.999th percentile of the calibration values (the
``QuantizeSettings`` default; on voc2007-val about a point better than min-max). What differs per
target (reasons first measured on coco8 on an AVX2-only x86 CPU; docs/performance.md):

- ``cpu-x86_64`` (no VNNI): ONNX Runtime fuses QDQ into integer convolutions on x86 only for
  uint8 activations (U8S8); its AVX2 kernels multiply with ``vpmaddubsw``, whose 16-bit pair sums
  saturate when full-range weights meet large activations. That happens in the first convolution,
  where raw pixels (0..255) meet the stem's weights: full range loses 9-10 points. 7-bit weights
  there alone (255 x 64 x 2 < 32767: saturation cannot happen) keep the accuracy and the speed;
  7-bit weights everywhere cost 1-2 points for nothing (NNCF's overflow fix defaults to the first
  layer for the same reason). S8S8 stays float between Q/DQ pairs on x86: slower than fp32.
- ``cpu-x86_64-vnni``: VNNI/AMX accumulate in 32 bits, so full-range U8S8 is exact and fast.
- ``cpu-aarch64``: ONNX Runtime's aarch64 kernels fuse S8S8 as well as U8S8 and accumulate
  without saturation; S8S8 is its documented default and the symmetric form accelerators read.
- ``jetson-*`` (TensorRT): S8S8 with symmetric activations (zero point 0), per-channel weights:
  TensorRT's explicit quantization takes exactly that.
- ``openvino``: the same U8S8 with a 7-bit first convolution as ``cpu-x86_64``. OpenVINO reads
  the QDQ ONNX itself and runs it on oneDNN, whose int8 kernels without VNNI pair-sum in 16 bits
  like ONNX Runtime's (oneDNN's documentation advises 7-bit weights there); its fallback is
  ``cpu-x86_64``, so one file is right on any x86 CPU it lands on.
- ``rk3588``: the NPU quantizes in rknn-toolkit2, not here.
"""

from __future__ import annotations

from models.errors import FactoryError
from models.kernels import known_target
from models.quantize import QuantizeSettings

_RECIPES = {
    "cpu-x86_64": dict(activations="uint8", reduce_range="first"),
    "cpu-x86_64-vnni": dict(activations="uint8"),
    "cpu-aarch64": dict(activations="int8"),
    "openvino": dict(activations="uint8", reduce_range="first"),
}
_TENSORRT = dict(activations="int8", symmetric_activations=True)


def recipe(target: str, **overrides: object) -> QuantizeSettings:
    """The settings ``edge-models quantize --target`` uses; ``overrides`` win (None is ignored).

    Raises:
        FactoryError: an unknown target, or one whose models are not made by this quantizer.
    """
    known_target(target)
    if target.startswith("jetson-"):
        chosen = dict(_TENSORRT)
    elif target in _RECIPES:
        chosen = dict(_RECIPES[target])
    else:
        raise FactoryError(
            f"{target} models are not made by `edge-models quantize`: the RK3588 NPU quantizes "
            "in rknn-toolkit2 (its own conversion step)"
        )
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return QuantizeSettings(**chosen)  # type: ignore[arg-type]
