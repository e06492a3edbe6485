"""The Backend contract, the registry that finds backends by name, and YOLOv8 model checks.

Backends live one per module and register themselves on import. Modules are imported lazily, so
a device without tensorrt (or an x86 box without rknn) simply reports that backend unavailable.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import hashlib
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent.contract.errors import BackendUnavailable, ModelError

# ONNX operators that only a quantized (INT8) graph holds: how both sides tell its precision
ONNX_QUANTIZED_OPS = ("QuantizeLinear", "ConvInteger", "QLinearConv", "MatMulInteger")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """What the loop and the reports need to know about a loaded model."""

    backend: str
    provider: str
    model_path: str
    model_name: str
    model_version: str
    input_name: str
    input_shape: tuple[int, int, int, int]  # N, C, H, W
    input_dtype: str
    output_name: str
    output_shape: tuple[int, ...]
    class_names: dict[int, str]
    stride: int
    precision: str
    layout: str = "NCHW"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def imgsz(self) -> tuple[int, int]:
        return self.input_shape[2], self.input_shape[3]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "version": self.model_version,
            "backend": self.backend,
            "provider": self.provider,
            "precision": self.precision,
            "input": list(self.input_shape),
            "classes": self.num_classes,
        }


@runtime_checkable
class Backend(Protocol):
    """A loaded model. A backend whose ``infer`` may run in several threads at once says so
    with ``concurrent = True``; the loop takes any other one a run at a time."""

    info: BackendInfo

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Run one NCHW input tensor; return the raw head output ``[1, 4+nc, N]``."""

    def close(self) -> None: ...


Loader = Callable[[Path, Any], Backend]

# name -> module that registers it when imported
BACKEND_MODULES: dict[str, str] = {
    "onnxruntime": "agent.vision.backends.onnxruntime",
    "openvino": "agent.vision.backends.openvino",
    "rknn": "agent.vision.backends.rknn",
    "tensorrt": "agent.vision.backends.tensorrt",
}
_LOADERS: dict[str, Loader] = {}


def release_freed_memory() -> bool:
    """Hand the heap pages freed by a closed model back to the system (glibc's ``malloc_trim``).
    glibc keeps freed memory in its arenas, so without this every hot swap left the replaced
    model's tens of MB in the agent's RSS. False where the C library has no such call (musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def register(name: str) -> Callable[[Loader], Loader]:
    def decorator(loader: Loader) -> Loader:
        _LOADERS[name] = loader
        return loader

    return decorator


def _import_backend(name: str) -> Loader:
    if name in _LOADERS:
        return _LOADERS[name]
    module = BACKEND_MODULES.get(name)
    if module is None:
        known = ", ".join(sorted(BACKEND_MODULES))
        raise BackendUnavailable(f"unknown backend {name!r} (known: {known})")
    try:
        importlib.import_module(module)
    except ImportError as exc:
        log.info("backend %s unavailable: %s", name, exc)
        raise BackendUnavailable(f"backend {name!r} is not installed here: {exc}") from None
    if name not in _LOADERS:
        raise BackendUnavailable(f"module {module} did not register backend {name!r}")
    return _LOADERS[name]


def available_backends() -> dict[str, str]:
    """Each known backend and either 'available' or why not."""
    status = {}
    for name in BACKEND_MODULES:
        try:
            _import_backend(name)
            status[name] = "available"
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status


def load_backend(name: str, path: Path, options: Any) -> Backend:
    """Load ``path`` with the named backend.

    Raises:
        BackendUnavailable: the backend is unknown or cannot be imported here.
        ModelError: the file is missing, unreadable or not a YOLOv8 detector.
    """
    check_model_file(path)
    return _import_backend(name)(path, options)


def check_model_file(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from None
    if not head:
        raise ModelError(f"model file is empty: {path}")


def model_identity(path: Path, metadata: Mapping[str, str]) -> tuple[str, str]:
    """(name, version) from the model's metadata, else its file name and content hash."""
    version = metadata.get("model_version") or "sha256:" + file_digest(path)[:12]
    return metadata.get("model_name", path.stem), version


