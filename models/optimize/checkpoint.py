"""Resumable training: an interrupted prune, distill or qat continues where it stopped.

Recovery and QAT run for minutes to hours, and a laptop lid, a Ctrl-C or a lost SSH session
should cost minutes, not the run. Every ``every_s`` seconds (at a step's end, never inside one)
the run's state is saved: the weights, the optimiser, the random generators, the losses so far
and, for pruning, which channels each stage removed. The file lives in the user's cache, not
beside the output (an interrupted run leaves no partial output), under a name made from the
command, its inputs' contents and its settings: running the same command again resumes, and
any other command or changed input starts afresh. A finished run deletes its checkpoint.
``$EDGE_MODELS_CHECKPOINTS`` moves the folder.

The first Ctrl-C asks the run to stop after the current step, saving the state there; a second
one stops at once (the last saved state still resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from agent.contract import atomic_path
from models.environments import cache_root

STALE_DAYS = 14
FOLDER_VAR = "EDGE_MODELS_CHECKPOINTS"


def checkpoint_folder() -> Path:
    """``$EDGE_MODELS_CHECKPOINTS``, else ``~/.cache/edge-agent/checkpoints``."""
    explicit = os.environ.get(FOLDER_VAR)
    return Path(explicit) if explicit else cache_root() / "checkpoints"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the state was saved at a step's end."""


class Checkpoint:
    """The saved state of one run, found again by what the run is."""

    def __init__(self, what: dict[str, Any], every_s: float = 60.0) -> None:
        self.key = run_key(what)
        self.path = checkpoint_folder() / f"{what.get('command', 'run')}-{self.key}.pt"
        self.every_s = every_s
        self._saved_at = time.monotonic()
        self._stop = False

    def resume(self) -> dict[str, Any] | None:
        """The saved state of this very run, or None (none saved, or unreadable: said so)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn or foreign file: start afresh, never fail on it
            print(f"- ignoring the unreadable checkpoint {self.path}: {exc}", file=sys.stderr)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            return None
        print(f"- resuming from {self.path} ({state.get('where', 'saved state')})",
              file=sys.stderr)  # fmt: skip
        return state

    def keep(self, state: Callable[[], dict[str, Any]], where: str) -> None:
        """Called at every step's end: saves ``state()`` when it is due or a stop was asked,
        then stops the run for a Ctrl-C."""
        if self._stop or time.monotonic() - self._saved_at >= self.every_s:
            self.save(state(), where)
        if self._stop:
            raise Interrupted(f"stopped after {where}")

    def save(self, state: dict[str, Any], where: str) -> None:
        """Written whole or not at all (temporary file, then renamed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as partial:
            torch.save({**state, "key": self.key, "where": where}, partial)
        self._saved_at = time.monotonic()
        _forget_stale(self.path.parent)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def stoppable(self) -> Iterator[None]:
        """While training: the first Ctrl-C stops after the current step (state saved), the
        second at once. Outside the main thread (no signals there) nothing changes."""
        try:
            previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_interrupt)
        except ValueError:
            yield
            return
        try:
            yield
        except KeyboardInterrupt as exc:
            where = str(exc) or "the last saved step"
            print(f"\n- interrupted; run the same command again to resume ({where}, "
                  f"{self.path})", file=sys.stderr)  # fmt: skip
            raise
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        print("\n- stopping after this step (Ctrl-C again: at once)", file=sys.stderr)


def _forget_stale(folder: Path) -> None:
    """Checkpoints (and optimize's stashes) of runs nobody resumed for ``STALE_DAYS`` go, so the
    cache cannot fill up."""
    limit = time.time() - STALE_DAYS * 86400
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime >= limit:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
        except OSError:
            pass


def run_key(what: Any) -> str:
    """A short name for a run, made from everything that makes it that run (JSON-able)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]
