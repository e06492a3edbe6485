"""What the benchmark scripts share."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training environment's Python has not the project installed
    sys.path.insert(0, str(ROOT))

from agent.demo_inputs import require_shared_dir  # noqa: E402


def shared_dir_or_exit(explicit: Path | None) -> Path:
    """../shared (or ``--shared``); without it, say what to pass and exit 2."""
    try:
        return require_shared_dir(explicit)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Wait for a condition; past ``timeout`` seconds, exit naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)
