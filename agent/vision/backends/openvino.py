"""OpenVINO backend: our ONNX models (QDQ INT8 included), or OpenVINO IR, on Intel CPUs, GPUs and
NPUs.

OpenVINO reads the ONNX file itself (a QDQ model becomes FakeQuantize operations that its CPU
plugin runs as integer kernels), so the factory ships one file for both runtimes and a device
chooses by config: ``model.backend: openvino`` with ``model.openvino.device`` and
``performance_hint``. An IR (``model.xml`` + ``model.bin``, as ``ov.save_model`` or NNCF write
it) loads too, with the metadata of the ONNX it came from (OpenVINO keeps it in rt_info); the
factory still ships ONNX, one file through the OTA channel, and the compiled-model cache spares
later starts the conversion. The output goes through the same decode and NMS as every backend.
Several runs at once (the loop's inference workers) each take an infer request of their own;
``model.openvino.streams`` lets the device overlap them (on a 2-core EPYC two streams did 1.16-1.22x
the frames of one run at a time). Imported only when that backend is asked for: the agent
installs and runs without openvino.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from agent.contract.errors import BackendUnavailable, ModelError
from agent.vision.backends.base import (
    BackendInfo,
    model_identity,
    register,
    resolve_detect_head,
    warm_up,
)
from agent.vision.backends.contexts import ContextPool

QUANTIZED_OPS = ("FakeQuantize", "FakeConvert")
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def check_device(device: str, available: list[str]) -> None:
    """A device this machine has (``GPU`` matches ``GPU.0``), or a virtual one over them.

    Raises:
        BackendUnavailable: naming the device and the ones that are here.
    """
    name, _, targets = device.partition(":")
    wanted = [t for t in targets.split(",") if t] if name in VIRTUAL_DEVICES else [device]
    have = set(available) | {d.split(".")[0] for d in available}
    missing = [d for d in wanted if d not in have]
    if missing:
        raise BackendUnavailable(
            f"OpenVINO device {missing[0]!r} is not available here "
            f"(have: {', '.join(available) or 'none'})"
        )


def read_model_file(core: Any, path: Path) -> Any:
    """An OpenVINO IR (``model.xml`` with its ``model.bin`` beside it: what ``ov.save_model``
    and NNCF write) or an ONNX file.

    Raises:
        ModelError: a missing ``.bin``, an IR OpenVINO cannot read, or a bad ONNX file.
    """
    if path.suffix.lower() != ".xml":
        return read_onnx(path)
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise ModelError(f"cannot load model {path}: its weights {weights.name} are not beside it")
    try:
        return core.read_model(str(path), str(weights))
    except Exception as exc:
        raise ModelError(f"cannot load model {path} in OpenVINO: {_first(exc)}") from None


def read_onnx(path: Path) -> Any:
    """The ONNX file through OpenVINO's ONNX frontend only (``read_model`` would try every
    framework's reader on a broken file, and some print to stderr).

    Raises:
        ModelError: not an ONNX model, or one OpenVINO cannot convert (it says which op).
    """
    frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
    if not frontend.supported(str(path)):
        raise ModelError(f"cannot load model {path}: not a valid ONNX model")
    try:
        return frontend.convert(frontend.load(str(path)))
    except Exception as exc:  # OpenVINO raises RuntimeError with a C++ trace for any failure
        raise ModelError(f"cannot load model {path} in OpenVINO: {_first(exc)}") from None


def refuse_signed_activations(path: Path, metadata: dict[str, str], device: str) -> None:
    """Our S8S8 QDQ files (the ``cpu-aarch64`` recipe, TensorRT's) come out wrong on OpenVINO's
    CPU plugin: on voc2007-val, mAP50-95 0.03 where ONNX Runtime computes 0.51 from the same
    file (OpenVINO 2026.4, x86-64 with AVX-512 VNNI). A wrong model must not run quietly: it is
    refused, naming what works. Files made elsewhere carry no recipe and are not judged.

    Raises:
        ModelError: an S8S8 model of ours on an OpenVINO CPU device.
    """
    try:
        scheme = json.loads(metadata.get("quantization") or "{}").get("scheme")
    except (ValueError, AttributeError):
        return
    if scheme == "S8S8" and ("CPU" in device or device == "AUTO"):  # AUTO may pick the CPU
        made_for = metadata.get("target", "another target")
        raise ModelError(
            f"{path.name} is an S8S8 int8 model (made for {made_for}), which OpenVINO's CPU "
            "plugin computes wrongly (mAP 0.03 for 0.51 in ONNX Runtime): run it with "
            "model.backend: onnxruntime, or use a U8S8 model (edge-models quantize --target "
            "openvino)"
        )


def inference_precision(setting: str, device: str) -> str | None:
    """The float arithmetic to ask for: ``auto`` keeps a CPU at f32 (OpenVINO's CPU plugin
    otherwise runs bf16 where AMX or AVX-512 BF16 exist: a box edge 3 px off the model's float
    result on bus.jpg, measured on a Xeon with AMX) and leaves other devices their own default
    (GPUs f16; NPUs run nothing else)."""
    if setting != "auto":
        return setting
    return "f32" if device.startswith("CPU") else None


def _property(compiled: Any, name: str) -> str | None:
    try:
        value = compiled.get_property(name)
    except Exception:  # a device that does not report it
        return None
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _metadata(model: Any) -> dict[str, str]:
    """The ONNX file's metadata_props, which OpenVINO keeps under rt_info['framework']."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    framework = info["framework"]
    return {key: framework[key].astype(str) for key in framework}


class OpenVinoBackend:
    concurrent = True  # each concurrent run takes its own infer request

    def __init__(self, path: Path, options: Any) -> None:
        settings = getattr(options, "openvino", None)
        device = getattr(settings, "device", "CPU")
        hint = getattr(settings, "performance_hint", "LATENCY")
        core = ov.Core()
        check_device(device, list(core.available_devices))
        cache_dir = getattr(settings, "cache_dir", None)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        model = read_model_file(core, path)
        metadata = _metadata(model)
        refuse_signed_activations(path, metadata, device)
        if len(model.inputs) != 1:
            raise ModelError(f"{path}: expected one image input, got {len(model.inputs)} inputs")
        source = model.inputs[0]
        if source.get_element_type() != ov.Type.f32:
            raise ModelError(f"{path}: input type {source.get_element_type()} is not float32")
        head = resolve_detect_head(
            path,
            [_dim(d) for d in source.get_partial_shape()],
            [[_dim(d) for d in o.get_partial_shape()] for o in model.outputs],
            metadata,
            getattr(options, "names", None),
            getattr(options, "imgsz", None),
        )
        if source.get_partial_shape().is_dynamic:
            model.reshape({source.get_any_name(): list(head.input_shape)})
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        arithmetic = inference_precision(getattr(settings, "inference_precision", "auto"), device)
        if arithmetic is not None:
            config["INFERENCE_PRECISION_HINT"] = arithmetic
        threads = getattr(options, "threads", 0)
        if threads and device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = threads
        streams = getattr(settings, "streams", 0)
        if streams:
            config["NUM_STREAMS"] = streams
        try:
            compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise ModelError(
                f"cannot compile {path} for OpenVINO {device}: {_first(exc)}"
            ) from None
        self._compiled = compiled
        self._requests = ContextPool(compiled.create_infer_request)  # one per run at once
        precision = metadata.get("precision") or (
            "int8" if any(op.get_type_name() in QUANTIZED_OPS for op in model.get_ops()) else "fp32"
        )
        name, version = model_identity(path, metadata)
        used = _property(compiled, "INFERENCE_PRECISION_HINT")
        self.info = BackendInfo(
            backend="openvino",
            provider=f"{device} ({used})" if used else device,
            model_path=str(path),
            model_name=name,
            model_version=version,
            input_name=source.get_any_name(),
            input_shape=head.input_shape,
            input_dtype="float32",
            output_name=model.outputs[0].get_any_name(),
            output_shape=head.output_shape,
            class_names=head.class_names,
            stride=int(metadata.get("stride", 32) or 32),
            precision=precision,
            metadata=metadata,
        )
        warm_up(self, path, getattr(options, "warmup_runs", 1))

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        with self._requests.context() as request:
            # asynchronous start + wait, so that the watchdog's cancel() can stop a hung run
            request.start_async({0: np.ascontiguousarray(tensor, dtype=np.float32)})
            request.wait()
            return request.get_output_tensor(0).data.copy()  # the request's buffer is reused

    def cancel(self) -> None:
        """Ask every run in progress to stop; each wait() raises shortly after."""
        for request in self._requests.busy():
            request.cancel()

    def close(self) -> None:
        self._requests = None  # type: ignore[assignment]
        self._compiled = None


def _dim(dimension: Any) -> int | str:
    return dimension.get_length() if dimension.is_static else "?"


def _first(exc: Exception) -> str:
    """OpenVINO's messages open with the C++ file and line; keep the line that says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0]


@register("openvino")
def load(path: Path, options: Any) -> OpenVinoBackend:
    return OpenVinoBackend(path, options)
