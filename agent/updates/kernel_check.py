"""Does this CPU's int8 kernels compute a model as the model means? Checked on the device.

A QDQ model *means* float arithmetic between its quantize/dequantize pairs; ONNX Runtime with
graph optimizations off runs exactly that, on any CPU. With them on, it fuses each pair into an
integer convolution on this CPU's own kernels, which must give the same integers (one step of
rounding apart at most). On x86 without VNNI they do not when full-range weights meet bright
pixels: ``vpmaddubsw`` saturates. The golden set carries the model's first convolution as a
tiny probe model (``models.probe``); this runs it both ways on bright synthetic frames.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

PROBE_SIDE = 64
MAX_SHARE_OFF = 0.001  # share of outputs allowed more than one quantization step apart


@dataclass
class KernelCheck:
    passed: bool
    max_steps: int  # the largest difference, in quantization steps of the probe's output
    share_off: float  # share of outputs more than one step apart


def probe_frames(side: int = PROBE_SIDE) -> list[np.ndarray]:
    """Inputs that drive int8 activations to their limits: white, random black/white, noise."""
    rng = np.random.default_rng(0)
    shape = (1, 3, side, side)
    return [
        np.ones(shape, np.float32),
        (rng.random(shape) > 0.5).astype(np.float32),
        rng.random(shape).astype(np.float32),
    ]


def cpu_session(model: bytes | str, fused: bool, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session: ``fused`` runs this CPU's int8 kernels; otherwise graph
    optimizations are off and a QDQ model runs as the float arithmetic it means.

    Raises:
        ValueError: ONNX Runtime cannot load ``model``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if fused
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind types
        raise ValueError(f"cannot be loaded: {exc}") from None


def check_kernels(probe_base64: str, threads: int = 1) -> KernelCheck:
    """Run the probe with this CPU's fused int8 kernels and as plain float semantics; compare.

    Raises:
        ValueError: the probe is not a model ONNX Runtime can load.
    """
    probe = base64.b64decode(probe_base64)
    try:
        fused = cpu_session(probe, fused=True, threads=threads)
        meant = cpu_session(probe, fused=False, threads=threads)
    except ValueError as exc:
        raise ValueError(f"the kernel probe {exc}") from None
    name = fused.get_inputs()[0].name
    worst, off, total = 0, 0, 0
    for frame in probe_frames():
        got = fused.run(None, {name: frame})[0].astype(np.int32)
        want = meant.run(None, {name: frame})[0].astype(np.int32)
        difference = np.abs(got - want)
        worst = max(worst, int(difference.max()))
        off += int((difference > 1).sum())
        total += difference.size
    share = off / total if total else 0.0
    return KernelCheck(share <= MAX_SHARE_OFF, worst, share)
