"""Several inferences at once on the one model, with frames leaving in the order they came.

On a CPU, two runs of one ONNX Runtime session side by side, one thread each, do more frames per
second than one run after another with two threads (intra-op threads wait on each other at every
layer): 1.25x on a 2-core EPYC (benchmarks/multicam.py). With several cameras the loop therefore
runs a few inference workers on the same loaded model (no copy of its weights), each run given
its share of the cores. A worker can finish after one that started later; postprocess must still
see every camera's frames in order (the tracker relies on it), so frames leave inference in the
order they were taken from the queue, whatever the order they finish in.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_AUTO_WORKERS = 4  # beyond this, more runs at once only share the same cores finer


def usable_cores() -> int:
    """The cores this process may run on (its affinity, a container's cpuset), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def inference_workers(setting: int, cameras: int, cores: int | None = None) -> int:
    """How many inferences run at once: ``setting`` when given; else (0) one per camera up to
    the usable cores and ``MAX_AUTO_WORKERS`` (one camera: one, latency first)."""
    if setting:
        return setting
    cores = usable_cores() if cores is None else cores
    return max(1, min(cameras, cores, MAX_AUTO_WORKERS))


def threads_per_run(workers: int, cores: int | None = None) -> int:
    """Each concurrent run's intra-op threads: its share of the usable cores."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, workers))


@dataclass(eq=False)
class Ticket:
    """One frame's place in the order frames leave inference."""

    job: Any = None  # None once resolved: dropped, failed or abandoned
    done: bool = False


@dataclass(eq=False)
class Worker:
    """One inference thread: when its current run started, and whether it was given up on."""

    name: str
    busy_since: float | None = None
    ticket: Ticket | None = None
    abandoned: bool = False


class InOrder:
    """Tickets issued as frames are taken; frames passed on strictly in ticket order."""

    def __init__(self, forward: Callable[[Any], None]) -> None:
        self._forward = forward
        self._waiting: deque[Ticket] = deque()
        self._taking = threading.Lock()  # a take and its ticket are one step
        self._leaving = threading.Lock()  # one thread passes frames on at a time

    def take(self, get: Callable[[], Any], end: object) -> tuple[Any, Ticket | None]:
        """The next item and its ticket (none for the end marker)."""
        with self._taking:
            item = get()
            if item is end:
                return item, None
            ticket = Ticket()
            self._waiting.append(ticket)
            return item, ticket

    def finish(self, ticket: Ticket, job: Any | None) -> None:
        """Resolve a ticket (``job`` None: nothing goes on) and pass on every frame whose turn
        has come. Whoever finishes last passes on the ones that waited for it."""
        ticket.job, ticket.done = job, True
        with self._leaving:
            while self._waiting and self._waiting[0].done:
                resolved = self._waiting.popleft()
                if resolved.job is not None:
                    self._forward(resolved.job)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)
