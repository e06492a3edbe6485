"""Threads that cannot die unseen: a loop restarted after an exception, and a hook for the rest.

A background thread that dies of an exception used to vanish with a traceback on stderr while
the agent went on without it (the MQTT publisher: nothing sent again; housekeeping: no telemetry,
no expiry). ``restarting`` runs a thread's loop again after a crash (logged and counted in
``RESTARTS``, which the link reports as an event), and gives up after ``limit`` crashes within
``window_s`` by letting the exception go; ``install_hook`` routes every exception that ends a
thread (those, and any other thread's) to the agent, which reports it and exits non-zero so
that systemd restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

log = logging.getLogger(__name__)

RESTARTS: Counter[str] = Counter()  # thread name -> loops restarted after an exception
LAST_CRASH: dict[str, str] = {}  # thread name -> its last exception, for the event


def restarting(
    name: str,
    run: Callable[[], None],
    stopped: Callable[[], bool],
    limit: int = 5,
    window_s: float = 300.0,
    backoff_s: float = 1.0,
) -> Callable[[], None]:
    """``run`` as a thread target that survives its own exceptions (see the module's docstring);
    no restart once ``stopped()`` says the thread is meant to end."""

    def target() -> None:
        crashes: deque[float] = deque()
        while True:
            try:
                run()
                return
            except Exception as exc:
                now = time.monotonic()
                crashes.append(now)
                while crashes and crashes[0] < now - window_s:
                    crashes.popleft()
                LAST_CRASH[name] = f"{name}: {exc!r:.300}"
                if stopped() or len(crashes) >= limit:
                    raise
                RESTARTS[name] += 1
                log.exception("thread %s crashed; restarting it (%d in %.0f s)", name,
                              len(crashes), window_s)  # fmt: skip
                time.sleep(backoff_s)

    return target


def install_hook(on_crash: Callable[[str, BaseException], None]) -> Callable[[], None]:
    """Route every exception that ends a thread to ``on_crash(thread name, exception)`` after
    logging it; returns a function that puts the previous hook back."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.critical("thread %s died: %r", name, args.exc_value, exc_info=args.exc_value)
        try:
            on_crash(name, args.exc_value)
        except Exception:
            log.exception("reporting the crash of thread %s failed", name)

    threading.excepthook = hook

    def restore() -> None:
        threading.excepthook = previous

    return restore
