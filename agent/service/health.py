"""``edge-agent health``: is the running agent healthy? (the containers' HEALTHCHECK).

Kept apart from the watchdog that writes the health file, and answerable without importing the
rest of the agent (``quick_check``): a container runs it every 30 s, and on a Raspberry Pi the
whole CLI's imports (OpenCV, pydantic, ONNX Runtime) cost seconds of CPU each time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


def read_health(path: Path, max_age_s: float) -> tuple[bool, str]:
    """For ``edge-agent health``: (healthy, one-line reason)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return (
            False,
            f"no health file at {path}: the agent is not running (or runs with another state_dir)",
        )
    except (OSError, ValueError) as exc:
        return False, f"cannot read {path}: {exc}"
    age = time.time() - float(record.get("timestamp", 0))
    pid = int(record.get("pid", 0))
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True  # exists, owned by another user (the service account)
    if not alive:
        return False, f"agent process {pid} is not running"
    if age > max_age_s:
        return False, f"no heartbeat for {age:.0f} s (the agent is hung)"
    if not record.get("ready"):
        return False, "starting: no frame processed yet"
    if not record.get("healthy"):
        return False, "unhealthy: " + "; ".join(record.get("faults") or ["unknown fault"])
    return True, "healthy: " + record.get("status", "")


def quick_check(argv: list[str]) -> int | None:
    """``health`` without a config file, answered here: the exit status. None for anything
    else (another command, or ``-c``: the config decides the state dir), which the full CLI
    answers."""
    full_cli = ("-c", "--config", "-h", "--help")
    if argv[:1] != ["health"] or any(a.split("=")[0] in full_cli for a in argv[1:]):
        return None
    parser = argparse.ArgumentParser(prog="edge-agent health", add_help=False)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--max-age", type=float, default=10.0)
    known, unknown = parser.parse_known_args(argv[1:])
    if unknown:
        return None  # the full CLI names what is wrong
    healthy, reason = read_health(known.state_dir / "health.json", known.max_age)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1
