"""The model manager: which model runs, and every change of it, one at a time, on one thread.

It checks the channel on a jittered timer, on an MQTT nudge or on request, and runs what follows
through the update flow (download, stage, load, self-test) and the live model (swap, probation,
commit, rollback, pins). Operator requests (over MQTT, or files the CLI leaves) and the watchdog's
``previous_model`` rung queue here too, so transitions never interleave and the loop never waits:
loading and testing happen on this thread while frames keep flowing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.contract.descriptor import EngineEnvironment
from agent.contract.files import write_atomic
from agent.updates import startup
from agent.updates.following import followed_target
from agent.updates.live_model import LiveModel, ManagerError
from agent.updates.model_store import ModelStore, SlotRecord, StoreError, StoreState
from agent.updates.ota import ChannelClient, OtaError, announce_delay, poll_delay
from agent.updates.update_flow import UpdateFlow
from agent.vision import Backend, ModelStats, Shadow, local_engine_environment

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
    action: str
    args: dict[str, Any]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict[str, Any] | None = None


def engine_environment(config: AgentConfig) -> EngineEnvironment | None:
    """With the tensorrt backend, what this device's engines are tied to (so it may take a
    prebuilt one); otherwise None: the release's ONNX."""
    if config.model.backend != "tensorrt":
        return None
    found = local_engine_environment(config.model.tensorrt.device, config.model.tensorrt.cuda)
    return EngineEnvironment(**found) if found else None


