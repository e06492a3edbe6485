"""The live model's lifecycle: swap-in on probation, commit, rollback, pins.

Every transition here is one locked, atomic write of ``state.json`` (see model_store) next to one
swap of the reference the loop reads between two frames, so a crash at any point leaves a state the
next start can recover from. The update flow hands this class a model that already passed its
self-test; the model manager's thread makes every call, so transitions never interleave.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import failpoints
from agent.config import OtaConfig
from agent.updates.model_store import ModelStore, Probation, SlotRecord, StoreState
from agent.updates.probation import PairedEvidence, judge
from agent.vision import Backend, ModelStats, Shadow, release_freed_memory

RETIRE_AFTER_S = 5.0  # frames already in flight with a replaced model finish within this


class ManagerError(Exception):
    """A request that cannot be carried out (no previous model...); nothing changed."""


@dataclasses.dataclass
class ProbationRun:
    version: str
    backend: Backend
    previous_backend: Backend
    previous_stats: ModelStats
    started: float  # monotonic
    evidence: PairedEvidence = dataclasses.field(default_factory=PairedEvidence)


def with_identity(backend: Backend, record: SlotRecord) -> Backend:
    """Name the loaded model after its channel release (the file's own metadata may lag)."""
    backend.info = dataclasses.replace(
        backend.info, model_name=record.name, model_version=record.version
    )
    return backend


class LiveModel:
    """Which model runs, which one it replaced, and whether the new one has proven itself."""

    def __init__(
        self,
        ota: OtaConfig,
        store: ModelStore,
        events: Any,
        loader: Callable[[Path], Backend],
    ) -> None:
        self.ota = ota
        self.store = store
        self.events = events
        self.loader = loader
        self.base: SlotRecord | None = None
        self.model_name: str | None = ota.model_name
        self.progress: dict[str, Any] = {}
        self.lock = threading.RLock()
        self.probation: ProbationRun | None = None
        # wired by the agent once the loop exists (ModelManager.attach)
        self.active_model: Callable[[], Backend] | None = None
        self.take_over: Callable[[Backend], None] | None = None
        self.stats_for: Callable[[Backend], ModelStats] | None = None
        self.set_shadow: Callable[[Shadow | None], None] = lambda shadow: None
        self.on_change: Callable[[], None] = lambda: None

    @property
    def state(self) -> StoreState:
        return self.store.state

    def active_record(self) -> SlotRecord | None:
        return self.state.active or self.base

    def update(self, change: Callable[[StoreState], None]) -> None:
        """Apply one change to the state and write it, under the lock."""
        with self.lock, self.store.locked() as state:
            change(state)
            self.store.save()

    def emit(self, kind: str, message: str, level: str = "info", **details: Any) -> None:
        self.events.emit(kind, message, level, **details)

    def probation_progress(self) -> dict[str, Any] | None:
        """The new model's figures so far, while it is on probation."""
        if self.probation is None or self.stats_for is None:
            return None
        stats = self.stats_for(self.probation.backend)
        return {
            **stats.as_dict(),
            "elapsed_s": round(time.monotonic() - self.probation.started, 1),
        }

    # -- transitions -----------------------------------------------------------------------------
    def go_live(self, staged: SlotRecord, backend: Backend) -> dict[str, Any]:
        """Swap a self-tested model in between two frames and start its probation."""
        assert self.take_over is not None and self.active_model is not None
        assert self.stats_for is not None
        previous_backend = self.active_model()
        with self.lock:
            limits = self.ota.probation
            evidence = PairedEvidence(warmup=limits.warmup_frames)
            self.take_over(backend)  # the next frame runs on the new model
            self.set_shadow(Shadow(previous_backend, evidence.add, limits.pair_every))
            self.probation = ProbationRun(
                staged.version,
                backend,
                previous_backend,
                self.stats_for(previous_backend),
                time.monotonic(),
                evidence,
            )

            failpoints.reach("swap")  # swapped in memory, not yet on disk

            def promote(state: StoreState) -> None:
                state.previous = state.active or self.base
                state.active = staged.model_copy(update={"load_attempts": 0})
                state.staged = None
                state.probation = Probation(version=staged.version, started=time.time())

            self.update(promote)
        self.progress = {"version": staged.version, "stage": "probation"}
        self.emit(
            "ota_activated",
            f"{staged.label()} is live (probation: {self.ota.probation.frames} frames or "
            f"{self.ota.probation.seconds:g} s)",
            version=staged.version,
            previous=self.state.previous.version if self.state.previous else None,
        )
        self.on_change()
        return {"updated": True, "active": staged.version, "state": "probation"}

    def watch_probation(self) -> None:
        run = self.probation
        assert run is not None and self.stats_for is not None
        verdict = judge(
            self.stats_for(run.backend),
            run.previous_stats,
            time.monotonic() - run.started,
            self.ota.probation,
            run.evidence,
        )
        if verdict.state == "pending":
            return
        if verdict.state == "inconclusive":  # not enough evidence: never a reason to reject
            reason = "probation postponed: " + "; ".join(verdict.reasons)
            self._end_probation_with_rollback(reason, verdict.figures, reject=False, count=False)
            return
        if verdict.state == "fail":
            reason = "probation failed: " + "; ".join(verdict.reasons)
            tried = self.state.soft_failures.get(run.version, 0)
            final = verdict.hard or tried >= self.ota.probation.retries
            self._end_probation_with_rollback(reason, verdict.figures, reject=final)
            return

        def commit(state: StoreState) -> None:
            state.probation = None
            state.interrupted.pop(run.version, None)
            state.last_outcome = {
                "result": "committed",
                "version": run.version,
                "figures": verdict.figures,
            }

        with self.lock:
            self.set_shadow(None)
            self.update(commit)
            self.probation = None
        self.progress = {}
        retire(run.previous_backend, keep=self.active_model)
        self.emit(
            "ota_committed",
            f"{run.version} passed probation and is committed",
            version=run.version,
            figures=verdict.figures,
        )
        self.on_change()

    def _end_probation_with_rollback(
        self,
        reason: str,
        figures: dict[str, Any] | None = None,
        reject: bool = True,
        count: bool = True,
    ) -> dict[str, Any]:
        """Back to the previous model. ``reject``: the version never comes back; else (a soft
        failure, the first time) it is offered again at a later check, and the outcome says
        ``postponed``, which the fleet's rollout counts as unknown, not failed."""
        run = self.probation
        assert run is not None and self.take_over is not None
        with self.lock:
            self.set_shadow(None)
            self.take_over(run.previous_backend)
            self.probation = None

            def roll_back(state: StoreState) -> None:
                if reject:
                    state.rejected[run.version] = reason
                    state.soft_failures.pop(run.version, None)
                elif count:
                    state.soft_failures[run.version] = state.soft_failures.get(run.version, 0) + 1
                previous = state.previous
                state.active = previous if previous and previous.slot else None
                state.previous = None
                state.probation = None
                state.last_outcome = {
                    "result": "rolled_back" if reject else "postponed",
                    "version": run.version,
                    "reason": reason,
                    "figures": figures,
                }

            self.update(roll_back)
            self.store.drop_unreferenced()
        retire(run.backend, keep=self.active_model)
        self.progress = {}
        back_to = self.active_record()
        later = "" if reject else " (not rejected: it is tried again at a later check)"
        self.emit(
            "ota_rolled_back",
            f"rolled back from {run.version} to {back_to.version if back_to else 'the base model'}:"
            f" {reason}{later}",
            "error" if reject else "warning",
            version=run.version,
            reason=reason,
            figures=figures,
            rejected=reject,
        )
        self.on_change()
        return {"rolled_back": run.version, "reason": reason}

    def rollback(self, reason: str, reject: bool = True) -> dict[str, Any]:
        """Go back to the previous model (probation or not); ``reject`` keeps the one left from
        coming back on the next poll."""
        if self.probation is not None:
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
        with self.lock:
            self.take_over(backend)
            current = self.active_record()
            self.update(lambda state: state.swap_to_previous(current, reason, reject))
        retire(replaced, keep=self.active_model)
        self.emit(
            "ota_rolled_back",
            f"now running {previous.label()}: {reason}",
            "warning",
            version=current.version if current else None,
            reason=reason,
        )
        self.on_change()
        return {"active": previous.version, "reason": reason}

    def pin(self, version: str | None) -> None:
        """Follow exactly ``version`` (None: follow the newest again)."""
        self.update(lambda state: state.pin(version))
        self.emit("ota_pinned", f"pinned to {version}" if version else "pin cleared", pin=version)
        self.on_change()


def retire(backend: Backend, keep: Callable[[], Backend] | None = None) -> None:
    """Close a replaced model once frames already in flight with it have finished."""

    def close() -> None:
        if keep is None or keep() is not backend:
            backend.close()
            release_freed_memory()

    timer = threading.Timer(RETIRE_AFTER_S, close)
    timer.daemon = True
    timer.start()
