"""The ``edge-agent`` command's entry point: ``health`` (a container's HEALTHCHECK, every 30 s)
is answered without importing the rest of the agent; everything else goes to ``agent.cli``."""

from __future__ import annotations

import sys


def main() -> None:
    from agent.service import quick_check

    code = quick_check(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from agent.cli import entry

    entry()
