"""The agent's configuration: one typed tree, from a YAML file plus ``EDGE_AGENT_*`` overrides.

Unknown keys and bad values are rejected at start with a single message that names every bad
field, so a typo in a config file never turns into a silently ignored setting on a remote device.

Environment overrides use ``__`` between levels: ``EDGE_AGENT_DETECTION__CONFIDENCE=0.4``.
Values are parsed as YAML scalars, so ``0.4`` is a number and ``[0, 2]`` a list.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.contract.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
# Variables under the prefix that are not config overrides.
ENV_RESERVED = {"EDGE_AGENT_CONFIG", "EDGE_AGENT_SHARED", "EDGE_AGENT_FAILPOINTS"}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(StrictModel):
    """Where frames come from and how a lost source is brought back."""

    name: str = Field(
        "main",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="The camera's name, in its object events.",
    )
    uri: str = Field(
        "0",
        description="Video file, image folder, camera index or /dev/videoN, rtsp:// or http:// "
        "URL, "
        "or a GStreamer pipeline ending in appsink.",
    )
    kind: Literal["auto", "file", "folder", "v4l2", "stream", "gstreamer"] = "auto"
    pace: Literal["realtime", "fast", "live"] = Field(
        "realtime",
        description="File sources: play at their own frame rate, as fast as possible, or as a "
        "camera would deliver them (own frame rate, newest frame only: late frames are skipped).",
    )
    loop: bool = Field(False, description="File sources: start again at the end.")
    fps: float | None = Field(
        None, gt=0, description="Frame rate for image folders or files without one."
    )
    width: int | None = Field(None, gt=0, description="Requested capture width (cameras).")
    height: int | None = Field(None, gt=0, description="Requested capture height (cameras).")
    decode_threads: int = Field(
        1,
        ge=0,
        description="FFmpeg decoder threads (files, streams); 1 saves CPU for inference, 0 = auto.",
    )
    stall_timeout_s: float = Field(5.0, gt=0, description="No frame for this long: reconnect.")
    reconnect_initial_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    max_reconnects: int | None = Field(
        None, ge=0, description="Give up after this many failed attempts in a row (None: never)."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> SourceConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class OpenVinoConfig(StrictModel):
    """The OpenVINO backend's device and how it compiles the model."""

    device: str = Field(
        "CPU",
        pattern=r"^[A-Z][A-Z0-9_.:,()-]*$",
        description="OpenVINO device: CPU, GPU, GPU.1, NPU, or AUTO:GPU,CPU and the like.",
    )
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        "LATENCY", description="LATENCY for one camera frame at a time (the loop's case)."
    )
    streams: int = Field(
        0,
        ge=0,
        le=64,
        description="Inference streams (runs the device overlaps); 0: one per inference worker "
        "with several cameras, else the hint's choice.",
    )
    cache_dir: Path | None = Field(
        None, description="Compiled-model cache (default: <state_dir>/openvino): faster starts."
    )
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = Field(
        "auto",
        description="Float arithmetic: auto is f32 on CPU (what the gate verified; OpenVINO "
        "would pick bf16 on CPUs with AMX or AVX-512 BF16) and the device's own elsewhere.",
    )


class RknnConfig(StrictModel):
    """The RKNN backend (RK3588 NPU)."""

    core_mask: Literal["auto", "0", "1", "2", "0_1", "0_1_2"] = Field(
        "0_1_2", description="NPU cores: all three by default (one camera, lowest latency)."
    )
    contexts: int = Field(
        0,
        ge=0,
        le=3,
        description="NPU contexts run at once, each on a core of its own (core_mask then "
        "unused); 0: one per inference worker up to 3 with several cameras, else one.",
    )


