"""TensorRT engines built once per (model, TensorRT, GPU, precision, options), kept on disk.

A serialized engine only runs on the TensorRT version and the GPU it was built for, and building
one takes seconds to minutes on a Jetson, so the agent builds it off the detection loop and keeps
it under ``state_dir/engines/``: ``<key>.engine`` with ``<key>.json`` (the key's fields and the
engine's sha256) beside it, and one TensorRT timing cache per GPU and version, which makes the
next build of any model faster. A key that does not match is a rebuild, never a crash; a file
that does not match its record (a cut write, a flipped bit) is deleted and rebuilt. Plain Python:
the TensorRT backend hands in the builder; this module imports no vendor package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.contract.errors import ModelError
from agent.contract.files import write_atomic

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp16", "fp32")


class EngineBuildError(ModelError):
    """TensorRT could not build an engine; the message names the layer or the reason."""


Progress = Callable[[str, dict[str, Any]], None]
_listeners: list[Progress] = []


def subscribe(listener: Progress) -> Callable[[], None]:
    """Hear every build's progress (the agent turns it into ``events``); returns the undo."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def notify(kind: str, details: dict[str, Any]) -> None:
    for listener in list(_listeners):
        try:
            listener(kind, details)
        except Exception:  # a listener's fault never fails a build
            log.exception("engine build listener failed")


def resolve_precision(requested: str, quantized: bool, model: Path) -> str:
    """The precision to build ``model`` in: ``auto`` is int8 for a QDQ model (explicit
    quantization: its scales are in the graph) and fp16 for a float one.

    Raises:
        ModelError: int8 asked of a float model (TensorRT 10 builds INT8 from Q/DQ nodes; run
            ``edge-models quantize --target jetson-...`` first), or a float precision asked of a
            QDQ model (its Q/DQ nodes would run as float: slower, and not what was verified).
    """
    if requested == "auto":
        return "int8" if quantized else "fp16"
    if requested == "int8" and not quantized:
        raise ModelError(
            f"{model.name} is a float model: TensorRT builds INT8 from a QDQ model's own scales "
            "(edge-models quantize --target jetson-<class>), or choose fp16/fp32"
        )
    if requested != "int8" and quantized:
        raise ModelError(
            f"{model.name} is a QDQ INT8 model: build it as int8 (or ship its float source for "
            f"{requested})"
        )
    return requested


