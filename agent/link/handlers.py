"""The commands the agent answers, their typed arguments, and what each one does.

``ping``, ``config/thresholds`` and ``snapshot`` always; with OTA on, ``ota/check``,
``model/status``, ``model/rollback`` and ``model/pin``, which go to the model control the wiring
hands in (the model manager) without this wing knowing the updates wing. A handler raises
``CommandError`` for a request it understood but cannot carry out; it changes nothing then.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any, Protocol

import cv2
from pydantic import BaseModel, ConfigDict, Field

from agent import __version__
from agent.contract.versions import SemVer
from agent.link.commands import CommandError, CommandRouter
from agent.link.events import Events
from agent.link.messages import model_ref
from agent.vision import Backend, Pipeline, annotate, resolve_classes


class ThresholdArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confidence: float | None = Field(None, ge=0.0, le=1.0)
    iou: float | None = Field(None, ge=0.0, le=1.0)
    max_detections: int | None = Field(None, ge=1, le=10_000)
    classes: list[int | str] | None = Field(None, max_length=1000)
    all_classes: bool = Field(False, description="Clear the class allow-list.")
    camera: str | None = Field(None, description="Only this camera (default: every camera).")


class SnapshotArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quality: int = Field(80, ge=1, le=100)
    max_width: int | None = Field(None, ge=32, le=8192)
    camera: str | None = Field(None, description="Which camera (default: the first).")


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PinArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: SemVer | None = Field(description="Follow exactly this version; null unpins.")


class ModelControl(Protocol):
    """What the model commands need from whoever changes models (the model manager)."""

    def submit(self, action: str, args: dict[str, Any] | None = None) -> Any: ...

    def call(
        self, action: str, args: dict[str, Any] | None = None, timeout: float = 120
    ) -> dict: ...

    def status(self) -> dict[str, Any]: ...

    def nudge(self, max_delay_s: float | None = None) -> None:
        """Check the channel soon: after a random 0..max_delay_s (default: the announce jitter)."""


class CommandHandlers:
    """Each handler takes its validated arguments and returns the reply's ``result``."""

    def __init__(
        self,
        pipeline: Pipeline,
        model: Callable[[], Backend],
        events: Events,
        session: str,
        started: float,
        control: ModelControl | None = None,
    ) -> None:
        """``started``: the agent's start (monotonic), for uptime."""
        self.pipeline, self.model, self.events = pipeline, model, events
        self.session, self.started, self.control = session, started, control

    def register(self, router: CommandRouter) -> None:
        router.register("ping", NoArgs, self.ping)
        router.register("config/thresholds", ThresholdArgs, self.thresholds)
        router.register("snapshot", SnapshotArgs, self.snapshot)
        if self.control is not None:
            router.register("ota/check", NoArgs, self.ota_check)
            router.register("model/status", NoArgs, self.model_status)
            router.register("model/rollback", NoArgs, self.model_rollback)
            router.register("model/pin", PinArgs, self.model_pin)

    def ping(self, _: NoArgs) -> dict[str, Any]:
        return {
            "pong": True,
            "agent_version": __version__,
            "session": self.session,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "model": model_ref(self.model().info),
        }

    def thresholds(self, args: ThresholdArgs) -> dict[str, Any]:
        changes = args.model_dump(exclude_none=True, exclude={"all_classes", "camera"})
        feed = self._camera(args.camera)
        if args.all_classes:
            changes["classes"] = None
        if "classes" in changes and changes["classes"] is not None:
            try:
                resolve_classes(changes["classes"], self.model().info.class_names)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        if changes:
            updated = self.pipeline.set_thresholds(args.camera, **changes)
            self.events.emit(
                "thresholds_changed",
                f"thresholds now {updated.model_dump()}",
                "info",
                camera=args.camera,
                **updated.model_dump(),
            )
        return feed.detection.model_dump()

    def _camera(self, name: str | None) -> Any:
        try:
            return self.pipeline.camera(name)
        except KeyError as exc:
            raise CommandError(str(exc.args[0])) from None

    def snapshot(self, args: SnapshotArgs) -> dict[str, Any]:
        feed = self._camera(args.camera)
        result = feed.last_result
        if result is None:
            raise CommandError(f"no frame of camera {feed.name} has been processed yet")
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
            "camera": feed.name,
            "frame_id": result.frame.frame_id,
            "timestamp": round(result.frame.timestamp, 6),
            "width": image.shape[1],
            "height": image.shape[0],
            "detections": [d.to_dict() for d in result.detections],
            "jpeg_base64": base64.b64encode(jpeg.tobytes()).decode("ascii"),
        }

    def _call(self, action: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.control is not None
        result = self.control.call(action, args, timeout)
        if not result.pop("ok", False):
            raise CommandError(result.get("error", f"{action} failed"))
        return result

    def ota_check(self, _: NoArgs) -> dict[str, Any]:
        assert self.control is not None
        self.control.submit("check", {"trigger": "command"})
        return {"queued": True, "note": "progress and outcome follow on events and model"}

    def model_status(self, _: NoArgs) -> dict[str, Any]:
        assert self.control is not None
        return self.control.status()

    def model_rollback(self, _: NoArgs) -> dict[str, Any]:
        return self._call("rollback", {"reason": "requested over MQTT"}, 60)

    def model_pin(self, args: PinArgs) -> dict[str, Any]:
        return self._call("pin", {"version": args.version}, 600)
