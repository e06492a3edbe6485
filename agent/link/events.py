"""Events: warnings and escalations, logged always and published on ``events`` once the link is up.

Counters that only ever grow (reconnects, drops, refusals, failed frames) become events when
they rise, so a fleet operator sees a fault once, with its count, instead of polling telemetry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.link.messages import event

log = logging.getLogger(__name__)

# kind -> (the counter's value now, what a rise means, the last error behind it)
Watched = dict[str, tuple[int, str, str | None]]


class Events:
    """Warnings and escalations: logged always, published on ``events`` when MQTT is on."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.publish: Any = None  # set by attach() once the link exists
        self.count = 0
        self._early: list[dict[str, Any]] = []  # emitted before the link existed (start-up)

    def attach(self, publish: Any) -> None:
        self.publish = publish
        for payload in self._early:
            publish(payload)
        self._early.clear()

    def emit(self, kind: str, message: str, level: str = "warning", **details: Any) -> None:
        self.count += 1
        getattr(log, "error" if level == "error" else "warning" if level == "warning" else "info")(
            "event %s: %s", kind, message
        )
        payload = event(kind, message, level, self.device_id, details)
        if self.publish is not None:
            self.publish(payload)
        elif len(self._early) < 100:
            self._early.append(payload)


class CounterWatch:
    """Turns rises of watched counters into events; the first reading is the baseline."""

    def __init__(self, events: Events, read: Callable[[], Watched]) -> None:
        self._events = events
        self._read = read
        self._last: dict[str, int] = {}

    def check(self) -> None:
        for kind, (value, message, detail) in self._read().items():
            before = self._last.get(kind)
            self._last[kind] = value
            if before is not None and value > before:
                self._events.emit(
                    kind,
                    f"{message} (+{value - before}, total {value})",
                    "warning",
                    total=value,
                    new=value - before,
                    last_error=detail,
                )
