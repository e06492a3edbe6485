"""TensorRT backend: our ONNX models (the factory's QDQ INT8 by explicit quantization; FP16 and FP32
for float ones) or prebuilt engines, on NVIDIA GPUs and Jetsons, with the TensorRT 10 tensor API.

An ONNX file is built into an engine once per (model, TensorRT version, GPU, precision, options)
and kept in the engine cache (``engine_cache``: ``state_dir/engines`` with the timing cache
beside it); a prebuilt ``.engine`` (``edge-models build-engine``) is loaded as it is, its class
names and input size read from its record (``model_record``). Loading happens where every model
load happens, off the detection loop (at start before READY=1, or while an OTA candidate is
staged), so a build never stalls frames. Pinned host and device buffers are allocated once per
engine; the copy in, the execution (``execute_async_v3``) and the copy out run on one stream, and
CUDA events around the execution give ``last_device_ms``. The output goes through the same decode
and NMS as every backend. Imported only when configured: tensorrt exists only where a GPU does.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

from agent.contract.errors import BackendUnavailable, ModelError
from agent.contract.files import write_atomic
from agent.vision.backends.base import (
    BackendInfo,
    file_digest,
    model_identity,
    register,
    resolve_detect_head,
    warm_up,
)
from agent.vision.backends.cuda_memory import open_device
from agent.vision.backends.engine_cache import (
    EngineBuildError,
    EngineCache,
    EngineKey,
    notify,
    resolve_precision,
)
from agent.vision.backends.model_record import read_record

log = logging.getLogger(__name__)


class _Logger(trt.ILogger):
    """TensorRT's messages into ours; its errors kept, so a failed build can say why."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self.errors: list[str] = []

    def log(self, severity: Any, msg: str) -> None:
        if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
            self.errors.append(msg)
            log.error("tensorrt: %s", msg)
        elif severity == trt.ILogger.Severity.WARNING:
            log.warning("tensorrt: %s", msg)
        else:
            log.debug("tensorrt: %s", msg)


def make_logger() -> _Logger:
    return _Logger()


def _parser_errors(parser: Any) -> str:
    found = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = getattr(error, "node_name", lambda: "")() or f"node {error.node()}"
        operator = getattr(error, "node_operator", lambda: "")()
        where = f"{node} ({operator})" if operator else node
        found.append(f"{where}: {error.desc()}")
    return "; ".join(found[:3]) or "no reason given"


def build_engine(
    onnx_path: Path, precision: str, timing_cache: Path, workspace_mb: int, logger: _Logger
) -> bytes:
    """A serialized engine of ``onnx_path``; the timing cache is read and written back.

    Raises:
        EngineBuildError: naming the node TensorRT cannot parse, or its last error.
    """
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # the QDQ nodes set every scale: no calibrator
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(previous)
    if cache is None:  # an unreadable cache only costs time: start a new one
        timing_cache.unlink(missing_ok=True)
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    logger.errors.clear()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        reason = logger.errors[-1] if logger.errors else "no reason given"
        raise EngineBuildError(f"TensorRT could not build {onnx_path.name} ({precision}): {reason}")
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def onnx_metadata(path: Path) -> tuple[dict[str, str], bool]:
    """The ONNX file's metadata and whether it holds Q/DQ nodes (explicit INT8)."""
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable("the tensorrt backend reads ONNX metadata with `onnx`") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a broken file
        raise ModelError(f"cannot load model {path}: not a valid ONNX model ({exc})") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return metadata, quantized


