"""The watchdog: stage heartbeats, the escalation ladder, the restart-loop guard, health.

Health is reported to systemd (WATCHDOG=1), to ``edge-agent health`` and on ``events``.

Every fault has an owner and a next step. The supervisor looks at the pipeline every
``check_interval_s``; a fault enters the ladder at the first step that can fix it (a silent source
at ``restart_source``, a hung or failing inference at ``reload_backend``, an MQTT connection that
stopped acknowledging at ``reconnect_link``, a hung pre/postprocess at ``exit``) and climbs one
step each time the previous one did not fix it within ``verify_s``. Each step is counted,
reported and bounded by the guard: past ``max_restarts`` per window the supervisor backs off for
``backoff_s`` and then climbs, instead of thrashing. The last step exits non-zero so
systemd restarts the process. While any fault stands, or an escalation has not yet been confirmed
by ``verify_s`` of health, WATCHDOG=1 pings stop: WatchdogSec must exceed the ladder's total time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import WatchdogConfig
from agent.contract.files import write_atomic
from agent.service.notify import Notifier

log = logging.getLogger(__name__)

ENTRY_STEP = {
    "source": "restart_source",
    "inference": "reload_backend",
    "output": "reload_backend",  # frames arrive, none reaches the sinks (all late or skipped)
    "link": "reconnect_link",  # connected, messages waiting, no acknowledgement
    "stage": "exit",
}


@dataclass(frozen=True)
class Fault:
    kind: str  # source | inference | output | stage
    reason: str


class RestartGuard:
    """At most ``limit`` events per ``window_s``; optionally remembered in a file (restarts)."""

    def __init__(
        self, limit: int, window_s: float, path: Path | None = None, clock=time.time
    ) -> None:
        self.limit, self.window_s, self.path, self._clock = limit, window_s, path, clock
        self._times: deque[float] = deque()
        if path is not None and path.is_file():
            try:
                self._times.extend(float(t) for t in json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable restart history %s", path)

    def _trim(self) -> None:
        cutoff = self._clock() - self.window_s
        while self._times and self._times[0] < cutoff:
            self._times.popleft()

    def allow(self) -> bool:
        self._trim()
        return len(self._times) < self.limit

    def record(self) -> None:
        self._times.append(self._clock())
        self._trim()
        if self.path is not None:
            write_atomic(self.path, json.dumps(list(self._times)).encode())

    @property
    def recent(self) -> int:
        self._trim()
        return len(self._times)


class Supervisor:
    """Watches the pipeline; runs the ladder; tells systemd and the health file how things are.

    ``actions`` maps ladder steps to callables returning a short description of what they did,
    or None when the step cannot apply here (e.g. no previous model): then the next step is tried.
    """

    def __init__(
        self,
        config: WatchdogConfig,
        pipeline: Any,
        actions: dict[str, Callable[[], str | None]],
        emit: Callable[..., None],
        notifier: Notifier,
        health_path: Path | None,
        status_text: Callable[[], str],
        stall_timeout_s: float,
        link_stall: Callable[[], float] | None = None,
    ) -> None:
        """``link_stall``: seconds MQTT messages have waited for an ack while connected."""
        self.config = config
        self.link_stall = link_stall
        self.pipeline = pipeline
        self.actions = actions
        self.emit = emit
        self.notifier = notifier
        self.health_path = health_path
        self.status_text = status_text
        self.source_stall_s = config.source_stall_s or 2 * stall_timeout_s
        self.guards = {
            step: RestartGuard(config.max_restarts, config.restart_window_s)
            for step in config.ladder
        }
        self.steps_taken: list[str] = []
        self.faults: list[Fault] = []
        self.ready_sent = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._rung: int | None = None  # position in the ladder of the fault being handled
        self._next_step_at = 0.0
        self._last_ping = 0.0
        self._last_health = 0.0
        self._last_status = 0.0
        self._progress = (time.monotonic(), 0)  # when frames_in last moved, and its value
        self._output = (time.monotonic(), 0)  # when frames_out last moved, and its value
        self._slow_since: float | None = None
        self.degraded: str | None = None  # why output runs below the camera's rate, if it does
        self.cancelled_at: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    # -- diagnosis --------------------------------------------------------------------------
    def diagnose(self, now: float) -> list[Fault]:
        faults: list[Fault] = []
        pipeline, config = self.pipeline, self.config
        busy = pipeline.busy_since
        started = busy.get("inference")
        if started is not None and now - started > config.inference_timeout_s:
            faults.append(
                Fault(
                    "inference",
                    f"inference busy for {now - started:.1f} s "
                    f"(limit {config.inference_timeout_s:g} s)",
                )
            )
        if pipeline.stats.inference_failures >= config.failure_streak:
            faults.append(
                Fault(
                    "inference", f"{pipeline.stats.inference_failures} inferences failed in a row"
                )
            )
        for stage in ("preprocess", "postprocess"):
            began = busy.get(stage)
            if began is not None and now - began > config.stage_timeout_s:
                faults.append(Fault("stage", f"{stage} busy for {now - began:.1f} s"))
        stats = pipeline.stats
        frames_in = stats.frames_in
        last_move, last_value = self._progress
        if frames_in != last_value:
            self._progress = (now, frames_in)
        elif pipeline.live and now - last_move > self.source_stall_s:
            faults.append(Fault("source", f"no frame for {now - last_move:.0f} s"))
        out_move, out_value = self._output
        if stats.frames_out != out_value:
            self._output = (now, stats.frames_out)
        elif (
            now - self._progress[0] <= self.source_stall_s and now - out_move > self.source_stall_s
        ):
            faults.append(
                Fault(
                    "output",
                    f"no frame reached the sinks for {now - out_move:.0f} s while frames "
                    f"arrive ({stats.dropped} dropped, {stats.late} late, {stats.errors} errors)",
                )
            )
        stalled = self.link_stall() if self.link_stall is not None else 0.0
        if stalled > config.link_stall_s:
            faults.append(
                Fault(
                    "link",
                    f"MQTT: no acknowledgement for {stalled:.0f} s while connected "
                    f"(limit {config.link_stall_s:g} s)",
                )
            )
        faults.extend(self._judge_rate(now))
        return faults

    def _judge_rate(self, now: float) -> list[Fault]:
        """Output far below the camera's nominal rate for ``fps_window_s``: when the camera
        itself delivers too few frames it is a source fault (a reconnect can help); when it
        delivers and this device cannot keep up, restarting would only lose more frames, so the
        agent says so once (``degraded``) and keeps going, newest frame first."""
        pipeline, config = self.pipeline, self.config
        nominal = pipeline.live_nominal_fps()
        fps = pipeline.stats.recent_fps(now, config.fps_window_s)
        floor = config.min_fps_ratio * (nominal or 0.0)
        if not (nominal and fps is not None and fps < floor):
            if self.degraded is not None:
                self.emit("degraded_ended", "keeping up with the camera again", "info")
                self.degraded = None
            self._slow_since = None
            return []
        self._slow_since = self._slow_since or now
        if now - self._slow_since <= config.fps_window_s:
            return []
        fps_in = pipeline.stats.recent_fps(now, config.fps_window_s, side="in") or 0.0
        if fps_in < floor:
            return [Fault("source", f"the camera delivers {fps_in:.1f} fps of its {nominal:.1f}")]
        if self.degraded is None:
            self.degraded = (
                f"processing {fps:.1f} fps of the camera's {fps_in:.1f} (nominal {nominal:.1f}): "
                "this device cannot keep up; the newest frame is taken, the others skipped"
            )
            self.emit("degraded", self.degraded, "warning", fps_out=round(fps, 2),
                      fps_in=round(fps_in, 2), nominal_fps=nominal)  # fmt: skip
        return []

    # -- the ladder -------------------------------------------------------------------------
    def _escalate(self, faults: list[Fault], now: float) -> None:
        if now < self._next_step_at:
            return
        ladder = self.config.ladder
        if self._rung is None:
            entry = min(
                (ladder.index(ENTRY_STEP[f.kind]) for f in faults if ENTRY_STEP[f.kind] in ladder),
                default=len(ladder) - 1,
            )
            self._rung = entry
        else:
            self._rung = min(self._rung + 1, len(ladder) - 1)
        step = ladder[self._rung]
        if step == "exit" and "exit" in self.steps_taken:
            return  # already on the way out
        reason = "; ".join(f.reason for f in faults)
        guard = self.guards[step]
        if step != "exit" and not guard.allow():
            self.emit(
                "escalation_guarded",
                f"{step} already ran {guard.recent} time(s) in "
                f"{self.config.restart_window_s:g} s; backing off {self.config.backoff_s:g} s",
                "warning",
                step=step,
                reason=reason,
            )
            self._next_step_at = now + self.config.backoff_s
            return
        outcome = self.actions[step]()
        if outcome is not None:  # a step that could not apply here is not a step taken
            guard.record()
            self.steps_taken.append(step)
        if outcome is None:
            self.emit(
                "escalation",
                f"{step} not possible here; trying the next step",
                "warning",
                step=step,
                reason=reason,
                applied=False,
            )
            self._next_step_at = now
            return
        self.emit(
            "escalation",
            f"{step}: {outcome} (because {reason})",
            "error" if step == "exit" else "warning",
            step=step,
            reason=reason,
            applied=True,
            attempt=guard.recent,
        )
        self._next_step_at = now + self.config.verify_s
        self._progress = (now, self.pipeline.stats.frames_in)  # give the step a fair chance
        self._output = (now, self.pipeline.stats.frames_out)

    def _cancel_hung_inference(self, now: float) -> bool:
        """Cancel a hung run first (ORT can); True while that cancel is still in its grace."""
        started = self.pipeline.busy_since.get("inference")
        if started is None or now - started <= self.config.inference_timeout_s:
            self.cancelled_at = None
            return False
        model = self.pipeline.model()
        cancel = getattr(model, "cancel", None)
        if self.cancelled_at is None and cancel is not None:
            cancel()
            self.cancelled_at = now
            self.emit(
                "inference_cancelled",
                "an inference ran past its deadline and was cancelled",
                "warning",
                busy_s=round(now - started, 2),
            )
        return (
            self.cancelled_at is not None and now - self.cancelled_at < self.config.cancel_grace_s
        )

    # -- the loop ---------------------------------------------------------------------------
    def check(self, now: float | None = None) -> list[Fault]:
        now = time.monotonic() if now is None else now
        in_grace = self._cancel_hung_inference(now)
        faults = self.diagnose(now)
        self.faults = faults
        if faults and not in_grace:
            taken = len(self.steps_taken)
            self._escalate(faults, now)
            if len(self.steps_taken) != taken:
                self._last_health = 0.0  # operators should see the step at once
        elif not faults and self._rung is not None and now >= self._next_step_at:
            self.emit(
                "recovered",
                f"healthy again after {self.steps_taken[-1] if self.steps_taken else 'waiting'}",
                "info",
            )
            self._rung = None
        if not self.ready_sent and self.pipeline.stats.frames_out > 0:
            self.ready_sent = True
            self.notifier.ready(self.status_text())
        interval = self.notifier.watchdog_interval_s
        settled = not faults and self._rung is None  # no fault, and no escalation still unconfirmed
        if interval and settled and self.ready_sent and now - self._last_ping >= interval:
            self.notifier.watchdog()
            self._last_ping = now
        if now - self._last_status >= 5.0:
            self.notifier.status(
                self.status_text() + (f" | FAULT: {faults[0].reason}" if faults else "")
            )
            self._last_status = now
        if (
            self.health_path is not None
            and now - self._last_health >= self.config.health_file_interval_s
        ):
            self.write_health(faults)
            self._last_health = now
        return faults

    def write_health(self, faults: list[Fault]) -> None:
        now = time.monotonic()
        record = {
            "pid": os.getpid(),
            "timestamp": time.time(),
            "healthy": not faults and self._rung is None and self.ready_sent,
            "ready": self.ready_sent,
            "faults": [f.reason for f in faults],
            "status": self.status_text(),
            "stages_busy_s": {
                stage: None if began is None else round(now - began, 2)
                for stage, began in self.pipeline.busy_since.items()
            },
            "escalations": list(self.steps_taken),
            "degraded": self.degraded,
        }
        write_atomic(self.health_path, json.dumps(record).encode())

    def _run(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                self.check()
            except Exception:  # the watchdog itself must never die silently
                log.exception("watchdog check failed")
