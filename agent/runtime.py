"""The agent as a whole: the detection loop plus its MQTT link, outbox, telemetry and commands.

Start-up order: model, source, sinks, link (connects in the background), loop. Shutdown runs the
other way: stop capture and drain frames in flight, flush the outbox for a bounded time, publish
``stopped``, disconnect. Nothing here blocks the loop: the MQTT sink only appends to the outbox.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
from pydantic import BaseModel, ConfigDict, Field

from agent import __version__
from agent.config import AgentConfig, ConfigError, MqttConfig, load_config
from agent.messages import TELEMETRY, encode, event, model_ref, status
from agent.outbox import Outbox
from agent.probes import SystemProbes
from agent.service import Notifier, Supervisor
from agent.updates import ManagerError, ModelManager, with_identity
from agent.versions import SemVer
from agent.vision import (
    ActiveModel,
    FrameResult,
    Pipeline,
    build_sinks,
    load_backend,
    open_source,
    resolve_classes,
)

log = logging.getLogger(__name__)


def _only_telemetry_changed(old: MqttConfig, new: MqttConfig) -> bool:
    return old.model_copy(update={"telemetry_interval_s": new.telemetry_interval_s}) == new


class Events:
    """Warnings and escalations: logged always, published on ``events`` when MQTT is on."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.publish: Any = None  # set by attach() once the link exists
        self.count = 0
        self._early: list[dict[str, Any]] = []  # emitted before the link existed (start-up)

    def attach(self, publish: Any) -> None:
        self.publish = publish
        for payload in self._early:
            publish(payload)
        self._early.clear()

    def emit(self, kind: str, message: str, level: str = "warning", **details: Any) -> None:
        self.count += 1
        getattr(log, "error" if level == "error" else "warning" if level == "warning" else "info")(
            "event %s: %s", kind, message
        )
        payload = event(kind, message, level, self.device_id, details)
        if self.publish is not None:
            self.publish(payload)
        elif len(self._early) < 100:
            self._early.append(payload)


class MqttSink:
    """Detections into the outbox; the publisher thread takes them from there."""

    def __init__(self, outbox: Outbox, topic: str, qos: int, device_id: str, session: str) -> None:
        self._outbox, self._topic, self._qos = outbox, topic, qos
        self._device_id, self._session = device_id, session

    def emit(self, result: FrameResult) -> None:
        record = result.to_dict()
        record["device_id"] = self._device_id
        record["session"] = self._session
        record["capture_to_publish_ms"] = round(
            (time.monotonic() - result.frame.captured) * 1000, 3
        )
        self._outbox.submit(self._topic, encode(record), self._qos)

    def close(self) -> None:
        pass


class ThresholdArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confidence: float | None = Field(None, ge=0.0, le=1.0)
    iou: float | None = Field(None, ge=0.0, le=1.0)
    max_detections: int | None = Field(None, ge=1, le=10_000)
    classes: list[int | str] | None = Field(None, max_length=1000)
    all_classes: bool = Field(False, description="Clear the class allow-list.")


class SnapshotArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quality: int = Field(80, ge=1, le=100)
    max_width: int | None = Field(None, ge=32, le=8192)


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PinArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: SemVer | None = Field(description="Follow exactly this version; null unpins.")