def warm_up(backend: Backend, path: Path, runs: int, dtype: Any = np.float32) -> None:
    """Run blank frames before the first real one (allocators, kernels), so that one is not the
    slowest; the first run also checks the output really is ``[1, 4+nc, N]``."""
    blank = np.zeros(backend.info.input_shape, dtype=dtype)
    output = backend.infer(blank)
    expected = backend.info.output_shape
    if output.ndim != 3 or output.shape[1] != expected[1]:
        raise ModelError(f"{path}: output shape {output.shape} is not [1, {expected[1]}, N]")
    for _ in range(runs - 1):
        backend.infer(blank)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _literal(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def parse_names(text: str | None) -> dict[int, str] | None:
    """Ultralytics stores names as a Python dict literal (``{0: 'person', ...}``)."""
    value = _literal(text)
    if isinstance(value, dict) and all(isinstance(k, int) for k in value):
        return {int(k): str(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return {i: str(v) for i, v in enumerate(value)}
    return None


def parse_imgsz(text: str | None) -> tuple[int, int] | None:
    value = _literal(text)
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


@dataclass(frozen=True)
class HeadLayout:
    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, ...]
    class_names: dict[int, str]


def resolve_detect_head(
    path: Path,
    input_shape: list[Any],
    output_shapes: list[list[Any]],
    metadata: Mapping[str, str],
    names_override: Mapping[int, str] | None = None,
    imgsz_override: tuple[int, int] | None = None,
) -> HeadLayout:
    """Check that the model is a YOLOv8 detect head and fix its concrete shapes.

    Raises:
        ModelError: naming what does not match ``[1,3,H,W] -> [1, 4+nc, N]``.
    """
    task = metadata.get("task")
    if task is not None and task != "detect":
        raise ModelError(
            f"{path}: model task is {task!r}; only YOLOv8 'detect' models are supported"
        )
    if len(input_shape) != 4:
        raise ModelError(f"{path}: expected one NCHW image input, got input shape {input_shape}")
    channels = input_shape[1]
    if isinstance(channels, int) and channels != 3:
        raise ModelError(f"{path}: expected 3 input channels, got input shape {input_shape}")
    if len(output_shapes) != 1:
        raise ModelError(
            f"{path}: expected one output [1, 4+classes, anchors] (YOLOv8 detect head), "
            f"got {len(output_shapes)} outputs"
        )
    out = output_shapes[0]
    if len(out) != 3:
        raise ModelError(
            f"{path}: expected output [1, 4+classes, anchors] (YOLOv8 detect head), got {out}"
        )
    channels_out = out[1]
    names = dict(names_override) if names_override else parse_names(metadata.get("names"))
    if not isinstance(channels_out, int) or channels_out < 5:
        raise ModelError(f"{path}: output {out} has no room for 4 box values and class scores")
    nc = channels_out - 4
    if names is None:
        names = {i: str(i) for i in range(nc)}
    if len(names) != nc:
        raise ModelError(
            f"{path}: output has {nc} class scores but {len(names)} class names were given"
        )
    hw = imgsz_override or parse_imgsz(metadata.get("imgsz"))
    fixed_hw = tuple(v if isinstance(v, int) else None for v in input_shape[2:])
    if hw is None:
        if None in fixed_hw:
            raise ModelError(f"{path}: input size is dynamic and the model carries no imgsz")
        hw = fixed_hw  # type: ignore[assignment]
    elif None not in fixed_hw and tuple(fixed_hw) != tuple(hw):
        raise ModelError(f"{path}: imgsz {hw} does not match the model input {input_shape}")
    anchors = out[2]
    if isinstance(anchors, int):
        stride = int(metadata.get("stride", "32") or 32)
        expected = sum((hw[0] // s) * (hw[1] // s) for s in (8, 16, 32)) if stride == 32 else None
        if expected is not None and anchors != expected:
            raise ModelError(
                f"{path}: output has {anchors} anchors; "
                f"a YOLOv8 head at {hw[0]}x{hw[1]} has {expected}"
            )
    return HeadLayout(
        input_shape=(1, 3, int(hw[0]), int(hw[1])),
        output_shape=(1, channels_out, anchors if isinstance(anchors, int) else -1),
        class_names=names,
    )