class TensorRtBackend:
    def __init__(self, path: Path, options: Any) -> None:
        settings = options.tensorrt
        self._cuda = open_device(settings.device, settings.cuda)
        self._logger = make_logger()
        self._runtime = trt.Runtime(self._logger)
        try:
            self._load(path, options, settings)
        except BaseException:
            self._cuda.close()
            raise

    def _load(self, path: Path, options: Any, settings: Any) -> None:
        suffix = path.suffix.lower()
        record = None
        if suffix == ".engine":
            record = read_record(path)
            metadata, precision = record.metadata, record.metadata.get("precision", "int8")
            engine = self._deserialize(path.read_bytes(), path)
        elif suffix == ".onnx":
            metadata, quantized = onnx_metadata(path)
            precision = resolve_precision(settings.precision, quantized, path)
            engine = self._cached_engine(path, options, settings, precision)
        else:
            raise ModelError(f"{path}: the tensorrt backend runs .onnx or .engine files")
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1:
            raise ModelError(f"{path}: expected one image input, got {len(inputs)}")
        head = resolve_detect_head(
            path,
            list(engine.get_tensor_shape(inputs[0])),
            [list(engine.get_tensor_shape(n)) for n in outputs],
            metadata,
            getattr(options, "names", None) or (record.names if record else None),
            getattr(options, "imgsz", None) or (record.imgsz if record else None),
        )
        self._context.set_input_shape(inputs[0], head.input_shape)
        with self._cuda.active():
            in_type, out_type = (
                trt.nptype(engine.get_tensor_dtype(n)) for n in (inputs[0], outputs[0])
            )
            self._host_in = self._cuda.pinned(head.input_shape, in_type)
            self._device_in = self._cuda.device_buffer(self._host_in.nbytes)
            out_shape = tuple(self._context.get_tensor_shape(outputs[0]))
            self._host_out = self._cuda.pinned(out_shape, out_type)
            self._device_out = self._cuda.device_buffer(self._host_out.nbytes)
        self._context.set_tensor_address(inputs[0], self._device_in)
        self._context.set_tensor_address(outputs[0], self._device_out)
        self.last_device_ms = 0.0
        name, version = model_identity(path, metadata)
        self.info = BackendInfo(
            backend="tensorrt",
            provider=f"{self._cuda.name} (sm {self._cuda.compute_capability}, TensorRT "
            f"{trt.__version__}, {self._cuda.package})",
            model_path=str(path),
            model_name=name,
            model_version=version,
            input_name=inputs[0],
            input_shape=head.input_shape,
            input_dtype=self._host_in.dtype.name,
            output_name=outputs[0],
            output_shape=head.output_shape,
            class_names=head.class_names,
            stride=int(metadata.get("stride", 32) or 32),
            precision=precision,
            metadata=metadata,
        )
        warm_up(self, path, getattr(options, "warmup_runs", 1), self._host_in.dtype)

    def _cached_engine(self, path: Path, options: Any, settings: Any, precision: str) -> Any:
        key = EngineKey(
            model_sha256=file_digest(path),
            tensorrt=trt.__version__,
            gpu=self._cuda.name,
            compute_capability=self._cuda.compute_capability,
            precision=precision,
            options={"workspace_mb": settings.workspace_mb},
        )
        cache = EngineCache(Path(options.engine_cache_dir or path.parent / "engines"))

        def build(timing_cache: Path) -> bytes:
            with self._cuda.active():
                return build_engine(path, precision, timing_cache, settings.workspace_mb,
                                    self._logger)  # fmt: skip

        for attempt in (1, 2):
            cached = cache.ensure(key, build, progress=notify)
            engine = self._runtime.deserialize_cuda_engine(cached.path.read_bytes())
            if engine is not None:
                return engine
            # it matched its record but this TensorRT will not read it: rebuild once
            cached.path.unlink(missing_ok=True)
            if attempt == 2 or cached.built:
                break
        raise EngineBuildError(f"TensorRT cannot deserialize the engine it built for {path.name}")

    def _deserialize(self, data: bytes, path: Path) -> Any:
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            digest = hashlib.sha256(data).hexdigest()[:12]
            raise ModelError(
                f"cannot load {path} (sha256 {digest}): not an engine TensorRT {trt.__version__} "
                f"on {self._cuda.name} can run (engines are tied to the TensorRT version and GPU "
                "that built them)"
            )
        return engine

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        with cuda.active():
            np.copyto(self._host_in, tensor, casting="same_kind")
            cuda.to_device(self._device_in, self._host_in)
            cuda.mark("start")
            if not self._context.execute_async_v3(cuda.stream):
                raise RuntimeError("TensorRT execution failed")
            cuda.mark("end")
            cuda.to_host(self._host_out, self._device_out)
            self.last_device_ms = cuda.synchronize()
        return self._host_out.astype(np.float32, copy=True)

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._cuda.close()


@register("tensorrt")
def load(path: Path, options: Any) -> TensorRtBackend:
    return TensorRtBackend(path, options)