class TensorRtConfig(StrictModel):
    """The TensorRT backend (NVIDIA GPUs and Jetsons)."""

    precision: Literal["auto", "int8", "fp16", "fp32"] = Field(
        "auto", description="auto: int8 for a QDQ model (explicit quantization), else fp16."
    )
    workspace_mb: int = Field(1024, ge=64, description="Builder workspace limit.")
    device: int = Field(0, ge=0, description="CUDA device index.")
    cuda: Literal["auto", "pycuda", "cuda-python"] = Field(
        "auto", description="GPU memory and streams through pycuda (else cuda-python)."
    )


class ModelConfig(StrictModel):
    """Which model runs, on which backend, with which providers."""

    path: Path = Field(description="Model file: ONNX (a .rknn for the rknn backend).")
    backend: str = Field(
        "onnxruntime",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="onnxruntime (any CPU; CUDA and TensorRT providers), openvino (Intel CPU, "
        "GPU, NPU), rknn (RK3588 NPU, a .rknn from edge-models convert) or tensorrt (NVIDIA "
        "GPUs and Jetsons: an ONNX built into a cached engine, or a prebuilt .engine).",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime providers in fallback order (unavailable ones are skipped).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of each run; 0: the runtime decides with one inference "
        "at a time, each run's share of the cores with several (pipeline.inference_workers).",
    )
    engine_cache_dir: Path | None = Field(
        None,
        description="TensorRT engines (the tensorrt backend's and the TensorRT execution "
        "provider's) and their timing cache (default: <state_dir>/engines).",
    )
    names: dict[int, str] | None = Field(None, description="Override the model's class names.")
    imgsz: tuple[int, int] | None = Field(None, description="Override the model's input (h, w).")
    warmup_runs: int = Field(1, ge=0)
    openvino: OpenVinoConfig = Field(default_factory=OpenVinoConfig)
    rknn: RknnConfig = Field(default_factory=RknnConfig)
    tensorrt: TensorRtConfig = Field(default_factory=TensorRtConfig)

    @field_validator("providers")
    @classmethod
    def _providers_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one provider is needed")
        return value


