"""Model slots on disk and the one state file that says which slot is which.

Layout under ``<state_dir>/models``::

    state.json          active / previous / staged slot, probation, pin, rejected versions
    slots/<a|b|c>/      model file + descriptor.json, written completely before state names it
    downloads/          partial downloads, named by the target's hash, kept across restarts
    requests/           operator requests from the CLI to the running agent

``state.json`` changes only by writing a temp file, fsync, rename, fsync of the folder, so a
SIGKILL or power cut at any moment leaves either the old or the new state, never a mix. A slot
is filled and synced before the state names it, and a slot the state does not name is garbage,
so ``recover()`` at start-up can always tell what is real. The model named by the config file is
the base: it has no slot and is the last resort.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import failpoints
from agent.contract.errors import AgentError
from agent.contract.files import fsync_dir, write_atomic
from agent.vision import file_digest

log = logging.getLogger(__name__)

SLOT_NAMES = ("a", "b", "c")  # active, previous and one being staged
STATE_SCHEMA = "edge-agent/model-state/v1"


class StoreError(AgentError):
    """The store could not do what was asked (disk full, slot missing); nothing changed."""


class SlotRecord(BaseModel):
    """One model the device has: where it is, what it is, and where it came from."""

    model_config = ConfigDict(extra="ignore")
    slot: str | None = None  # None: the base model from the config file
    path: str
    name: str
    version: str
    sha256: str | None = None
    length: int | None = None
    target: str | None = None
    load_attempts: int = 0  # counted before each load: a crash while loading shows up here

    def label(self) -> str:
        return f"{self.name} {self.version}"


class Probation(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: str
    started: float  # wall clock, for people; the manager times probation with monotonic
    interrupted: int = 0


class StoreState(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_id: str = Field(STATE_SCHEMA, alias="schema")
    active: SlotRecord | None = None
    previous: SlotRecord | None = None
    staged: SlotRecord | None = None
    probation: Probation | None = None
    pinned: str | None = None
    rejected: dict[str, str] = Field(default_factory=dict)  # version -> why
    interrupted: dict[str, int] = Field(default_factory=dict)  # version -> probations cut short
    soft_failures: dict[str, int] = Field(default_factory=dict)  # version -> probations postponed
    last_outcome: dict[str, Any] | None = None
    updated: float = 0.0

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    # transitions shared by the running agent and the CLI (which edits a stopped agent's state)
    def pin(self, version: str | None) -> None:
        """Follow exactly ``version`` (None: the newest); a pin overrides an earlier rejection."""
        self.pinned = version
        if version is not None:
            self.rejected.pop(version, None)

    def count_load(self, record: SlotRecord, staged: bool = False) -> None:
        """One more attempt at loading ``record`` (a start that dies here is counted)."""
        target = self.staged if staged else self.active
        if target is not None and target.slot == record.slot:
            target.load_attempts += 1

    def reset_loads(self, record: SlotRecord) -> None:
        if self.active is not None and self.active.slot == record.slot:
            self.active.load_attempts = 0

    def swap_to_previous(self, current: SlotRecord | None, reason: str, reject: bool) -> None:
        """The previous model becomes active, ``current`` becomes previous; ``reject`` keeps
        ``current`` from being installed again by the next check."""
        previous = self.previous
        assert previous is not None
        self.active = previous if previous.slot else None
        self.previous = current
        self.probation = None
        if reject and current is not None:
            self.rejected[current.version] = reason
        self.rejected.pop(previous.version, None)
        self.last_outcome = {
            "result": "rolled_back",
            "version": current.version if current else None,
            "reason": reason,
        }


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots = root / "slots"
        self.downloads = root / "downloads"
        self.requests = root / "requests"
        self.state_path = root / "state.json"
        for folder in (self.root, self.slots, self.downloads, self.requests):
            folder.mkdir(parents=True, exist_ok=True)
        self.state = self._read()

    # -- state -----------------------------------------------------------------------------------
    def _read(self) -> StoreState:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return StoreState()
        try:
            return StoreState.model_validate_json(raw)
        except ValidationError as exc:
            # cannot happen through write_atomic; keep the evidence and start from the base model
            broken = self.state_path.with_suffix(f".broken-{int(time.time())}")
            os.replace(self.state_path, broken)
            log.error("model state %s unreadable (%s); moved to %s", self.state_path, exc, broken)
            return StoreState()

    def save(self) -> None:
        self.state.updated = round(time.time(), 3)
        write_atomic(self.state_path, self.state.model_dump_json(by_alias=True, indent=1).encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[StoreState]:
        """Exclusive access across processes (agent and CLI); re-reads the file first."""
        with (self.root / "state.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.state = self._read()
                yield self.state
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- who is running ------------------------------------------------------------------------
    def hold_running_lock(self) -> None:
        """Held for the agent's lifetime; the kernel lets go when the process dies, however."""
        self._running = (self.root / "agent.lock").open("a")
        try:
            fcntl.flock(self._running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._running.close()
            raise StoreError(f"another agent already uses {self.root}") from None

    def release_running_lock(self) -> None:
        running = getattr(self, "_running", None)
        if running is not None:
            running.close()
            self._running = None

    def agent_running(self) -> bool:
        with (self.root / "agent.lock").open("a") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False

    # -- slots -----------------------------------------------------------------------------------
    # -- edits of a stopped agent's state (``edge-agent model rollback / pin``) ---------------
    def roll_back(self, reason: str) -> SlotRecord:
        """Make the previous model active (the current one rejected), for the next start;
        returns the model rolled back to.

        Raises:
            StoreError: there is no previous model.
        """
        with self.locked() as state:
            if state.previous is None:
                raise StoreError("there is no previous model to roll back to")
            previous = state.previous
            state.swap_to_previous(state.active, reason, True)
            self.save()
        return previous

    def set_pin(self, version: str | None) -> None:
        """Follow exactly ``version`` from the next start (None: follow the newest again)."""
        with self.locked() as state:
            state.pin(version)
            self.save()

    def free_slot(self) -> str:
        used = {r.slot for r in (self.state.active, self.state.previous, self.state.staged) if r}
        return next(name for name in SLOT_NAMES if name not in used)

    def stage(
        self, download: Path, filename: str, descriptor: bytes, record: SlotRecord
    ) -> SlotRecord:
        """Copy a verified download into a free slot, synced, then name it in the state.

        Raises:
            StoreError: the copy failed (disk full...); the slot is removed, the state unchanged.
        """
        slot = self.free_slot()
        folder = self.slots / slot
        shutil.rmtree(folder, ignore_errors=True)
        target = folder / filename
        try:
            folder.mkdir(parents=True)
            with download.open("rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
                failpoints.reach("staging")
                dst.flush()
                os.fsync(dst.fileno())
            write_atomic(folder / "descriptor.json", descriptor)
            fsync_dir(folder)
            fsync_dir(self.slots)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise StoreError(f"cannot stage into slot {slot}: {exc.strerror or exc}") from None
        staged = record.model_copy(update={"slot": slot, "path": str(target), "load_attempts": 0})
        self.state.staged = staged
        self.save()
        return staged

    def verify(self, record: SlotRecord) -> str | None:
        """Why the record's file cannot be used, or None when it is intact."""
        path = Path(record.path)
        if not path.is_file():
            return f"{path} is missing"
        if record.length is not None and path.stat().st_size != record.length:
            return f"{path} has {path.stat().st_size} bytes, expected {record.length}"
        if record.sha256 is not None and file_digest(path) != record.sha256:
            return f"{path} does not match its sha256"
        return None

    def drop_unreferenced(self) -> None:
        used = {r.slot for r in (self.state.active, self.state.previous, self.state.staged) if r}
        for folder in self.slots.iterdir():
            if folder.name not in used:
                shutil.rmtree(folder, ignore_errors=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