def annotate(result: FrameResult) -> Any:
    image = result.frame.image.copy()
    for d in result.detections:
        x1, y1, x2, y2 = (round(v) for v in d.box)
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 200, 255), 2)
        cv2.putText(
            image,
            f"{d.label} {d.score:.2f}",
            (x1, max(12, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 200, 255),
            1,
            cv2.LINE_AA,
        )
    return image


def seen_template(label: str) -> str:
    """A Jinja template that is ON when ``label`` is among a detections message's labels."""
    quoted = label.replace("'", "")
    match = f"selectattr('label', 'equalto', '{quoted}') | list | count > 0"
    return "{{ 'ON' if value_json.detections | " + match + " else 'OFF' }}"


def home_assistant_configs(config: AgentConfig, topics: Any) -> list[tuple[str, dict[str, Any]]]:
    """MQTT discovery: a binary sensor per watched class, sensors for fps and inference time."""
    ha = config.mqtt.home_assistant
    device_id = config.device_id
    device = {
        "identifiers": [f"edge-agent-{device_id}"],
        "name": f"edge-agent {device_id}",
        "sw_version": __version__,
        "manufacturer": "edge-agent",
    }
    availability = {
        "availability_topic": topics.status,
        "availability_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
    }
    configs = []
    for label in ha.classes:
        slug = "".join(c if c.isalnum() else "_" for c in label)
        configs.append(
            (
                f"{ha.discovery_prefix}/binary_sensor/{device_id}/{slug}/config",
                {
                    "name": f"{label} detected",
                    "unique_id": f"edge-agent-{device_id}-{slug}",
                    "state_topic": topics.detections,
                    "value_template": seen_template(label),
                    "off_delay": ha.off_delay_s,
                    "device_class": "occupancy",
                    "device": device,
                    **availability,
                },
            )
        )
    for key, name, unit in (
        ("fps_out", "detection fps", "fps"),
        ("inference_ms", "inference time", "ms"),
    ):
        configs.append(
            (
                f"{ha.discovery_prefix}/sensor/{device_id}/{key}/config",
                {
                    "name": name,
                    "unique_id": f"edge-agent-{device_id}-{key}",
                    "state_topic": topics.telemetry,
                    "value_template": f"{{{{ value_json.{key} }}}}",
                    "unit_of_measurement": unit,
                    "state_class": "measurement",
                    "device": device,
                    **availability,
                },
            )
        )
    return configs


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        max_frames: int | None = None,
        backend: Any = None,
        config_path: Path | None = None,
    ) -> None:
        """``backend``: an already loaded backend to use instead of loading ``config.model``;
        ``config_path``: the file SIGHUP re-reads."""
        self.config = config
        self.config_path = config_path
        self.session = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.events = Events(config.device_id)
        self.notifier = Notifier()
        self.exit_code = 0
        self._hard_exit: threading.Timer | None = None
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {config.state_dir} cannot be created: {exc}") from None
        self.model_options = config.model
        if self.model_options.engine_cache_dir is None:
            self.model_options = self.model_options.model_copy(
                update={"engine_cache_dir": config.state_dir / "engines"}
            )
        self.notifier.extend_timeout(300)  # loading may build a TensorRT engine: minutes
        self._owns_backend = backend is None  # a backend passed in stays its caller's to close
        self.manager: ModelManager | None = None
        if config.ota.enabled and backend is None:
            self.manager = ModelManager(config, self.events, self._load_model_file)
            self.backend = self.manager.startup_backend(config.model.path)
        else:
            self.backend = backend or self._load_backend()
        try:
            resolve_classes(config.detection.classes, self.backend.info.class_names)
        except ValueError as exc:
            raise ConfigError(f"detection.classes: {exc}") from None
        log.info("model loaded: %s", self.backend.info.summary())
        self.model = ActiveModel(self.backend)
        source = open_source(config.source)
        self.sinks = build_sinks(config.sinks)
        self.outbox: Outbox | None = None
        self.link: Any = None
        self.publisher: Any = None
        self.commands: Any = None
        if config.mqtt.enabled:
            self._setup_mqtt()
        self.pipeline = Pipeline(
            source,
            self.model,
            self.sinks,
            config.detection,
            config.pipeline,
            emit_empty=config.sinks.every_frame,
            max_frames=max_frames,
        )
        if self.manager is not None:
            self.manager.attach(
                self.model,
                self.model.swap,  # between two frames: the frame in inference finishes
                self.pipeline.stats.for_model,
                self._publish_model_state,
            )
        self.probes = SystemProbes()
        self.supervisor: Supervisor | None = None
        if config.watchdog.enabled:
            self.supervisor = Supervisor(
                config.watchdog,
                self.pipeline,
                {
                    "restart_source": self._restart_source,
                    "reload_backend": self._reload_backend,
                    "previous_model": self._previous_model,
                    "exit": self._exit_for_restart,
                },
                self.events.emit,
                self.notifier,
                config.state_dir / "health.json",
                self.status_text,
                config.source.stall_timeout_s,
            )
        self._stop = threading.Event()
        self._housekeeping = threading.Thread(target=self._housekeep, name="telemetry", daemon=True)
        self._last_counts: dict[str, int] = {}
        self._last_frames = (time.monotonic(), 0, 0)

    @property
    def source(self) -> Any:
        """The source in use now (the watchdog may have reopened it)."""
        return self.pipeline.source

    def _load_model_file(self, path: Path) -> Any:
        options = self.model_options
        return load_backend(options.backend, path, options.model_copy(update={"path": path}))

    def _load_backend(self) -> Any:
        """The active model again, from disk: the base model, or its OTA slot."""
        if self.manager is None:
            return self._load_model_file(self.model_options.path)
        record = self.manager.active_record()
        assert record is not None
        return with_identity(self._load_model_file(Path(record.path)), record)

    def status_text(self) -> str:
        fps = self.pipeline.stats.throughput_fps()
        info = self.model().info
        return f"fps {fps or 0:.1f}, model {info.model_name} {info.model_version}"

    # -- the watchdog's ladder ---------------------------------------------------------------------
    def _restart_source(self) -> str | None:
        if not self.pipeline.source.live:
            return None  # a file does not stall; nothing to reopen
        fresh = open_source(self.config.source)
        old = self.pipeline.replace_source(fresh)
        threading.Thread(target=old.close, name="close-old-source", daemon=True).start()
        return f"source {fresh.name} reopened"

    def _take_over_inference(self, backend: Any) -> None:
        self.model.swap(backend)
        self._abandon_hung_inference()

    def _abandon_hung_inference(self) -> None:
        """The watchdog's steps do not wait for a run that may never return."""
        if self.pipeline.busy_since.get("inference") is not None:
            self.pipeline.replace_inference_worker()
        self.pipeline.stats.inference_failures = 0

    def _reload_backend(self) -> str | None:
        self.notifier.extend_timeout(300)
        backend = self._load_backend()
        self._take_over_inference(backend)
        return f"backend reloaded from {backend.info.model_path}"

    def _previous_model(self) -> str | None:
        if self.manager is not None:
            try:
                result = self.manager.rollback("the watchdog's previous_model step")
            except ManagerError as exc:
                log.warning("previous_model: %s", exc)
                return None
            self._abandon_hung_inference()
            return f"fell back to model {result.get('active')}"
        previous = self.model.previous
        if previous is None or previous is self.model():
            return None  # no earlier model in this run (the model store adds slots on disk)
        self._take_over_inference(previous)
        return f"fell back to model {previous.info.model_name} {previous.info.model_version}"

    def _exit_for_restart(self) -> str:
        self.exit_code = self.config.watchdog.exit_code
        self.pipeline.stop()
        # a hung stage can keep the orderly shutdown from finishing: bound it
        self._hard_exit = threading.Timer(20.0, os._exit, args=(self.exit_code,))
        self._hard_exit.daemon = True
        self._hard_exit.start()
        return f"exiting with status {self.exit_code} so that systemd restarts the agent"

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply thresholds, sinks and telemetry period live."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the agent was not started from a config file")
            return
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            self.events.emit("config_rejected", f"SIGHUP: new config not applied: {exc}", "error")
            return
        try:
            resolve_classes(fresh.detection.classes, self.model().info.class_names)
        except ValueError as exc:
            self.events.emit("config_rejected", f"SIGHUP: detection.classes: {exc}", "error")
            return
        self.pipeline.set_thresholds(**fresh.detection.model_dump())
        keep = [s for s in self.sinks if isinstance(s, MqttSink)]
        for sink in self.sinks:
            if not isinstance(sink, MqttSink):
                sink.close()
        self.sinks[:] = build_sinks(fresh.sinks) + keep
        self.pipeline.sinks = self.sinks
        self.pipeline.emit_empty = fresh.sinks.every_frame
        needs_restart = [
            name
            for name in ("model", "source", "mqtt", "outbox", "state_dir", "device_id")
            if getattr(fresh, name) != getattr(self.config, name)
            and not (name == "mqtt" and _only_telemetry_changed(self.config.mqtt, fresh.mqtt))
        ]
        mqtt = self.config.mqtt.model_copy(
            update={"telemetry_interval_s": fresh.mqtt.telemetry_interval_s}
        )
        self.config = self.config.model_copy(
            update={"detection": fresh.detection, "sinks": fresh.sinks, "mqtt": mqtt}
        )
        message = "config reloaded: thresholds and sinks applied"
        if needs_restart:
            message += f"; changes to {', '.join(needs_restart)} take effect at the next restart"
        self.events.emit(
            "config_reloaded", message, "info", thresholds=fresh.detection.model_dump()
        )

    # -- MQTT ------------------------------------------------------------------------------------
    def _setup_mqtt(self) -> None:
        from agent.commands import CommandRouter
        from agent.mqtt import MqttLink, Publisher

        config = self.config
        self.outbox = Outbox(
            config.outbox.path or config.state_dir / "outbox.sqlite",
            config.outbox.max_messages,
            config.outbox.max_bytes,
            config.outbox.max_age_s,
        )
        will = encode(status("offline", config.device_id, self.session, self.backend.info))
        self.commands = CommandRouter(self._reply, config.mqtt.max_command_bytes)
        self.commands.register("ping", NoArgs, self._cmd_ping)
        self.commands.register("config/thresholds", ThresholdArgs, self._cmd_thresholds)
        self.commands.register("snapshot", SnapshotArgs, self._cmd_snapshot)
        subscriptions = []
        if self.manager is not None:
            self.commands.register("ota/check", NoArgs, self._cmd_ota_check)
            self.commands.register("model/status", NoArgs, self._cmd_model_status)
            self.commands.register("model/rollback", NoArgs, self._cmd_model_rollback)
            self.commands.register("model/pin", PinArgs, self._cmd_model_pin)
            subscriptions.append(self.announce_topic)
        self.link = MqttLink(
            config.mqtt,
            config.device_id,
            will,
            on_command=self.commands.submit,
            subscriptions=subscriptions,
            on_connected=self._on_connected,
            on_message=self._on_message,
        )
        self.publisher = Publisher(self.outbox, self.link, config.mqtt.inflight)
        topics = self.link.topics
        self.sinks.append(
            MqttSink(
                self.outbox,
                topics.detections,
                config.mqtt.qos_detections,
                config.device_id,
                self.session,
            )
        )
        self.events.attach(
            lambda payload: self.outbox.put(topics.events, encode(payload), config.mqtt.qos_events)
        )

    @property
    def announce_topic(self) -> str:
        return f"{self.config.mqtt.prefix}/fleet/{self.config.ota.channel_name}/announce"

    def _on_message(self, topic: str, _payload: bytes) -> None:
        if self.manager is not None and topic == self.announce_topic:
            log.info("channel announce received: checking for a model update")
            self.manager.nudge()

    def _on_connected(self) -> None:
        """On every (re)connect: retained status, model and discovery configs."""
        topics = self.link.topics
        info = self.model().info
        self.link.publish(
            topics.status,
            encode(status("online", self.config.device_id, self.session, info)),
            qos=1,
            retain=True,
        )
        self.link.publish(topics.model, encode(self.model_message()), qos=1, retain=True)
        if self.config.mqtt.home_assistant.enabled:
            for topic, payload in home_assistant_configs(self.config, topics):
                self.link.publish(topic, encode(payload), qos=1, retain=True)

    def model_message(self) -> dict[str, Any]:
        info = self.model().info
        message = {
            "schema": "edge-agent/model/v1",
            "device_id": self.config.device_id,
            "active": {**info.summary(), "classes": info.num_classes},
            "timestamp": round(time.time(), 3),
        }
        if self.manager is not None:
            message["ota"] = self.manager.status()
        return message

    def _publish_model_state(self) -> None:
        if self.link is not None:
            topic = self.link.topics.model
            self.link.publish(topic, encode(self.model_message()), qos=1, retain=True)

    def _manager_call(self, action: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        from agent.commands import CommandError

        assert self.manager is not None
        result = self.manager.call(action, args, timeout)
        if not result.pop("ok", False):
            raise CommandError(result.get("error", f"{action} failed"))
        return result

    def _cmd_ota_check(self, _: NoArgs) -> dict[str, Any]:
        assert self.manager is not None
        self.manager.submit("check", {"trigger": "command"})
        return {"queued": True, "note": "progress and outcome follow on events and model"}

    def _cmd_model_status(self, _: NoArgs) -> dict[str, Any]:
        assert self.manager is not None
        return self.manager.status()

    def _cmd_model_rollback(self, _: NoArgs) -> dict[str, Any]:
        return self._manager_call("rollback", {"reason": "requested over MQTT"}, 60)

    def _cmd_model_pin(self, args: PinArgs) -> dict[str, Any]:
        return self._manager_call("pin", {"version": args.version}, 600)

    def _reply(self, name: str, payload: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.publish(self.link.topics.command_result(name[:200]), encode(payload), qos=1)

    def _cmd_ping(self, _: NoArgs) -> dict[str, Any]:
        return {
            "pong": True,
            "agent_version": __version__,
            "session": self.session,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "model": model_ref(self.model().info),
        }

    def _cmd_thresholds(self, args: ThresholdArgs) -> dict[str, Any]:
        from agent.commands import CommandError

        changes = args.model_dump(exclude_none=True, exclude={"all_classes"})
        if args.all_classes:
            changes["classes"] = None
        if "classes" in changes and changes["classes"] is not None:
            try:
                resolve_classes(changes["classes"], self.model().info.class_names)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        if changes:
            updated = self.pipeline.set_thresholds(**changes)
            self.events.emit(
                "thresholds_changed",
                f"thresholds now {updated.model_dump()}",
                "info",
                **updated.model_dump(),
            )
        return self.pipeline.detection.model_dump()

    def _cmd_snapshot(self, args: SnapshotArgs) -> dict[str, Any]:
        from agent.commands import CommandError

        result = self.pipeline.last_result
        if result is None:
            raise CommandError("no frame has been processed yet")
        image = annotate(result)
        if args.max_width and image.shape[1] > args.max_width:
            scale = args.max_width / image.shape[1]
            image = cv2.resize(
                image, (args.max_width, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA
            )
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        if not ok:
            raise CommandError("JPEG encoding failed")
        return {
            "frame_id": result.frame.frame_id,
            "timestamp": round(result.frame.timestamp, 6),
            "width": image.shape[1],
            "height": image.shape[0],
            "detections": [d.to_dict() for d in result.detections],
            "jpeg_base64": base64.b64encode(jpeg.tobytes()).decode("ascii"),
        }

    # -- telemetry and housekeeping ---------------------------------------------------------------
    def telemetry_message(self) -> dict[str, Any]:
        snap = self.pipeline.stats.snapshot()
        now = time.monotonic()
        last_t, last_in, last_out = self._last_frames
        span = max(now - last_t, 1e-6)
        self._last_frames = (now, snap["frames_in"], snap["frames_out"])
        message: dict[str, Any] = {
            "schema": TELEMETRY,
            "device_id": self.config.device_id,
            "session": self.session,
            "timestamp": round(time.time(), 3),
            "uptime_s": round(now - self.started, 3),
            "model": model_ref(self.model().info),
            "fps_in": round((snap["frames_in"] - last_in) / span, 2),
            "fps_out": round((snap["frames_out"] - last_out) / span, 2),
            "frames": {
                k: snap[k] for k in ("frames_in", "frames_out", "dropped", "late", "errors")
            },
            "latency_ms": snap["latency_ms"],
            "inference_ms": snap["latency_ms"]["inference"]["p50"],
            "source": {"name": self.source.name, **self.source.stats.as_dict()},
            **self.probes.read(),
        }
        if self.outbox is not None:
            message["outbox"] = self.outbox.counters()
        if self.link is not None:
            message["mqtt"] = {
                "connected": self.link.connected.is_set(),
                "connects": self.link.connects,
                "connect_failures": self.link.connect_failures,
                "published": self.publisher.published,
                "refused": self.publisher.refused,
                "commands_handled": self.commands.handled,
                "commands_rejected": self.commands.rejected,
            }
        return message

    def _watch_counters(self) -> None:
        """Turn counter increases into events (reconnects, drops, refusals, errors)."""
        watched = {
            "source_reconnects": (self.source.stats.reconnects, "source lost, reconnecting"),
            "source_stalls": (self.source.stats.stalls, "source stalled"),
            "pipeline_errors": (self.pipeline.stats.errors, "frames failed in the pipeline"),
        }
        if self.outbox is not None:
            counters = self.outbox.counters()
            watched["outbox_dropped"] = (
                counters["dropped_overflow"] + counters["dropped_expired"],
                "outbox full or expired: oldest dropped",
            )
        if self.publisher is not None:
            watched["publish_refused"] = (self.publisher.refused, "broker refused publishes")
        for kind, (value, message) in watched.items():
            before = self._last_counts.get(kind)
            self._last_counts[kind] = value
            if before is not None and value > before:
                detail = self.source.stats.last_error if kind.startswith("source") else None
                if kind == "publish_refused":
                    detail = self.publisher.last_refusal
                self.events.emit(
                    kind,
                    f"{message} (+{value - before}, total {value})",
                    "warning",
                    total=value,
                    new=value - before,
                    last_error=detail,
                )

    def _housekeep(self) -> None:
        next_telemetry = time.monotonic() + self.config.mqtt.telemetry_interval_s
        next_expiry = time.monotonic()
        self._watch_counters()  # baseline
        while not self._stop.wait(min(1.0, self.config.mqtt.telemetry_interval_s)):
            interval = self.config.mqtt.telemetry_interval_s  # SIGHUP may change it
            self._watch_counters()
            now = time.monotonic()
            if self.outbox is not None and now >= next_expiry:
                self.outbox.expire()
                next_expiry = now + 60
            if self.link is not None and now >= next_telemetry:
                next_telemetry = now + interval
                self.link.publish(
                    self.link.topics.telemetry,
                    encode(self.telemetry_message()),
                    qos=self.config.mqtt.qos_telemetry,
                )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.link is not None:
            self.commands.start()
            self.publisher.start()
            self.link.start()
        self.pipeline.start()
        self._housekeeping.start()
        if self.manager is not None:
            self.manager.start()
        if self.supervisor is not None:
            self.supervisor.start()
        self.events.emit(
            "started",
            f"edge-agent {__version__} started",
            "info",
            session=self.session,
            model=model_ref(self.backend.info),
        )

    def stop(self) -> None:
        self.pipeline.stop()

    def run(self) -> int:
        """Run until the source ends, ``stop()`` or the ladder's exit; then shut down in order.

        Returns the exit status (non-zero when the watchdog asked for a restart).
        """
        self.start()
        try:
            while not self.pipeline.wait(timeout=0.5):
                if self.exit_code:
                    break  # a hung stage may never drain: stop waiting for it
        finally:
            self.shutdown()
        log.info("%s", self.pipeline.summary_line())
        if self.exit_code:
            return self.exit_code
        if self.pipeline.error is not None:
            raise self.pipeline.error
        return 0

    def shutdown(self, flush_timeout: float = 5.0) -> None:
        self.notifier.stopping()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.manager is not None:
            self.manager.stop()
        self.pipeline.stop()
        self.pipeline.wait(timeout=2.0 if self.exit_code else 10.0)
        self._stop.set()
        self._housekeeping.join(timeout=2.0)
        self.source.close()
        for sink in self.sinks:
            sink.close()
        if self.link is not None:
            flushed = self.publisher.stop(flush_timeout)
            if not flushed:
                log.warning("%d message(s) left in the outbox for the next start", len(self.outbox))
            self.commands.stop()
            final = encode(
                status("stopped", self.config.device_id, self.session, self.model().info)
            )
            self.link.stop(final)
            self.outbox.close()
        self.probes.close()
        if self._owns_backend:
            active = self.model()
            active.close()
            if self.backend is not active:
                self.backend.close()
        self.notifier.close()
        if self._hard_exit is not None:
            self._hard_exit.cancel()
