"""Housekeeping on one slow thread: counters that become events, outbox expiry, telemetry, and
freed memory handed back to the system every few minutes (glibc keeps what a burst of buffering
freed, an outage's or a full disk's, and a device's RSS would only ever show its peak).

Counter watching runs with or without MQTT (events are logged either way); the outbox expiry
and the telemetry message need the link. The telemetry period is read each round, so a SIGHUP
that changes it takes effect at the next message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agent.link.events import CounterWatch, Events, Watched
from agent.link.session import Link
from agent.link.telemetry import Telemetry
from agent.threads import restarting
from agent.vision import Pipeline, release_freed_memory

EXPIRE_EVERY_S = 60.0
TRIM_EVERY_S = 300.0


class Housekeeper:
    def __init__(
        self,
        interval_s: Callable[[], float],
        events: Events,
        pipeline: Pipeline,
        link: Link | None,
        telemetry: Telemetry | None,
    ) -> None:
        self.interval_s, self.pipeline = interval_s, pipeline
        self.link, self.telemetry = link, telemetry
        self.counters = CounterWatch(events, self.watched)
        self._stop = threading.Event()
        run = restarting("telemetry", self._run, self._stop.is_set)
        self._thread = threading.Thread(target=run, name="telemetry", daemon=True)

    def watched(self) -> Watched:
        sources = [camera.source.stats for camera in self.pipeline.cameras]  # every camera's
        reconnects, stalls = sum(s.reconnects for s in sources), sum(s.stalls for s in sources)
        last_error = next((s.last_error for s in sources if s.last_error), None)
        watched: Watched = {
            "source_reconnects": (reconnects, "source lost, reconnecting", last_error),
            "source_stalls": (stalls, "source stalled", last_error),
            "pipeline_errors": (self.pipeline.stats.errors, "frames failed in the pipeline", None),
        }
        if self.link is not None:
            watched.update(self.link.watched())
        return watched

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        if self.telemetry is not None:
            self.telemetry.close()

    def _run(self) -> None:
        next_telemetry = time.monotonic() + self.interval_s()
        next_expiry = time.monotonic()
        next_trim = time.monotonic() + TRIM_EVERY_S
        self.counters.check()  # baseline
        while not self._stop.wait(min(1.0, self.interval_s())):
            self.counters.check()
            now = time.monotonic()
            if now >= next_trim:
                release_freed_memory()
                next_trim = now + TRIM_EVERY_S
            if self.link is None or self.telemetry is None:
                continue
            if now >= next_expiry:
                self.link.outbox.expire()
                next_expiry = now + EXPIRE_EVERY_S
            if now >= next_telemetry:
                next_telemetry = now + self.interval_s()
                self.link.publish_telemetry(self.telemetry.message(self.link.counters()))
