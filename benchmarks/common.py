"""What the benchmark scripts share."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.demo_inputs import require_shared_dir

ROOT = Path(__file__).resolve().parents[1]


def shared_dir_or_exit(explicit: Path | None) -> Path:
    """../shared (or ``--shared``); without it, say what to pass and exit 2."""
    try:
        return require_shared_dir(explicit)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
