"""ONNX Runtime backend: CPU, CUDA and the TensorRT execution provider, in a fallback order.

A session runs several inferences at once safely (ONNX Runtime's ``run`` is thread-safe), which
is how the loop's inference workers share one loaded model.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.contract.errors import BackendUnavailable, ModelError
from agent.vision.backends.base import (
    ONNX_QUANTIZED_OPS,
    BackendInfo,
    model_identity,
    register,
    resolve_detect_head,
    warm_up,
)

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def resolve_providers(
    requested: list[str], available: list[str], engine_cache_dir: Path | None
) -> list[tuple[str, dict[str, str]]]:
    """The requested providers that exist here, in order, each with its options.

    CPU is always the last resort so a box without a GPU still runs.
    """
    chosen: list[tuple[str, dict[str, str]]] = []
    for name in requested:
        if name not in available:
            log.warning("execution provider %s is not available here (have: %s)", name, available)
            continue
        options: dict[str, str] = {}
        if name == "TensorrtExecutionProvider" and engine_cache_dir is not None:
            options = {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(engine_cache_dir),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(engine_cache_dir),
            }
        chosen.append((name, options))
    if "CPUExecutionProvider" not in [name for name, _ in chosen]:
        if "CPUExecutionProvider" not in available:
            raise BackendUnavailable(f"none of the providers {requested} is available here")
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def model_precision(path: Path, metadata: dict[str, str], input_dtype: type) -> str:
    """int8 when the graph holds quantized operators; otherwise the input's float width."""
    if "precision" in metadata:
        return metadata["precision"]
    try:
        import onnx  # optional: present with the models/dev extras
    except ImportError:
        onnx = None
    if onnx is not None:
        graph = onnx.load(str(path), load_external_data=False).graph
        if any(node.op_type in ONNX_QUANTIZED_OPS for node in graph.node):
            return "int8"
    return "fp16" if input_dtype is np.float16 else "fp32"


class OnnxRuntimeBackend:
    concurrent = True  # infer may be called from several threads at once

    def __init__(self, path: Path, options: Any) -> None:
        threads = getattr(options, "threads", 0)
        cache_dir = getattr(options, "engine_cache_dir", None)
        requested = list(getattr(options, "providers", ["CPUExecutionProvider"]))
        providers = resolve_providers(requested, ort.get_available_providers(), cache_dir)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)

        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            session_options.intra_op_num_threads = threads
        # Other pipeline stages share the cores: idle inference threads must not spin on them.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(path),
                session_options,
                providers=[name for name, _ in providers],
                provider_options=[opts for _, opts in providers],
            )
        except Exception as exc:  # ORT raises its own pybind types for every load failure
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load model {path}: not a valid ONNX model ({reason})"
            ) from None

        metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"{path}: expected one image input, got {len(inputs)} inputs")
        dtype = _DTYPES.get(inputs[0].type)
        if dtype is None:
            raise ModelError(f"{path}: input type {inputs[0].type} is not float32/float16")
        head = resolve_detect_head(
            path,
            list(inputs[0].shape),
            [list(o.shape) for o in outputs],
            metadata,
            getattr(options, "names", None),
            getattr(options, "imgsz", None),
        )
        self._input_name = inputs[0].name
        self._output_names = [outputs[0].name]
        self._runs: dict[int, ort.RunOptions] = {}  # the runs in progress, for cancel()
        self._runs_lock = threading.Lock()
        name, version = model_identity(path, metadata)
        self.info = BackendInfo(
            backend="onnxruntime",
            provider=self._session.get_providers()[0],
            model_path=str(path),
            model_name=name,
            model_version=version,
            input_name=inputs[0].name,
            input_shape=head.input_shape,
            input_dtype=np.dtype(dtype).name,
            output_name=outputs[0].name,
            output_shape=head.output_shape,
            class_names=head.class_names,
            stride=int(metadata.get("stride", 32) or 32),
            precision=model_precision(path, metadata, dtype),
            metadata=metadata,
        )
        warm_up(self, path, getattr(options, "warmup_runs", 1), dtype)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        options = ort.RunOptions()  # a fresh one per run: a cancelled one stays cancelled
        with self._runs_lock:
            self._runs[id(options)] = options
        try:
            return self._session.run(self._output_names, {self._input_name: tensor}, options)[0]
        finally:
            with self._runs_lock:
                self._runs.pop(id(options), None)

    def cancel(self) -> None:
        """Ask every run in progress to stop; each raises in its own thread shortly after."""
        with self._runs_lock:
            for options in self._runs.values():
                options.terminate = True

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


@register("onnxruntime")
def load(path: Path, options: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(path, options)