def local_environment(device: int = 0, package: str = "auto") -> dict[str, str] | None:
    """This machine's TensorRT version and GPU (what its engines are tied to), or None where
    TensorRT or the GPU is not there: then a device takes ONNX models and builds them."""
    try:
        import tensorrt

        from agent.vision.backends.cuda_memory import open_device

        gpu = open_device(device, package)
    except Exception as exc:  # not installed, no GPU, or CUDA's own error types: no engines
        log.info("no TensorRT environment here: %s", exc)
        return None
    try:
        return {
            "tensorrt": tensorrt.__version__,
            "gpu": gpu.name,
            "compute_capability": gpu.compute_capability,
        }
    finally:
        gpu.close()


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on."""

    model_sha256: str
    tensorrt: str  # TensorRT version, e.g. 10.13.0.35
    gpu: str  # device name, e.g. "Orin" or "NVIDIA H200"
    compute_capability: str  # e.g. "8.7"
    precision: str  # int8 (a QDQ model, explicit quantization), fp16 or fp32
    options: dict[str, Any] = field(default_factory=dict)  # builder options that change the plan

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def matches(self, recorded: dict[str, Any]) -> list[str]:
        """The fields where ``recorded`` (an engine's record) differs from this key."""
        mine = asdict(self)
        return [name for name, value in mine.items() if recorded.get(name) != value]


def gpu_slug(gpu: str, compute_capability: str, tensorrt: str) -> str:
    """A file-name-safe name for one GPU model and TensorRT version (the timing cache's)."""
    plain = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    return f"{plain}-sm{compute_capability.replace('.', '')}-trt{tensorrt}"


@dataclass
class CachedEngine:
    path: Path
    key: EngineKey
    built: bool  # True: built now; False: found in the cache
    seconds: float = 0.0


class EngineCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        name = key.digest()
        return self.root / f"{name}.engine", self.root / f"{name}.json"

    def timing_cache(self, key: EngineKey) -> Path:
        return self.root / f"timing-{gpu_slug(key.gpu, key.compute_capability, key.tensorrt)}.cache"

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached engine for ``key``, or None; a damaged one is deleted on the way."""
        engine, record_path = self.paths(key)
        if not engine.exists() and not record_path.exists():
            return None
        problem = self._problem(key, engine, record_path)
        if problem is None:
            os.utime(engine)  # most recently used: kept by prune()
            return engine
        log.warning("engine cache: %s; deleting it and building again", problem)
        for path in (engine, record_path):
            path.unlink(missing_ok=True)
        return None

    def _problem(self, key: EngineKey, engine: Path, record_path: Path) -> str | None:
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            return f"{record_path.name} is unreadable ({exc})"
        if not isinstance(record, dict):
            return f"{record_path.name} is not a record"
        differs = key.matches(record.get("key") or {})
        if differs:
            return f"{engine.name} was built for another {', '.join(differs)}"
        try:
            data = engine.read_bytes()
        except OSError as exc:
            return f"{engine.name} is unreadable ({exc})"
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            return f"{engine.name} does not match its recorded sha256"
        return None

    def store(self, key: EngineKey, engine_bytes: bytes, seconds: float = 0.0) -> Path:
        """Write the engine, then its record, each atomically: a crash leaves no half entry
        that a later lookup would trust (an engine without its record is rebuilt)."""
        self.root.mkdir(parents=True, exist_ok=True)
        engine, record_path = self.paths(key)
        record = {
            "key": asdict(key),
            "sha256": hashlib.sha256(engine_bytes).hexdigest(),
            "bytes": len(engine_bytes),
            "build_seconds": round(seconds, 2),
        }
        write_atomic(engine, engine_bytes)
        write_atomic(record_path, json.dumps(record, indent=1).encode())
        return engine

    def ensure(
        self,
        key: EngineKey,
        build: Callable[[Path], bytes],
        progress: Progress | None = None,
        clock: Callable[[], float] | None = None,
    ) -> CachedEngine:
        """The engine for ``key``: from the cache, or built now by ``build(timing_cache_path)``.

        Raises:
            EngineBuildError: the build failed (the previous model keeps running).
        """
        clock = clock or time.monotonic
        found = self.lookup(key)
        if found is not None:
            return CachedEngine(found, key, built=False)
        report = progress or (lambda kind, details: None)
        report("engine_build_started", {"precision": key.precision, "gpu": key.gpu})
        started = clock()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            data = build(self.timing_cache(key))
        except EngineBuildError as exc:
            report("engine_build_failed", {"reason": str(exc)})
            raise
        except Exception as exc:  # the vendor's own types (RuntimeError, MemoryError, ...)
            reason = f"{type(exc).__name__}: {exc}"
            report("engine_build_failed", {"reason": reason})
            raise EngineBuildError(f"TensorRT failed building the engine ({reason})") from None
        if not data:
            raise EngineBuildError("TensorRT returned no engine (see the builder's log above)")
        seconds = clock() - started
        path = self.store(key, data, seconds)
        report("engine_built", {"seconds": round(seconds, 1), "bytes": len(data)})
        return CachedEngine(path, key, built=True, seconds=seconds)

    def prune(self, keep: int = 4) -> list[Path]:
        """Drop all but the ``keep`` most recently used engines (slots hold at most three
        models; the fourth is room for a build in progress)."""
        engines = sorted(self.root.glob("*.engine"), key=lambda p: p.stat().st_mtime, reverse=True)
        dropped = []
        for engine in engines[keep:]:
            engine.unlink(missing_ok=True)
            engine.with_suffix(".json").unlink(missing_ok=True)
            dropped.append(engine)
        return dropped