class ModelManager:
    """The one place a model change starts: a thread, a request queue, and the two jobs behind."""

    def __init__(
        self,
        config: AgentConfig,
        events: Any,
        loader: Callable[[Path], Backend],
        store: ModelStore | None = None,
    ) -> None:
        self.config = config
        self.ota = config.ota
        self.events = events
        self.store = store or ModelStore(config.state_dir / "models")
        self.client = ChannelClient(config.ota, self.store.root / "tuf", config.device_id)
        self.target = followed_target(config.ota, config.model.backend)
        self.live = LiveModel(config.ota, self.store, events, loader)
        self.flow = UpdateFlow(
            config.ota, self.client, self.live, self.target, engine_environment(config)
        )
        self._requests: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._nudge_at: float | None = None

    @property
    def state(self) -> StoreState:
        return self.store.state

    def active_record(self) -> SlotRecord | None:
        return self.live.active_record()

    def startup_backend(self, base_path: Path) -> Backend:
        """Recover from whatever a crash left, then load the best model that works."""
        return startup.load_best(self.live, base_path)

    def attach(
        self,
        active_model: Callable[[], Backend],
        take_over: Callable[[Backend], None],
        stats_for: Callable[[Backend], ModelStats],
        on_change: Callable[[], None],
        set_shadow: Callable[[Shadow | None], None] | None = None,
    ) -> None:
        """Wire the loop in: the model it runs now, how to swap it, its statistics, and how to
        run the previous model beside it on the same frames during a probation."""
        live = self.live
        live.active_model, live.take_over = active_model, take_over
        live.stats_for, live.on_change = stats_for, on_change
        if set_shadow is not None:
            live.set_shadow = set_shadow

    # -- the thread and its requests ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.store.release_running_lock()

    def nudge(self, max_delay_s: float | None = None) -> None:
        """Check soon: after a random 0..max_delay_s, so a fleet does not arrive at once."""
        at = time.monotonic() + announce_delay(self.ota, max_delay_s)
        self._nudge_at = at if self._nudge_at is None else min(self._nudge_at, at)

    def submit(self, action: str, args: dict[str, Any] | None = None) -> Request:
        request = Request(action, args or {})
        self._requests.put(request)
        return request

    def call(self, action: str, args: dict[str, Any] | None = None, timeout: float = 120) -> dict:
        request = self.submit(action, args)
        if not request.done.wait(timeout):
            return {"ok": False, "error": f"{action} did not finish within {timeout:g} s"}
        return request.result or {"ok": False, "error": "no result"}

    def _next_poll(self, first: bool = False) -> float:
        return time.monotonic() + poll_delay(self.ota, first)

    def _run(self) -> None:
        next_poll = self._next_poll(first=True)
        if self.state.staged is not None:
            self.submit("activate")
        while not self._stop.is_set():
            try:
                next_poll = self._step(next_poll)
            except Exception:  # a disk error, a bug: log it, keep the manager alive
                log.exception("model manager step failed")
                time.sleep(1.0)

    def _step(self, next_poll: float) -> float:
        try:
            request = self._requests.get(timeout=0.25)
        except queue.Empty:
            request = None
        if request is not None:
            self._serve(request)
        self._serve_files()
        if self.live.probation is not None:
            self.live.watch_probation()
            return next_poll
        now = time.monotonic()
        if self._nudge_at is not None and now >= self._nudge_at:
            self._nudge_at = None
            self._serve(Request("check", {"trigger": "announce"}))
        elif now >= next_poll:
            next_poll = self._next_poll()
            self._serve(Request("check", {"trigger": "poll"}))
        return next_poll

    def _serve(self, request: Request) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "check": self.check,
            "activate": lambda _: self.activate_staged(),
            "rollback": lambda args: self.rollback(args.get("reason") or "requested by operator"),
            "pin": lambda args: self.pin(args.get("version")),
            "status": lambda _: self.status(),
        }
        try:
            handler = handlers.get(request.action)
            if handler is None:
                raise ManagerError(f"unknown action {request.action!r}")
            request.result = {"ok": True, **handler(request.args)}
        except (ManagerError, OtaError, StoreError) as exc:
            request.result = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug here must not kill the manager thread
            log.exception("model manager: %s failed", request.action)
            request.result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            request.done.set()

    def _serve_files(self) -> None:
        """Requests the CLI left in models/requests/ (see ``file_request``)."""
        for path in sorted(self.store.requests.glob("*.request.json")):
            try:
                data = json.loads(path.read_text())
                request = Request(str(data["action"]), dict(data.get("args") or {}))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                request = Request("invalid", {})
                request.result = {"ok": False, "error": f"unreadable request: {exc}"}
            else:
                self._serve(request)
            result_path = path.with_name(path.name.replace(".request.json", ".result.json"))
            write_atomic(result_path, json.dumps(request.result).encode())
            path.unlink(missing_ok=True)

    # -- what a request does -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        data = self.state.public()
        data["base"] = self.live.base.model_dump() if self.live.base else None
        data["target"] = self.target
        data["model_name"] = self.live.model_name
        data["channel"] = self.ota.channel_name
        data["progress"] = self.live.progress or None
        progress = self.live.probation_progress()
        if progress is not None:
            data["probation_progress"] = progress
        return data

    def check(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Look at the channel; download, stage and activate what is newer (or pinned)."""
        return self.flow.check(args)

    def activate_staged(self, staged: SlotRecord | None = None) -> dict[str, Any]:
        """Load and self-test the staged model beside the running one; then swap it in."""
        return self.flow.activate_staged(staged)

    def rollback(self, reason: str, reject: bool = True) -> dict[str, Any]:
        return self.live.rollback(reason, reject)

    def pin(self, version: str | None) -> dict[str, Any]:
        """Follow exactly ``version`` (None: follow the newest again), and check right away."""
        self.live.pin(version)
        return {"pinned": version, **self.check({"trigger": "pin"})}


def file_request(store_root: Path, action: str, args: dict[str, Any], timeout: float) -> dict:
    """From the CLI: hand a request to the running agent and wait for its answer."""
    requests = store_root / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    write_atomic(
        requests / f"{name}.request.json", json.dumps({"action": action, "args": args}).encode()
    )
    result = requests / f"{name}.result.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result.exists():
            data = json.loads(result.read_text())
            result.unlink(missing_ok=True)
            return data
        time.sleep(0.2)
    (requests / f"{name}.request.json").unlink(missing_ok=True)
    return {"ok": False, "error": f"the agent did not answer within {timeout:g} s"}
