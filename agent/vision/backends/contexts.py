"""Execution contexts shared by concurrent runs: one run per context at a time.

A runtime's context (an OpenVINO infer request, an RKNN context bound to one NPU core) serves one
inference at a time; the loop's inference workers call a backend from several threads at once.
A backend keeps its contexts here: each run takes an idle one (or waits for one, or has a new one
made while fewer than ``most`` exist) and gives it back, and ``cancel`` reaches every busy one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

Context = TypeVar("Context")


class ContextPool(Generic[Context]):
    def __init__(
        self,
        make: Callable[[], Context] | None = None,
        most: int | None = None,
        ready: list[Context] | None = None,
    ) -> None:
        """``ready``: contexts made up front; ``make``: how to make another (None: never);
        ``most``: how many may exist (None: as many as runs at once)."""
        self._idle = list(ready or [])
        self._made = len(self._idle)
        self._make, self._most = make, most
        self._busy: list[Context] = []
        self._changed = threading.Condition()
        if not self._idle and make is None:
            raise ValueError("a context pool needs contexts or a way to make them")

    @contextmanager
    def context(self) -> Iterator[Context]:
        """An idle context for the length of one run."""
        chosen = self._take()
        try:
            yield chosen
        finally:
            with self._changed:
                self._busy.remove(chosen)
                self._idle.append(chosen)
                self._changed.notify()

    def _take(self) -> Context:
        with self._changed:
            while not self._idle:
                if self._make is not None and (self._most is None or self._made < self._most):
                    self._made += 1
                    break
                self._changed.wait()
            else:
                chosen = self._idle.pop()
                self._busy.append(chosen)
                return chosen
        try:
            made = self._make()  # outside the lock: making one may take a while
        except BaseException:
            with self._changed:
                self._made -= 1
                self._changed.notify()
            raise
        with self._changed:
            self._busy.append(made)
        return made

    def busy(self) -> list[Context]:
        """The contexts running now (to cancel them)."""
        with self._changed:
            return list(self._busy)

    def all(self) -> list[Context]:
        """Every context made (to release them)."""
        with self._changed:
            return self._idle + self._busy

    @property
    def made(self) -> int:
        return self._made
