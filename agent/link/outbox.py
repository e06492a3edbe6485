"""A durable, bounded, ordered queue of MQTT messages on disk (sqlite in WAL mode).

The loop appends (a fraction of a millisecond); the publisher reads the oldest messages, sends
them and deletes each one only when the broker has acknowledged it. Messages survive broker
outages and agent restarts. When the queue is over its bounds the oldest messages go first, and
every message dropped that way is counted (persisted across restarts) and reported.

WAL with ``synchronous=NORMAL`` keeps the file consistent through crashes and power loss; a power
cut may lose the last few appends. ``submit`` (the loop's path) hands a message to a writer thread
that commits whatever has accumulated in one transaction: the loop pays microseconds instead of a
commit per frame, and a SIGKILL can lose only the last few milliseconds not yet committed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

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
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
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
        self._pending: deque[tuple[str, bytes, int, bool, float]] = deque()
        self._pending_cond = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_pending, name="outbox-writer", daemon=True
        )
        self._writer.start()

    # -- writing (the loop) -----------------------------------------------------------------
    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Append and commit now (after anything submitted before); returns the message id."""
        self.flush()
        return self._insert([(topic, payload, qos, retain, time.time())])

    def submit(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Append without waiting: the writer thread commits it within milliseconds, in order."""
        with self._pending_cond:
            self._pending.append((topic, payload, qos, retain, time.time()))
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
            self._insert(batch)
            with self._pending_cond:
                for _ in batch:
                    self._pending.popleft()
                self._pending_cond.notify_all()

    def _insert(self, rows: list[tuple[str, bytes, int, bool, float]]) -> int:
        with self._lock:
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
        """The broker has these: forget them (one transaction for the lot)."""
        if not message_ids:
            return
        marks = ",".join("?" * len(message_ids))
        with self._lock:
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages "
                f"WHERE id IN ({marks})",
                message_ids,
            ).fetchone()
            if count:
                self._db.execute(f"DELETE FROM messages WHERE id IN ({marks})", message_ids)
                self._count -= int(count)
                self._bytes -= int(size)

    def expire(self, now: float | None = None) -> int:
        """Drop messages older than ``max_age_s``; returns how many."""
        cutoff = (now or time.time()) - self.max_age_s
        with self._lock:
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
