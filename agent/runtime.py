"""The agent: wires the wings together and runs their lifecycle (start, run, reload, shutdown).

Start-up order: model (the model manager recovers and picks it when OTA is on), link, loop,
watchdog. Shutdown runs the other way: stop capture and drain frames in flight, flush the outbox
for a bounded time, publish ``stopped``, disconnect. Nothing here blocks the loop: the MQTT sink
only appends to the outbox.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from agent import __version__, threads
from agent.config import AgentConfig, Camera, ConfigError, apply_live, load_config
from agent.ladder import RecoveryLadder
from agent.link import (
    CommandHandlers,
    Events,
    Housekeeper,
    Link,
    Telemetry,
    model_ref,
)
from agent.loading import ModelLoader
from agent.service import Notifier, Supervisor
from agent.updates import ModelManager
from agent.vision import (
    ActiveModel,
    Backend,
    CameraFeed,
    FrameSource,
    MotionGate,
    Pipeline,
    Scene,
    build_sinks,
    on_engine_builds,
    open_source,
    resolve_classes,
)

log = logging.getLogger(__name__)


def unknown_classes(config: AgentConfig, names: dict[int, str]) -> list[str]:
    """Every camera's ``detection.classes`` the model does not have, each with where it is."""
    problems = []
    places = [""] if not config.cameras else [f"cameras.{i}." for i in range(len(config.cameras))]
    for camera, place in zip(config.camera_list(), places, strict=True):
        try:
            resolve_classes(camera.detection.classes, names)
        except ValueError as exc:
            problems.append(f"{place}detection.classes: {exc}")
    return problems


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
        self._restore_thread_hook: Any = None
        self.notifier = Notifier()
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {config.state_dir} cannot be created: {exc}") from None
        self.loader = ModelLoader(config)
        self.notifier.extend_timeout(300)  # loading may build a TensorRT engine: minutes
        self._stop_hearing_builds = on_engine_builds(self._engine_build)
        self._owns_backend = backend is None  # a backend passed in stays its caller's to close
        self.manager: ModelManager | None = None
        if config.ota.enabled and backend is None:
            self.manager = self.loader.manager = ModelManager(config, self.events, self.loader.load)
            self.backend = self.manager.startup_backend(config.model.path)
        else:
            self.backend = backend or self._load_backend()
        problems = unknown_classes(config, self.backend.info.class_names)
        if problems:
            raise ConfigError("; ".join(problems))
        log.info("model loaded: %s", self.backend.info.summary())
        self.model = ActiveModel(self.backend)
        cameras = [self._open_camera(camera) for camera in config.camera_list()]
        self.sinks = build_sinks(config.sinks)
        self.link: Link | None = None
        self.telemetry: Telemetry | None = None
        if config.mqtt.enabled:
            self.link = Link(config, self.session, lambda: self.model().info, self.manager)
            self.sinks.append(self.link.sink)
            self.events.attach(self.link.publish_event)
        self.pipeline = Pipeline(
            None,
            self.model,
            self.sinks,
            config.detection,
            config.pipeline,
            emit_empty=config.sinks.every_frame,
            max_frames=max_frames,
            cameras=cameras,
        )
        if self.link is not None:
            handlers = CommandHandlers(
                self.pipeline, self.model, self.events, self.session, self.started, self.manager
            )
            handlers.register(self.link.commands)
            self.telemetry = Telemetry(
                config.device_id, self.session, self.started, self.pipeline, self.model
            )
        if self.manager is not None:
            self.manager.attach(
                self.model,
                self.model.swap,  # between two frames: the frame in inference finishes
                self.pipeline.stats.for_model,
                self.link.publish_model if self.link is not None else lambda: None,
                lambda shadow: setattr(self.model, "shadow", shadow),
            )
        self.ladder = RecoveryLadder(
            config,
            self.pipeline,
            self.model,
            self.manager,
            self.notifier,
            self._reopen_source,
            lambda: self._load_backend(),
            self.link.drop_connection if self.link is not None else None,
        )
        self.supervisor: Supervisor | None = None
        if config.watchdog.enabled:
            self.supervisor = Supervisor(
                config.watchdog,
                self.pipeline,
                self.ladder.steps(),
                self.events.emit,
                self.notifier,
                config.state_dir / "health.json",
                self.status_text,
                config.source.stall_timeout_s,
                self.link.ack_stall_s if self.link is not None else None,
            )
        self.housekeeper = Housekeeper(
            lambda: self.config.mqtt.telemetry_interval_s,  # SIGHUP may change it
            self.events,
            self.pipeline,
            self.link,
            self.telemetry,
        )

    def _engine_build(self, kind: str, details: dict[str, Any]) -> None:
        """TensorRT builds on ``events``; one at start keeps systemd waiting (before READY=1)."""
        if kind == "engine_build_started":
            self.notifier.extend_timeout(1800)
            gpu, precision = details.get("gpu"), details.get("precision")
            message = f"building a TensorRT engine ({precision} on {gpu}): minutes on a Jetson"
            self.events.emit(kind, message, "info", **details)
        elif kind == "engine_built":
            message = f"TensorRT engine built in {details.get('seconds')} s"
            self.events.emit(kind, message, "info", **details)
        else:
            message = f"TensorRT engine build failed: {details.get('reason')}"
            self.events.emit(kind, message, "error", **details)

    @staticmethod
    def _open_camera(camera: Camera) -> CameraFeed:
        scene, gate = Scene.from_config(camera), MotionGate.from_config(camera.motion)
        return CameraFeed(camera.name, open_source(camera.source), camera.detection, scene, gate)

    def _reopen_source(self, camera: str) -> FrameSource:
        """The watchdog's restart_source step: the named camera's source, opened afresh."""
        configured = {c.name: c for c in self.config.camera_list()}
        return open_source(configured[camera].source)

    @property
    def source(self) -> Any:
        """The source in use now (the watchdog may have reopened it)."""
        return self.pipeline.source

    @property
    def exit_code(self) -> int:
        """Non-zero once the watchdog's last step asked systemd for a restart."""
        return self.ladder.exit_code

    def _load_backend(self) -> Backend:
        return self.loader.active()

    def status_text(self) -> str:
        fps = self.pipeline.stats.throughput_fps()
        info = self.model().info
        return f"fps {fps or 0:.1f}, model {info.model_name} {info.model_version}"

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
        problems = unknown_classes(fresh, self.model().info.class_names)
        if problems:
            self.events.emit("config_rejected", f"SIGHUP: {'; '.join(problems)}", "error")
            return
        running = {camera.name for camera in self.pipeline.cameras}
        for camera in fresh.camera_list():
            if camera.name in running:
                self.pipeline.set_thresholds(camera.name, **camera.detection.model_dump())
        kept = [self.link.sink] if self.link is not None else []
        for sink in (s for s in self.sinks if s not in kept):
            sink.close()
        self.sinks[:] = build_sinks(fresh.sinks) + kept
        self.pipeline.sinks, self.pipeline.emit_empty = self.sinks, fresh.sinks.every_frame
        self.config, needs_restart = apply_live(self.config, fresh)
        message = "config reloaded: thresholds and sinks applied"
        if needs_restart:
            message += f"; changes to {', '.join(needs_restart)} take effect at the next restart"
        self.events.emit(
            "config_reloaded", message, "info", thresholds=fresh.detection.model_dump()
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._restore_thread_hook = threads.install_hook(self._thread_died)
        if self.link is not None:
            self.link.start()
        self.pipeline.start()
        self.housekeeper.start()
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

    def _thread_died(self, name: str, exc: BaseException) -> None:
        """A thread ended on an exception (after its own restarts, if it had any): report it
        and exit non-zero, so that systemd starts the agent afresh."""
        self.events.emit("thread_crashed", f"thread {name} died: {exc!r:.300}", "error",
                         thread=name)  # fmt: skip
        if not self.exit_code:
            outcome = self.ladder.exit_for_restart()
            reason = f"thread {name} died"
            self.events.emit("escalation", f"exit: {outcome} (because {reason})", "error",
                             step="exit", reason=reason, applied=True)  # fmt: skip

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
        if self.pipeline.crashed is not None:  # a bug, not the end of the source: systemd's
            # Restart=on-failure restarts only a non-zero exit
            log.error("exiting with status %d: pipeline stage %s", self.config.watchdog.exit_code,
                      self.pipeline.crashed)  # fmt: skip
            return self.config.watchdog.exit_code
        return 0

    def shutdown(self, flush_timeout: float = 5.0) -> None:
        self.notifier.stopping()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.manager is not None:
            self.manager.stop()
        self.pipeline.stop()
        self.pipeline.wait(timeout=2.0 if self.exit_code else 10.0)
        self.housekeeper.stop()
        for camera in self.pipeline.cameras:
            camera.source.close()
        for sink in self.sinks:
            sink.close()
        if self.link is not None:
            self.link.stop(flush_timeout)
        if self._owns_backend:
            active = self.model()
            active.close()
            if self.backend is not active:
                self.backend.close()
        self.notifier.close()
        self._stop_hearing_builds()
        self.ladder.cancel_hard_exit()
        if self._restore_thread_hook is not None:
            self._restore_thread_hook()
            self._restore_thread_hook = None
