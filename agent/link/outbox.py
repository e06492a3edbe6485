"""A durable, bounded, ordered queue of MQTT messages on disk (sqlite in WAL mode).

The loop appends (a fraction of a millisecond); the publisher reads the oldest messages, sends
them and deletes each one only when the broker has acknowledged it. Messages survive broker
outages and agent restarts. When the queue is over its bounds the oldest messages go first, and
every message dropped that way is counted (persisted across restarts) and reported.

WAL with ``synchronous=NORMAL`` keeps the file consistent through crashes and power loss; a power
cut may lose the last few appends. ``submit`` (the loop's path) hands a message to a writer thread
that commits whatever has accumulated in one transaction: the loop pays microseconds instead of a
commit per frame, and a SIGKILL can lose only the last few milliseconds not yet committed.

A full disk (or any failing write) never stops the loop or kills the writer: messages wait in
memory, the oldest dropped beyond ``max_memory_bytes`` and counted (``dropped_unwritten``), the
write is retried every ``retry_s`` and resumes by itself when space returns; ``write_error``
says what failed meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Row = tuple[str, bytes, int, bool, float]  # topic, payload, qos, retain, created

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Outbox:
    def __init__(
        self,
        path: Path,
        max_messages: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        max_age_s: float = 7 * 24 * 3600.0,
        max_memory_bytes: int = 16 * 1024 * 1024,
        retry_s: float = 1.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_memory_bytes = max_memory_bytes
        self.retry_s = retry_s
        self.write_error: str | None = None  # the failing write, while it fails
        self.write_failures = 0
        self.dropped_unwritten = 0  # over max_memory_bytes while writes failed: oldest dropped
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        self._last_id = int(
            self._db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
        )
        self._added = threading.Condition(self._lock)
        self._pending: deque[tuple[int, Row]] = deque()  # (sequence, row), oldest first
        self._pending_bytes = 0
        self._sequence = 0
        self._writing_upto = 0  # the writer's batch: not dropped from memory under its feet
        self._unacked: set[int] = set()  # acks whose delete failed: retried with the next
        self._pending_cond = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_pending, name="outbox-writer", daemon=True
        )
        self._writer.start()

    # -- writing (the loop) -----------------------------------------------------------------
    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Append and commit now (after anything submitted before); returns the message id, or
        0 when the write failed and the message waits in memory for the writer's next try."""
        row = (topic, payload, qos, retain, time.time())
        if self.flush(timeout=0 if self.write_error else 10.0):
            try:
                return self._insert([row])
            except sqlite3.Error as exc:
                self._write_failed(exc)
        self._enqueue(row)
        return 0

    def submit(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Append without waiting: the writer thread commits it within milliseconds, in order."""
        self._enqueue((topic, payload, qos, retain, time.time()))

    def _enqueue(self, row: Row) -> None:
        with self._pending_cond:
            self._sequence += 1
            self._pending.append((self._sequence, row))
            self._pending_bytes += len(row[1])
            while (
                self._pending_bytes > self.max_memory_bytes
                and len(self._pending) > 1
                and self._pending[0][0] > self._writing_upto
            ):
                _, dropped = self._pending.popleft()
                self._pending_bytes -= len(dropped[1])
                self.dropped_unwritten += 1
            self._pending_cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted is committed."""
        with self._pending_cond:
            return self._pending_cond.wait_for(lambda: not self._pending, timeout)

    def _write_pending(self) -> None:
        while True:
            with self._pending_cond:
                self._pending_cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending and self._closed:
                    return
                batch = list(self._pending)
                self._writing_upto = batch[-1][0]
            try:
                self._insert([row for _, row in batch])
            except sqlite3.Error as exc:
                self._write_failed(exc)
                with self._pending_cond:
                    self._writing_upto = 0
                    if self._closed:  # nowhere to keep them: said, not silently lost
                        log.error("outbox: %d message(s) not written at close: %s",
                                  len(self._pending), self.write_error)  # fmt: skip
                        return
                    self._pending_cond.wait(self.retry_s)  # close() wakes it
                continue
            if self.write_error is not None:
                log.warning("outbox: writing again after %d failure(s) (%s); %d message(s) "
                            "dropped meanwhile", self.write_failures, self.write_error,
                            self.dropped_unwritten)  # fmt: skip
                self.write_error = None
            with self._pending_cond:
                while self._pending and self._pending[0][0] <= batch[-1][0]:
                    _, row = self._pending.popleft()
                    self._pending_bytes -= len(row[1])
                self._writing_upto = 0
                self._pending_cond.notify_all()

    def _write_failed(self, exc: sqlite3.Error) -> None:
        if self.write_error is None:
            log.error("outbox: cannot write %s (%s); keeping messages in memory (up to %d "
                      "bytes) and retrying", self.path, exc, self.max_memory_bytes)  # fmt: skip
        self.write_failures += 1
        self.write_error = f"{type(exc).__name__}: {exc}"

    def _insert(self, rows: list[Row]) -> int:
        with self._lock:
            count, size = self._count, self._bytes
            try:
                self._db.execute("BEGIN")
                for topic, payload, qos, retain, created in rows:
                    cursor = self._db.execute(
                        "INSERT INTO messages (topic, payload, qos, retain, created) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (topic, payload, qos, int(retain), created),
                    )
                    self._count += 1
                    self._bytes += len(payload)
                if self._count > self.max_messages or self._bytes > self.max_bytes:
                    self._drop_oldest_locked()
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._count, self._bytes = count, size
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._last_id = int(cursor.lastrowid)
            self._added.notify_all()
            return self._last_id

    def _drop_oldest_locked(self) -> None:
        dropped = 0
        while self._count > self.max_messages or self._bytes > self.max_bytes:
            excess = max(self._count - self.max_messages, 1)
            rows = self._db.execute(
                "SELECT id, LENGTH(payload) FROM messages ORDER BY id LIMIT ?", (excess,)
            ).fetchall()
            if not rows:
                break
            self._db.execute("DELETE FROM messages WHERE id <= ?", (rows[-1][0],))
            self._count -= len(rows)
            self._bytes -= sum(size for _, size in rows)
            dropped += len(rows)
        self._bump_locked("dropped_overflow", dropped)

    # -- reading (the publisher) --------------------------------------------------------------
    def wait_newer(self, after_id: int, timeout: float) -> bool:
        """Block until a message with an id above ``after_id`` arrives (or ``timeout``)."""
        with self._added:
            return self._added.wait_for(lambda: self._last_id > after_id, timeout)

    def peek(self, after_id: int = 0, limit: int = 100) -> list[Message]:
        """The oldest messages with an id above ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, created FROM messages WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def ack(self, *message_ids: int) -> None:
        """The broker has these: forget them (one transaction for the lot). A delete that
        fails (a full disk) is retried with the next ack; until then a restart would send those
        messages again (at least once, never lost)."""
        ids = tuple(self._unacked.union(message_ids))
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self._lock:
            try:
                count, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages "
                    f"WHERE id IN ({marks})",
                    ids,
                ).fetchone()
                if count:
                    self._db.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)
                    self._count -= int(count)
                    self._bytes -= int(size)
            except sqlite3.Error as exc:
                self._unacked.update(ids)
                log.warning("outbox: cannot delete %d acknowledged message(s): %s", len(ids), exc)
                return
            self._unacked.clear()

    def expire(self, now: float | None = None) -> int:
        """Drop messages older than ``max_age_s``; returns how many."""
        cutoff = (now or time.time()) - self.max_age_s
        with self._lock, _logged_sqlite_errors("expire old messages"):
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages "
                "WHERE created < ?",
                (cutoff,),
            ).fetchone()
            if count:
                self._db.execute("DELETE FROM messages WHERE created < ?", (cutoff,))
                self._count -= int(count)
                self._bytes -= int(size)
                self._bump_locked("dropped_expired", int(count))
            return int(count)
        return 0

    # -- accounting -----------------------------------------------------------------------
    def _bump_locked(self, name: str, n: int) -> None:
        if n:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )

    def counters(self) -> dict[str, int]:
        with self._lock:
            rows = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            return {
                "depth": self._count,
                "bytes": self._bytes,
                "dropped_overflow": int(rows.get("dropped_overflow", 0)),
                "dropped_expired": int(rows.get("dropped_expired", 0)),
                "dropped_unwritten": self.dropped_unwritten,
                "unwritten": len(self._pending),
                "write_failures": self.write_failures,
            }

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Commit what was submitted, then close the database."""
        with self._pending_cond:
            self._closed = True
            self._pending_cond.notify_all()
        self._writer.join(timeout=10.0)
        with self._lock:
            self._db.close()


@contextlib.contextmanager
def _logged_sqlite_errors(what: str):
    """Housekeeping that can wait for the next round: a failure is logged, not raised."""
    try:
        yield
    except sqlite3.Error as exc:
        log.warning("outbox: cannot %s: %s", what, exc)