class DetectionConfig(StrictModel):
    """Thresholds applied after inference; can change live."""

    confidence: float = Field(0.25, ge=0.0, le=1.0)
    iou: float = Field(0.45, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    classes: list[int | str] | None = Field(
        None, description="Keep only these classes (ids or names); None keeps all."
    )


Point = tuple[float, float]


class TrackingConfig(StrictModel):
    """Multi-object tracking (ByteTrack) and the ``objects`` events made from its tracks."""

    enabled: bool = False
    high_score: float = Field(0.4, ge=0.0, le=1.0, description="Boxes matched to tracks first.")
    low_score: float = Field(
        0.1, ge=0.0, le=1.0, description="Weaker boxes down to this only extend existing tracks."
    )
    new_track_score: float = Field(0.5, ge=0.0, le=1.0, description="A new track starts here.")
    match_iou: float = Field(0.2, gt=0.0, le=1.0)
    low_match_iou: float = Field(0.5, gt=0.0, le=1.0)
    confirm_hits: int = Field(2, ge=1, le=30, description="Frames in a row before an id.")
    max_lost_s: float = Field(1.5, gt=0, description="Unmatched this long: the object ended.")
    score_step: float = Field(
        0.1, gt=0.0, le=1.0, description="An update event when the best score rises this much."
    )
    zone_frames: int = Field(
        3, ge=1, le=100, description="Frames in a row inside (outside) before entered (left)."
    )
    snapshots: bool = Field(
        False, description="new and end events carry a JPEG of the object's best-scoring box."
    )

    @model_validator(mode="after")
    def _scores_in_order(self) -> TrackingConfig:
        if not self.low_score <= self.high_score <= self.new_track_score:
            raise ValueError(
                f"tracking needs low_score ({self.low_score:g}) <= high_score "
                f"({self.high_score:g}) <= new_track_score ({self.new_track_score:g})"
            )
        return self


class MotionConfig(StrictModel):
    """Motion gating: the detector runs on frames where something moves, while the scene is
    busy (tracking on), and at least every ``keepalive_s``; the other frames are skipped."""

    enabled: bool = False
    width: int = Field(160, ge=16, le=1920, description="Width of the grey copy compared.")
    threshold: int = Field(25, ge=1, le=255, description="Grey-level change of a moved pixel.")
    min_area: float = Field(
        0.002, gt=0.0, le=1.0, description="Fraction of moved pixels that makes a frame move."
    )
    keepalive_s: float = Field(1.0, gt=0, description="The detector runs at least this often.")
    adapt: float = Field(0.05, gt=0.0, le=1.0, description="Background learning rate per frame.")


def _unique_names(items: list[Any]) -> list[Any]:
    names = [item.name for item in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"names must be unique; repeated: {', '.join(repeated)}")
    return items


def _inside_frame(points: list[Point]) -> list[Point]:
    outside = [list(p) for p in points if not all(0.0 <= v <= 1.0 for v in p)]
    if outside:
        raise ValueError(f"points are fractions of the frame (0..1); outside it: {outside}")
    return points


class ZoneConfig(StrictModel):
    """A polygon in fractions of the frame (0..1, y down); objects standing in it are in it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    polygon: list[Point] = Field(min_length=3, max_length=64)

    _in_frame = field_validator("polygon")(_inside_frame)


class LineConfig(StrictModel):
    """A counting line from its first point to its second, in fractions of the frame."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    points: list[Point] = Field(min_length=2, max_length=2)

    _in_frame = field_validator("points")(_inside_frame)


# topic leaves a camera's name must not shadow: {prefix}/{device}/{camera}/... sits beside them
RESERVED_CAMERA_NAMES = {"status", "detections", "objects", "telemetry", "events", "model", "cmd"}


class CameraConfig(SourceConfig):
    """One of several cameras: a source (every ``source`` option) with its own name and,
    where given, its own thresholds, tracking, zones, lines and motion gating (otherwise the
    top-level sections apply)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Its topics' level.")
    detection: DetectionConfig | None = None
    tracking: TrackingConfig | None = None
    zones: list[ZoneConfig] | None = None
    lines: list[LineConfig] | None = None
    motion: MotionConfig | None = None

    _unique_zone_names = field_validator("zones", "lines")(lambda items: _unique_names(items))


@dataclass(frozen=True)
class Camera:
    """A camera as the agent runs it: its source and the settings that apply to it."""

    name: str
    source: SourceConfig
    detection: DetectionConfig
    tracking: TrackingConfig
    zones: list[ZoneConfig]
    lines: list[LineConfig]
    motion: MotionConfig


class PipelineConfig(StrictModel):
    """Stage queues, deadlines and statistics."""

    queue_size: int = Field(2, ge=1, le=64, description="Bound of each queue between stages.")
    live_queue_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Live sources: bound of the queues before inference, newest frame kept, so "
        "latency stays about one frame's processing instead of a backlog.",
    )
    deadline_ms: float = Field(
        1000.0, gt=0, description="A frame older than this when it reaches inference is late."
    )
    drop_late: bool = Field(
        True, description="Live sources: skip frames already past the deadline before inference."
    )
    latency_window: int = Field(1000, ge=10, description="Frames kept in the rolling histograms.")
    summary_interval_s: float = Field(10.0, gt=0, description="Period of the log line with fps.")
    helper_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness added to capture/preprocess threads so inference keeps the cores "
        "it needs; they run in its gaps. 0 disables.",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        le=16,
        description="Inferences run at once on the one loaded model (each camera's frames "
        "still leave in order). 0: one per camera, up to the usable cores and 4; one camera "
        "runs one at a time (latency first). Unless model.threads is set, each run gets its "
        "share of the cores.",
    )
    opencv_threads: int = Field(
        1,
        ge=0,
        description="OpenCV worker threads; 1 leaves the cores to inference, 0 = OpenCV default.",
    )


class SinksConfig(StrictModel):
    """Where results go. More sinks (MQTT) plug in beside these."""

    stdout: bool = False
    stdout_format: Literal["json", "text"] = "json"
    jsonl: Path | None = Field(None, description="Append one JSON line per result to this file.")
    every_frame: bool = Field(False, description="Also emit frames with no detections.")
    video: Path | None = Field(
        None, description="Write every emitted frame, detections drawn, to this MP4 file."
    )
    video_width: int = Field(960, ge=64, le=7680, description="Width of that video (scaled).")
    video_fps: float = Field(10.0, gt=0, le=240, description="Frame rate written in that video.")


class TlsConfig(StrictModel):
    """Broker TLS. Certificate checks stay on unless ``insecure`` is set on purpose."""

    ca_file: Path | None = Field(None, description="CA bundle (default: the system store).")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key for mutual TLS.")
    insecure: bool = Field(
        False, description="Skip hostname and certificate checks (testing only)."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class HomeAssistantConfig(StrictModel):
    enabled: bool = False
    discovery_prefix: str = "homeassistant"
    classes: list[str] = Field(
        default_factory=lambda: ["person"], description="One binary sensor each."
    )
    off_delay_s: int = Field(5, ge=1, description="A class not seen for this long turns off.")


class MqttConfig(StrictModel):
    """The MQTT link. Works with any MQTT 3.1.1 or 5 broker."""

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    prefix: str = Field("edge", min_length=1, pattern=r"^[^#+]+$")
    client_id: str | None = Field(None, description="Default: edge-agent-<device_id>.")
    keepalive_s: int = Field(30, ge=5, le=65535)
    username: str | None = None
    password: SecretStr | None = Field(None, description="Prefer password_file or the environment.")
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    tls: TlsConfig | None = None
    qos_detections: Literal[0, 1, 2] = 1
    qos_events: Literal[0, 1, 2] = 1
    qos_telemetry: Literal[0, 1, 2] = 0
    telemetry_interval_s: float = Field(10.0, gt=0)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    inflight: int = Field(20, ge=1, le=1000, description="QoS>0 messages awaiting PUBACK at once.")
    ack_timeout_s: float = Field(
        60.0, gt=0, description="No PUBACK this long: the window is sent again from the outbox."
    )
    max_queued: int = Field(
        1000, ge=10, description="Messages paho may hold beyond the in-flight window (memory)."
    )
    max_command_bytes: int = Field(65536, ge=256)
    max_message_bytes: int = Field(
        65536, ge=256, description="larger messages on other subscribed topics are dropped"
    )
    home_assistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self


class OutboxConfig(StrictModel):
    """The durable queue between the loop and the broker."""

    path: Path | None = Field(None, description="Default: <state_dir>/outbox.sqlite.")
    max_messages: int = Field(100_000, ge=10)
    max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0)
    max_memory_bytes: int = Field(
        16 * 1024 * 1024,
        ge=64 * 1024,
        description="While the disk refuses writes (full), messages wait in memory up to this; "
        "beyond it the oldest are dropped and counted.",
    )


LadderStep = Literal["restart_source", "reload_backend", "previous_model", "reconnect_link", "exit"]


class WatchdogConfig(StrictModel):
    """Deadlines, the escalation ladder and the restart-loop guard."""

    enabled: bool = True
    check_interval_s: float = Field(0.5, gt=0)
    inference_timeout_s: float = Field(
        10.0, gt=0, description="One inference longer than this is hung."
    )
    cancel_grace_s: float = Field(
        2.0, gt=0, description="After a cancel, abandon the run if still busy."
    )
    stage_timeout_s: float = Field(
        10.0, gt=0, description="Preprocess/postprocess on one frame longer: hung."
    )
    source_stall_s: float | None = Field(
        None,
        gt=0,
        description="No frame for this long restarts the source (default: 2 x stall_timeout_s).",
    )
    min_fps_ratio: float = Field(
        0.2, ge=0, le=1, description="Live fps below this x nominal is a fault."
    )
    fps_window_s: float = Field(30.0, gt=0, description="... when it lasts this long.")
    failure_streak: int = Field(
        5, ge=1, description="Inferences failing in a row before escalating."
    )
    verify_s: float = Field(
        5.0, gt=0, description="Time a step gets to fix the fault before the next."
    )
    ladder: list[LadderStep] = Field(
        default_factory=lambda: [
            "restart_source",
            "reload_backend",
            "previous_model",
            "reconnect_link",
            "exit",
        ]
    )
    max_restarts: int = Field(
        3, ge=1, description="Each step at most this often per restart_window_s."
    )
    restart_window_s: float = Field(600.0, gt=0)
    backoff_s: float = Field(
        30.0, ge=0, description="Wait after the guard trips, before the next step."
    )
    exit_code: int = Field(
        70, ge=1, le=255, description="Exit status of the last step (EX_SOFTWARE)."
    )
    health_file_interval_s: float = Field(1.0, gt=0)
    link_stall_s: float = Field(
        150.0,
        gt=0,
        description="Connected to the broker, messages waiting, and no PUBACK for this long: "
        "the MQTT side is stuck (a half-open connection, a broker that stopped acknowledging); "
        "the ladder reconnects, then exits for a restart. Above mqtt.ack_timeout_s.",
    )


class ProbationConfig(StrictModel):
    """How long a new model is watched, and what sends it back."""

    frames: int = Field(100, ge=1, description="Judge after this many frames on the new model...")
    seconds: float = Field(
        60.0, gt=0, description="...or after this long, once it has seen min_frames."
    )
    min_frames: int = Field(10, ge=1)
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Failed inferences / frames tried (cancelled ones too)."
    )
    max_latency_ratio: float = Field(
        1.3,
        gt=0,
        description="Median inference time against the previous model's latest frames'.",
    )
    max_p95_ratio: float = Field(
        2.0,
        gt=0,
        description="Inference p95 against the previous model's latest frames', judged once "
        "both have 60 timed frames (a p95 of fewer is their slowest frame).",
    )
    min_agreement: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Paired frames: how well the two models' boxes must agree (0..1) on most.",
    )
    pair_every: int = Field(
        2, ge=1, description="Run the previous model too on every Nth frame while on probation."
    )
    warmup_frames: int = Field(
        3, ge=0, description="The new model's first inferences, left out of its timing."
    )
    retries: int = Field(
        1,
        ge=0,
        description="Soft failures (slower, blinder, later) a version is sent back for and "
        "tried again later before it is rejected for good; failed inferences reject at once.",
    )
    max_empty_increase: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Rise in the share of frames with no detection against the previous model.",
    )
    max_late_increase: float = Field(
        0.2, ge=0, le=1, description="Rise in the share of frames past the deadline."
    )


class OtaConfig(StrictModel):
    """The OTA model channel (TUF): where it is, what this device follows, and the limits."""

    enabled: bool = False
    channel: str = Field(
        "file:///var/lib/edge-agent/channel",
        description="Channel base: https://host/path, http://..., file:///path or a plain path.",
    )
    channel_name: str = Field(
        "stable", pattern=r"^[A-Za-z0-9._-]+$", description="For {prefix}/fleet/<name>/announce."
    )
    root: Path | None = Field(
        None, description="The channel's trusted root.json, provisioned with the device."
    )
    model_name: str | None = Field(
        None, description="Model line to follow (default: the base model's name)."
    )
    target: str | None = Field(
        None,
        description="Variant to ask for (default: detected, e.g. cpu-x86_64, rk3588; an "
        "accelerator's own models only when model.backend runs them, else its CPU's).",
    )
    poll_interval_s: float = Field(3600.0, ge=1)
    poll_jitter: float = Field(
        0.2, ge=0, le=1, description="Each poll waits interval x (1 +- jitter): no fleet stampede."
    )
    first_check_s: float = Field(
        30.0, ge=0, description="First check this long after start (plus jitter)."
    )
    announce_jitter_s: float = Field(
        30.0, ge=0, description="An announce waits a random 0..this before checking."
    )
    max_model_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    timeout_s: float = Field(30.0, gt=0, description="Per HTTP request (connect and read).")
    retries: int = Field(8, ge=0, description="Reconnects without progress before giving up.")
    retry_backoff_s: float = Field(0.5, ge=0)
    free_space_margin_bytes: int = Field(
        16 * 1024 * 1024, ge=0, description="Keep this much disk free when staging."
    )
    self_test_min_recall: float = Field(0.9, ge=0, le=1)
    probation: ProbationConfig = Field(default_factory=ProbationConfig)

    @model_validator(mode="after")
    def _root_when_enabled(self) -> OtaConfig:
        if self.enabled and self.root is None:
            raise ValueError("root (the channel's trusted root.json) is required when enabled")
        return self


class AgentConfig(StrictModel):
    device_id: str = Field(default_factory=socket.gethostname, min_length=1)
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    source: SourceConfig = Field(default_factory=SourceConfig)
    model: ModelConfig
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    ota: OtaConfig = Field(default_factory=OtaConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    zones: list[ZoneConfig] = Field(default_factory=list)
    lines: list[LineConfig] = Field(default_factory=list)
    motion: MotionConfig = Field(default_factory=MotionConfig)

    cameras: list[CameraConfig] = Field(
        default_factory=list,
        description="Several cameras sharing the one model; without it, ``source`` is the one.",
    )

    _unique_zone_names = field_validator("zones", "lines")(lambda items: _unique_names(items))

    @field_validator("cameras")
    @classmethod
    def _camera_names(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        problems = camera_name_problems([{"name": c.name} for c in cameras])
        if problems:
            raise ValueError(problems)
        return cameras

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> AgentConfig:
        if self.cameras and "source" in self.model_fields_set:
            raise ValueError("give either source (one camera) or cameras (several), not both")
        return self

    @model_validator(mode="after")
    def _cameras_make_sense(self) -> AgentConfig:
        problems = []
        for camera, where in zip(self.camera_list(), self._camera_places(), strict=True):
            if (camera.zones or camera.lines) and not camera.tracking.enabled:
                problems.append(
                    f"{where}zones and lines follow tracked objects: set tracking.enabled: true"
                )
            motion, tracking = camera.motion, camera.tracking
            if motion.enabled and tracking.enabled and motion.keepalive_s >= tracking.max_lost_s:
                problems.append(
                    f"{where}motion.keepalive_s ({motion.keepalive_s:g}) must be below "
                    f"tracking.max_lost_s ({tracking.max_lost_s:g}): objects standing still "
                    "would end between two detections"
                )
            stall = self.watchdog.source_stall_s or camera.source.stall_timeout_s
            if motion.enabled and motion.keepalive_s >= stall:
                problems.append(
                    f"{where}motion.keepalive_s ({motion.keepalive_s:g}) must be below the "
                    f"watchdog's stall time ({stall:g} s): a still scene would look like a "
                    "stalled pipeline"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _camera_places(self) -> list[str]:
        if not self.cameras:
            return [""]
        return [f"cameras.{i} ({c.name}): " for i, c in enumerate(self.cameras)]

    def camera_list(self) -> list[Camera]:
        """Every camera with the settings that apply to it: ``cameras``, or ``source`` as one."""
        if not self.cameras:
            return [Camera(self.source.name, self.source, self.detection, self.tracking,
                           self.zones, self.lines, self.motion)]  # fmt: skip
        own = set(CameraConfig.model_fields) - set(SourceConfig.model_fields)
        return [
            Camera(
                c.name,
                SourceConfig.model_validate(c.model_dump(exclude=own)),
                c.detection or self.detection,
                c.tracking or self.tracking,
                self.zones if c.zones is None else c.zones,
                self.lines if c.lines is None else c.lines,
                c.motion or self.motion,
            )
            for c in self.cameras
        ]

    @model_validator(mode="after")
    def _link_stall_after_a_resend(self) -> AgentConfig:
        # the watchdog would cut the connection before the publisher had resent its window once
        if self.mqtt.enabled and self.watchdog.link_stall_s <= self.mqtt.ack_timeout_s:
            raise ValueError(
                f"watchdog.link_stall_s ({self.watchdog.link_stall_s:g}) must be above "
                f"mqtt.ack_timeout_s ({self.mqtt.ack_timeout_s:g}): the link is judged stuck "
                "only after its unacknowledged messages were sent again"
            )
        return self


def describe_validation_error(error: ValidationError, origin: str) -> str:
    """One message naming every bad field and why."""
    lines = [f"invalid configuration ({origin}): {error.error_count()} problem(s)"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``EDGE_AGENT_A__B=v`` variables into a nested dict ``{"a": {"b": v}}``."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: conflicts with another override")
            node = child
        node[path[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def build_config(data: Mapping[str, Any], origin: str = "settings") -> AgentConfig:
    try:
        return AgentConfig.model_validate(dict(data))
    except ValidationError as exc:
        message = describe_validation_error(exc, origin)
        # a bad field inside one camera hides the checks across them (pydantic validates the
        # list only once its items pass): name those problems too, from the raw data
        names = camera_name_problems(data.get("cameras"))
        if names and names not in message:
            message += f"\n  - cameras: {names}"
        raise ConfigError(message) from None


def camera_name_problems(raw: Any) -> str:
    """Repeated or reserved camera names in a raw ``cameras`` list ('' when none)."""
    if not isinstance(raw, list):
        return ""
    names = [c.get("name") for c in raw if isinstance(c, dict) and isinstance(c.get("name"), str)]
    problems = []
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"names must be unique; repeated: {', '.join(repeated)}")
    reserved = sorted(set(names) & RESERVED_CAMERA_NAMES)
    if reserved:
        problems.append(f"camera names {reserved} would shadow the device's own topics")
    return "; ".join(problems)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load a config file (optional) and apply environment overrides on top.

    Raises:
        ConfigError: with every bad field listed.
    """
    environ = os.environ if environ is None else environ
    data = read_yaml(path) if path is not None else {}
    overrides = env_overrides(environ)
    origin = str(path) if path is not None else "no file"
    if overrides:
        origin += " + EDGE_AGENT_* environment"
    return build_config(deep_merge(data, overrides), origin)


def apply_live(current: AgentConfig, fresh: AgentConfig) -> tuple[AgentConfig, list[str]]:
    """What a re-read config changes without a restart (thresholds, sinks, telemetry period),
    applied to ``current``; and the sections whose changes wait for the next restart."""

    def only_telemetry_changed(old: MqttConfig, new: MqttConfig) -> bool:
        return old.model_copy(update={"telemetry_interval_s": new.telemetry_interval_s}) == new

    def without_thresholds(cameras: list[CameraConfig]) -> list[dict[str, Any]]:
        return [camera.model_dump(exclude={"detection"}) for camera in cameras]

    sections = ("model", "source", "mqtt", "outbox", "state_dir", "device_id", "tracking",
                "zones", "lines", "motion")  # fmt: skip
    needs_restart = [
        name
        for name in sections
        if getattr(fresh, name) != getattr(current, name)
        and not (name == "mqtt" and only_telemetry_changed(current.mqtt, fresh.mqtt))
    ]
    if without_thresholds(fresh.cameras) != without_thresholds(current.cameras):
        needs_restart.append("cameras")
    mqtt = current.mqtt.model_copy(update={"telemetry_interval_s": fresh.mqtt.telemetry_interval_s})
    applied = current.model_copy(
        update={"detection": fresh.detection, "sinks": fresh.sinks, "mqtt": mqtt}
    )
    return applied, needs_restart


def redacted(config: AgentConfig) -> dict[str, Any]:
    """The config as plain data, secrets masked (pydantic SecretStr prints as stars)."""
    return config.model_dump(mode="json")
