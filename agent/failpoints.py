"""Named pauses that let crash tests SIGKILL the agent at an exact point.

``EDGE_AGENT_FAILPOINTS="staging=3,swap=3"`` makes the agent wait that many seconds at those
points, so a test can SIGKILL it exactly there. Unset (always, in production) a failpoint costs
one dictionary lookup."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def _parse(text: str) -> dict[str, float]:
    points = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, seconds = item.partition("=")
        points[name] = float(seconds or 0)
    return points


POINTS = _parse(os.environ.get("EDGE_AGENT_FAILPOINTS", ""))


def reach(name: str) -> None:
    seconds = POINTS.get(name)
    if seconds:
        log.warning("failpoint %s: pausing %.1f s", name, seconds)
        time.sleep(seconds)
