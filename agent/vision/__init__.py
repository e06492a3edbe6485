"""The detection core: frames in, detections out (sources, letterbox, backends, decode, loop).

The names below are what the other wings and the wiring use; the machinery stays in the modules.
This wing imports only ``agent.config`` and ``agent.contract``: it knows nothing of MQTT or OTA.
"""

from agent.vision.annotate import annotate
from agent.vision.backends import (
    Backend,
    BackendInfo,
    available_backends,
    load_backend,
    tensorrt_toolkit,
)
from agent.vision.backends.base import (
    BACKEND_MODULES,
    ONNX_QUANTIZED_OPS,
    file_digest,
    parse_imgsz,
    parse_names,
    release_freed_memory,
    resolve_detect_head,
)
from agent.vision.backends.cuda_memory import open_device as open_cuda_device
from agent.vision.backends.engine_cache import gpu_slug
from agent.vision.backends.engine_cache import local_environment as local_engine_environment
from agent.vision.backends.engine_cache import resolve_precision as resolve_engine_precision
from agent.vision.backends.engine_cache import subscribe as on_engine_builds
from agent.vision.cameras import CameraFeed, FairQueue
from agent.vision.inference_workers import inference_workers, threads_per_run, usable_cores
from agent.vision.motion import MotionGate, MotionSettings
from agent.vision.pipeline import ActiveModel, PairedFrame, Pipeline, Shadow
from agent.vision.postprocess import (
    Detection,
    DetectionParams,
    box_iou,
    decode,
    detect_image,
    resolve_classes,
)
from agent.vision.preprocess import Letterbox, Preprocessor
from agent.vision.result import DETECTIONS, FrameResult
from agent.vision.scene import OBJECT, Line, Scene, Zone
from agent.vision.sinks import Sink, StdoutSink, build_sinks
from agent.vision.sources import IMAGE_SUFFIXES, Frame, FrameSource, open_source
from agent.vision.split_head import STRIDES, merge_split_head, npu_input
from agent.vision.stats import ModelStats, PipelineStats
from agent.vision.tracking import Tracker, TrackerSettings

__all__ = [
    "BACKEND_MODULES",
    "DETECTIONS",
    "IMAGE_SUFFIXES",
    "OBJECT",
    "ONNX_QUANTIZED_OPS",
    "STRIDES",
    "ActiveModel",
    "Backend",
    "BackendInfo",
    "CameraFeed",
    "Detection",
    "DetectionParams",
    "FairQueue",
    "Frame",
    "FrameResult",
    "FrameSource",
    "Letterbox",
    "Line",
    "ModelStats",
    "MotionGate",
    "MotionSettings",
    "PairedFrame",
    "Pipeline",
    "PipelineStats",
    "Preprocessor",
    "Scene",
    "Shadow",
    "Sink",
    "StdoutSink",
    "Tracker",
    "TrackerSettings",
    "Zone",
    "annotate",
    "available_backends",
    "box_iou",
    "build_sinks",
    "decode",
    "detect_image",
    "file_digest",
    "gpu_slug",
    "inference_workers",
    "load_backend",
    "local_engine_environment",
    "merge_split_head",
    "npu_input",
    "on_engine_builds",
    "open_cuda_device",
    "open_source",
    "parse_imgsz",
    "parse_names",
    "release_freed_memory",
    "resolve_classes",
    "resolve_detect_head",
    "resolve_engine_precision",
    "tensorrt_toolkit",
    "threads_per_run",
    "usable_cores",
]
