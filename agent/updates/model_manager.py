"""The model manager: which model runs, and every change of it, one at a time.

On its own thread it checks the channel (on a jittered timer, an MQTT nudge, or a request),
downloads and stages a new model, loads it beside the running one, warms it up, runs the golden
self-test, swaps it in between two frames, watches its probation, and then commits it or rolls
back on its own and says why. Operator requests (rollback, pin) and the watchdog's
``previous_model`` rung go through the same locked state transitions.

Every transition is one atomic write of ``state.json`` (see model_store), and the loop never
waits: loading and testing happen on this thread while frames keep flowing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import failpoints, targets
from agent.config import AgentConfig
from agent.updates.descriptor import ModelDescriptor, parse
from agent.updates.model_store import (
    ModelStore,
    Probation,
    SlotRecord,
    StoreError,
    StoreState,
    write_atomic,
)
from agent.updates.ota import ChannelClient, Offer, OtaError
from agent.updates.probation import judge
from agent.updates.selftest import run_self_test
from agent.vision import Backend, ModelStats

log = logging.getLogger(__name__)

MAX_LOAD_ATTEMPTS = 2  # the agent died this often while loading a model: never again
MAX_INTERRUPTED_PROBATIONS = 2
RETIRE_AFTER_S = 5.0  # frames already in flight with a replaced model finish within this


class ManagerError(Exception):
    """A request that cannot be carried out (no previous model...); nothing changed."""


@dataclasses.dataclass
class Request:
    action: str
    args: dict[str, Any]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict[str, Any] | None = None


@dataclasses.dataclass
class ProbationRun:
    version: str
    backend: Backend
    previous_backend: Backend
    previous_stats: ModelStats
    started: float  # monotonic


def with_identity(backend: Backend, record: SlotRecord) -> Backend:
    """Name the loaded model after its channel release (the file's own metadata may lag)."""
    backend.info = dataclasses.replace(
        backend.info, model_name=record.name, model_version=record.version
    )
    return backend


def compatibility_problems(descriptor: ModelDescriptor, backend: Backend) -> list[str]:
    info = backend.info
    problems = []
    if (descriptor.input.height, descriptor.input.width) != info.imgsz:
        problems.append(
            f"descriptor input {descriptor.input.height}x{descriptor.input.width} "
            f"but the model takes {info.imgsz[0]}x{info.imgsz[1]}"
        )
    if dict(descriptor.class_names) != dict(info.class_names):
        problems.append(
            f"descriptor lists {len(descriptor.class_names)} classes that differ from the model's "
            f"{info.num_classes}"
        )
    return problems


class ModelManager:
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
        self.loader = loader
        self.store = store or ModelStore(config.state_dir / "models")
        self.client = ChannelClient(config.ota, self.store.root / "tuf", config.device_id)
        self.target = config.ota.target or targets.detect().target
        self.base: SlotRecord | None = None
        self.model_name: str | None = config.ota.model_name
        self._lock = threading.RLock()
        self._requests: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._nudge_at: float | None = None
        self._probation: ProbationRun | None = None
        self.progress: dict[str, Any] = {}
        # wired by the agent once the loop exists
        self.active_model: Callable[[], Backend] | None = None
        self.take_over: Callable[[Backend], None] | None = None
        self.stats_for: Callable[[Backend], ModelStats] | None = None
        self.on_change: Callable[[], None] = lambda: None

    @property
    def state(self) -> StoreState:
        return self.store.state

    def active_record(self) -> SlotRecord | None:
        return self.state.active or self.base

    # -- start-up --------------------------------------------------------------------------------
    def startup_backend(self, base_path: Path) -> Backend:
        """Recover from whatever a crash left, then load the best model that works.

        Order: the active slot, the previous slot, the base model from the config file. A model
        that cannot be loaded is rejected and the next one tried, so the agent always starts.
        """
        self.store.hold_running_lock()
        with self._lock, self.store.locked() as state:
            self._recover(state)
            self.store.save()
            self.store.drop_unreferenced()
        active = self.state.active
        candidates = [active, self.state.previous] if active is not None else []
        for position, record in enumerate(candidates):
            if record is None or record.slot is None:
                continue  # the base model: loaded below
            backend = self._load_at_start(record)
            if backend is not None:
                if position == 1:  # the active slot failed, the previous one works
                    self._fell_back_to_previous()
                if self.model_name is None:
                    self.model_name = record.name
                return backend
        backend = self.loader(base_path)
        info = backend.info
        self.base = SlotRecord(
            slot=None, path=str(base_path), name=info.model_name, version=info.model_version
        )
        if self.state.active is not None:  # every slot failed: the base model runs now
            with self._lock, self.store.locked() as state:
                state.active, state.previous = None, None
                self.store.save()
                self.store.drop_unreferenced()
        if self.model_name is None:
            self.model_name = info.model_name
        return backend

    def _recover(self, state: StoreState) -> None:
        if state.probation is not None and state.active is not None:
            version = state.probation.version
            count = state.interrupted.get(version, 0) + 1
            state.interrupted[version] = count
            interrupted = state.active
            state.active = state.previous if state.previous and state.previous.slot else None
            state.previous = None
            state.probation = None
            if count >= MAX_INTERRUPTED_PROBATIONS:
                state.rejected[version] = f"the agent stopped during its probation {count} times"
                outcome = "rejected"
            else:
                state.staged = interrupted  # tried again, through the self-test, once running
                outcome = "will be tried again"
            state.last_outcome = {"result": "probation_interrupted", "version": version}
            self.events.emit(
                "ota_probation_interrupted",
                f"the agent stopped while {interrupted.label()} was on probation: "
                f"started with the previous model; {interrupted.version} {outcome}",
                "warning",
                version=version,
                count=count,
            )
        staged = state.staged
        if staged is not None:
            problem = self.store.verify(staged)
            if staged.load_attempts >= MAX_LOAD_ATTEMPTS:
                problem = f"the agent stopped {staged.load_attempts} times while loading it"
                state.rejected[staged.version] = problem
            if problem is not None:
                state.staged = None
                self.events.emit(
                    "ota_rejected",
                    f"staged {staged.label()} dropped: {problem}",
                    "error",
                    version=staged.version,
                    check="staged_invalid",
                )

    def _load_at_start(self, record: SlotRecord) -> Backend | None:
        problem = self.store.verify(record)
        if problem is None and record.load_attempts >= MAX_LOAD_ATTEMPTS:
            problem = f"the agent stopped {record.load_attempts} times while loading it"
        if problem is None:
            self._update(lambda s: _count_load(s, record))
            try:
                backend = with_identity(self.loader(Path(record.path)), record)
            except Exception as exc:
                problem = f"cannot be loaded: {exc}"
            else:
                self._update(lambda s: _reset_loads(s, record))
                return backend
        self._update(lambda s: s.rejected.__setitem__(record.version, problem))
        self.events.emit(
            "ota_rejected",
            f"{record.label()} in slot {record.slot}: {problem}",
            "error",
            version=record.version,
            check="slot_invalid",
        )
        return None

    def _fell_back_to_previous(self) -> None:
        def fall_back(state: StoreState) -> None:
            state.active, state.previous = state.previous, None

        self._update(fall_back)
        self.store.drop_unreferenced()

    # -- wiring and lifecycle ----------------------------------------------------------------------
    def attach(
        self,
        active_model: Callable[[], Backend],
        take_over: Callable[[Backend], None],
        stats_for: Callable[[Backend], ModelStats],
        on_change: Callable[[], None],
    ) -> None:
        self.active_model, self.take_over = active_model, take_over
        self.stats_for, self.on_change = stats_for, on_change

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.store.release_running_lock()

    def nudge(self, max_delay_s: float | None = None) -> None:
        """Check soon: after a random 0..max_delay_s, so a fleet does not arrive at once."""
        spread = self.ota.announce_jitter_s if max_delay_s is None else max_delay_s
        at = time.monotonic() + random.uniform(0, spread)
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
        base = self.ota.first_check_s if first else self.ota.poll_interval_s
        jitter = random.uniform(-self.ota.poll_jitter, self.ota.poll_jitter)
        return time.monotonic() + max(0.0, base * (1 + jitter))

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
        if self._probation is not None:
            self._watch_probation()
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

    # -- state transitions -------------------------------------------------------------------------
    def _update(self, change: Callable[[StoreState], None]) -> None:
        with self._lock, self.store.locked() as state:
            change(state)
            self.store.save()

    def status(self) -> dict[str, Any]:
        data = self.state.public()
        data["base"] = self.base.model_dump() if self.base else None
        data["target"] = self.target
        data["model_name"] = self.model_name
        data["progress"] = self.progress or None
        if self._probation is not None and self.stats_for is not None:
            stats = self.stats_for(self._probation.backend)
            data["probation_progress"] = {
                **stats.as_dict(),
                "elapsed_s": round(time.monotonic() - self._probation.started, 1),
            }
        return data

    def _emit(self, kind: str, message: str, level: str = "info", **details: Any) -> None:
        self.events.emit(kind, message, level, **details)

    def _failed(self, exc: OtaError, version: str | None = None) -> dict[str, Any]:
        self._update(
            lambda s: setattr(
                s, "last_outcome", {"result": "failed", "kind": exc.kind, "reason": str(exc)}
            )
        )
        self._emit("ota_failed", str(exc), "error", check=exc.kind, version=version)
        self.progress = {}
        self.on_change()
        return {"updated": False, "error": str(exc), "kind": exc.kind}

    def check(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Look at the channel; download, stage and activate what is newer (or pinned)."""
        if self._probation is not None:
            return {"updated": False, "busy": f"{self._probation.version} is on probation"}
        state = self.state
        active = self.active_record()
        active_version = active.version if active else None
        try:
            offer = self.client.find(
                self.model_name or "", self.target, active_version, state.pinned, state.rejected
            )
        except OtaError as exc:
            return self._failed(exc)
        if offer is None or (state.pinned is not None and offer.version == active_version):
            self.progress = {}
            self._emit(
                "ota_up_to_date",
                f"channel checked: nothing newer than {active_version} for {self.target}",
                trigger=(args or {}).get("trigger", "request"),
            )
            return {"updated": False, "active": active_version}
        if state.previous is not None and state.previous.version == offer.version:
            return self.rollback(f"pinned to {offer.version}", reject=False)
        try:
            staged = self._download_and_stage(offer)
        except OtaError as exc:
            return self._failed(exc, offer.version)
        return self.activate_staged(staged)

    def _download_and_stage(self, offer: Offer) -> SlotRecord:
        info = offer.model_target
        sha256 = info.hashes["sha256"]
        partial = self.store.downloads / f"{sha256}.part"
        have = partial.stat().st_size if partial.exists() else 0
        need = (info.length - have) + info.length + self.ota.free_space_margin_bytes
        free = self.store.free_bytes()
        if free < need:
            raise OtaError(
                "disk",
                f"not enough disk space for {offer.version}: {need} bytes needed "
                f"(download, slot and margin), {free} free in {self.store.root}",
            )
        self.progress = {"version": offer.version, "stage": "downloading", "bytes": have}
        self._emit(
            "ota_download_started",
            f"downloading {offer.release.name} {offer.version} for {offer.target} "
            f"({info.length} bytes{', resuming at ' + str(have) if have else ''})",
            version=offer.version,
            length=info.length,
            resume_from=have,
        )
        fetcher = self.client.fetcher
        fetched_before, resumes_before = fetcher.bytes_received, fetcher.resumes
        started = time.monotonic()

        def progress(done: int) -> None:
            self.progress["bytes"] = done

        self.client.download(offer, partial, progress)
        fetched = fetcher.bytes_received - fetched_before
        self._emit(
            "ota_downloaded",
            f"{offer.version} downloaded and verified ({fetched} bytes fetched this time)",
            version=offer.version,
            length=info.length,
            bytes_fetched=fetched,
            resumed_from=have,
            reconnects=fetcher.resumes - resumes_before,
            seconds=round(time.monotonic() - started, 3),
        )
        self.progress["stage"] = "staging"
        record = SlotRecord(
            path="",
            name=offer.release.name,
            version=offer.version,
            sha256=sha256,
            length=info.length,
            target=offer.target,
        )
        suffix = Path(offer.descriptor.file.path).suffix or ".bin"
        try:
            with self._lock, self.store.locked():
                staged = self.store.stage(partial, f"model{suffix}", offer.descriptor_bytes, record)
        except StoreError as exc:
            raise OtaError("disk", str(exc)) from None
        partial.unlink(missing_ok=True)
        self._emit(
            "ota_staged", f"{offer.version} staged in slot {staged.slot}", version=offer.version
        )
        return staged

    def activate_staged(self, staged: SlotRecord | None = None) -> dict[str, Any]:
        """Load, warm up and self-test the staged model beside the running one; then swap."""
        staged = staged or self.state.staged
        if staged is None or staged.slot is None:
            raise ManagerError("nothing is staged")
        assert self.take_over is not None and self.active_model is not None
        assert self.stats_for is not None
        self._update(lambda s: _count_load(s, staged, staged=True))
        self.progress = {"version": staged.version, "stage": "loading"}
        try:
            descriptor = parse(
                ModelDescriptor,
                (Path(staged.path).parent / "descriptor.json").read_bytes(),
                "staged descriptor",
            )
            backend = with_identity(self.loader(Path(staged.path)), staged)
        except Exception as exc:
            return self._reject_staged(staged, "load_failed", f"failed to load or warm up: {exc}")
        problems = compatibility_problems(descriptor, backend)
        details: dict[str, Any] = {}
        if not problems:
            self.progress["stage"] = "self-test"
            result = run_self_test(backend, descriptor.golden, self.ota.self_test_min_recall)
            problems, details = result.reasons, result.details
        if problems:
            backend.close()
            return self._reject_staged(staged, "self_test_failed", "; ".join(problems), **details)

        previous_backend = self.active_model()
        with self._lock:
            self.take_over(backend)  # the next frame runs on the new model
            self._probation = ProbationRun(
                staged.version,
                backend,
                previous_backend,
                self.stats_for(previous_backend),
                time.monotonic(),
            )

            failpoints.reach("swap")  # swapped in memory, not yet on disk

            def promote(state: StoreState) -> None:
                state.previous = state.active or self.base
                state.active = staged.model_copy(update={"load_attempts": 0})
                state.staged = None
                state.probation = Probation(version=staged.version, started=time.time())

            self._update(promote)
        self.progress = {"version": staged.version, "stage": "probation"}
        self._emit(
            "ota_activated",
            f"{staged.label()} is live (probation: {self.ota.probation.frames} frames or "
            f"{self.ota.probation.seconds:g} s)",
            version=staged.version,
            previous=self.state.previous.version if self.state.previous else None,
        )
        self.on_change()
        return {"updated": True, "active": staged.version, "state": "probation"}

    def _reject_staged(
        self, staged: SlotRecord, kind: str, reason: str, **details: Any
    ) -> dict[str, Any]:
        def reject(state: StoreState) -> None:
            state.staged = None
            state.rejected[staged.version] = reason
            state.last_outcome = {
                "result": "rejected",
                "version": staged.version,
                "kind": kind,
                "reason": reason,
            }

        self._update(reject)
        self.store.drop_unreferenced()
        self.progress = {}
        self._emit(
            "ota_rejected",
            f"{staged.label()} never went live: {reason}",
            "error",
            version=staged.version,
            check=kind,
            **details,
        )
        self.on_change()
        return {"updated": False, "rejected": staged.version, "kind": kind, "reason": reason}

    def _watch_probation(self) -> None:
        run = self._probation
        assert run is not None and self.stats_for is not None
        verdict = judge(
            self.stats_for(run.backend),
            run.previous_stats,
            time.monotonic() - run.started,
            self.ota.probation,
        )
        if verdict.state == "pending":
            return
        if verdict.state == "fail":
            self._end_probation_with_rollback(
                "probation failed: " + "; ".join(verdict.reasons), verdict.figures
            )
            return

        def commit(state: StoreState) -> None:
            state.probation = None
            state.interrupted.pop(run.version, None)
            state.last_outcome = {
                "result": "committed",
                "version": run.version,
                "figures": verdict.figures,
            }

        with self._lock:
            self._update(commit)
            self._probation = None
        self.progress = {}
        retire(run.previous_backend, keep=self.active_model)
        self._emit(
            "ota_committed",
            f"{run.version} passed probation and is committed",
            version=run.version,
            figures=verdict.figures,
        )
        self.on_change()

    def _end_probation_with_rollback(
        self, reason: str, figures: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        run = self._probation
        assert run is not None and self.take_over is not None
        with self._lock:
            self.take_over(run.previous_backend)
            self._probation = None

            def roll_back(state: StoreState) -> None:
                state.rejected[run.version] = reason
                previous = state.previous
                state.active = previous if previous and previous.slot else None
                state.previous = None
                state.probation = None
                state.last_outcome = {
                    "result": "rolled_back",
                    "version": run.version,
                    "reason": reason,
                    "figures": figures,
                }

            self._update(roll_back)
            self.store.drop_unreferenced()
        retire(run.backend, keep=self.active_model)
        self.progress = {}
        back_to = self.active_record()
        self._emit(
            "ota_rolled_back",
            f"rolled back from {run.version} to {back_to.version if back_to else 'the base model'}:"
            f" {reason}",
            "error",
            version=run.version,
            reason=reason,
            figures=figures,
        )
        self.on_change()
        return {"rolled_back": run.version, "reason": reason}

    def rollback(self, reason: str, reject: bool = True) -> dict[str, Any]:
        """Go back to the previous model (probation or not); ``reject`` keeps the one left from
        coming back on the next poll."""
        if self._probation is not None:
            return self._end_probation_with_rollback(reason)
        previous = self.state.previous
        if previous is None:
            raise ManagerError("there is no previous model to roll back to")
        assert self.take_over is not None and self.active_model is not None
        problem = self.store.verify(previous) if previous.slot else None
        if problem is not None:
            raise ManagerError(f"the previous model {previous.label()} cannot be used: {problem}")
        try:
            backend = self.loader(Path(previous.path))
        except Exception as exc:
            message = f"the previous model {previous.label()} fails to load: {exc}"
            raise ManagerError(message) from None
        backend = with_identity(backend, previous)
        replaced = self.active_model()
        with self._lock:
            self.take_over(backend)
            current = self.active_record()
            self._update(lambda state: state.swap_to_previous(current, reason, reject))
        retire(replaced, keep=self.active_model)
        self._emit(
            "ota_rolled_back",
            f"now running {previous.label()}: {reason}",
            "warning",
            version=current.version if current else None,
            reason=reason,
        )
        self.on_change()
        return {"active": previous.version, "reason": reason}

    def pin(self, version: str | None) -> dict[str, Any]:
        """Follow exactly ``version`` (None: follow the newest again), and check right away."""
        self._update(lambda state: state.pin(version))
        self._emit("ota_pinned", f"pinned to {version}" if version else "pin cleared", pin=version)
        self.on_change()
        return {"pinned": version, **self.check({"trigger": "pin"})}


def _count_load(state: StoreState, record: SlotRecord, staged: bool = False) -> None:
    target = state.staged if staged else state.active
    if target is not None and target.slot == record.slot:
        target.load_attempts += 1


def _reset_loads(state: StoreState, record: SlotRecord) -> None:
    if state.active is not None and state.active.slot == record.slot:
        state.active.load_attempts = 0


def retire(backend: Backend, keep: Callable[[], Backend] | None = None) -> None:
    """Close a replaced model once frames already in flight with it have finished."""

    def close() -> None:
        if keep is None or keep() is not backend:
            backend.close()

    timer = threading.Timer(RETIRE_AFTER_S, close)
    timer.daemon = True
    timer.start()


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
