"""The detection core: frames in, detections out (sources, letterbox, backends, decode, loop).

The names below are what the other wings and the wiring use; the machinery stays in the modules.
This wing imports only ``agent.config`` and ``agent.errors``: it knows nothing of MQTT or OTA.
"""

from agent.vision.annotate import annotate
from agent.vision.backends import Backend, BackendInfo, available_backends, load_backend
from agent.vision.backends.base import file_digest
from agent.vision.backends.engine_cache import local_environment as local_engine_environment
from agent.vision.backends.engine_cache import subscribe as on_engine_builds
from agent.vision.pipeline import ActiveModel, Pipeline
from agent.vision.postprocess import (
    Detection,
    DetectionParams,
    box_iou,
    decode,
    detect_image,
    resolve_classes,
)
from agent.vision.preprocess import Letterbox, Preprocessor
from agent.vision.sinks import DETECTIONS, FrameResult, Sink, StdoutSink, build_sinks
from agent.vision.sources import Frame, FrameSource, open_source
from agent.vision.split_head import merge_split_head, npu_input
from agent.vision.stats import ModelStats, PipelineStats

__all__ = [
    "DETECTIONS",
    "ActiveModel",
    "Backend",
    "BackendInfo",
    "Detection",
    "DetectionParams",
    "Frame",
    "FrameResult",
    "FrameSource",
    "Letterbox",
    "ModelStats",
    "Pipeline",
    "PipelineStats",
    "Preprocessor",
    "Sink",
    "StdoutSink",
    "annotate",
    "available_backends",
    "box_iou",
    "build_sinks",
    "decode",
    "detect_image",
    "file_digest",
    "load_backend",
    "local_engine_environment",
    "merge_split_head",
    "npu_input",
    "on_engine_builds",
    "open_source",
    "resolve_classes",
]
