"""The watchdog ladder's steps, done to this agent: reopen, reload, previous model, reconnect,
exit.

Reopen the source, reload the backend, fall back to the previous model, cut a stuck MQTT
connection so that paho reconnects, exit for systemd. The
watchdog (service wing) decides which step to take and when; each step here only acts and
says what it did (None: nothing to do). No step waits for a hung inference: the stuck worker is
abandoned and a fresh one takes the next frame.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.service import Notifier
from agent.updates import ManagerError, ModelManager
from agent.vision import ActiveModel, Backend, FrameSource, Pipeline

log = logging.getLogger(__name__)

HARD_EXIT_AFTER_S = 20.0  # a hung stage can keep the orderly shutdown from finishing


class RecoveryLadder:
    def __init__(
        self,
        config: AgentConfig,
        pipeline: Pipeline,
        model: ActiveModel,
        manager: ModelManager | None,
        notifier: Notifier,
        reopen_source: Callable[[str], FrameSource],
        load_backend: Callable[[], Backend],
        drop_connection: Callable[[], bool] | None = None,
    ) -> None:
        """``load_backend``: the active model again, from disk; ``drop_connection``: cut the
        MQTT connection (None without MQTT)."""
        self.drop_connection = drop_connection
        self.config, self.pipeline, self.model = config, pipeline, model
        self.manager, self.notifier = manager, notifier
        self.reopen_source, self.load_backend = reopen_source, load_backend
        self.exit_code = 0  # non-zero once the last step asked systemd for a restart
        self._hard_exit: threading.Timer | None = None

    def steps(self) -> dict[str, Callable[[], Any]]:
        return {
            "restart_source": self.restart_source,
            "reload_backend": self.reload_backend,
            "previous_model": self.previous_model,
            "reconnect_link": self.reconnect_link,
            "exit": self.exit_for_restart,
        }

    def reconnect_link(self) -> str | None:
        if self.drop_connection is None or not self.drop_connection():
            return None  # no MQTT, or not connected: nothing to cut
        return "MQTT connection cut; paho reconnects and sends the unacknowledged window again"

    def restart_source(self) -> str | None:
        """Reopen every live camera's source (the watchdog sees no frame from any of them)."""
        reopened = []
        for camera in self.pipeline.cameras:
            if not camera.source.live:
                continue  # a file does not stall; nothing to reopen
            fresh = self.reopen_source(camera.name)
            old = self.pipeline.replace_source(fresh, camera.name)
            threading.Thread(target=old.close, name="close-old-source", daemon=True).start()
            reopened.append(fresh.name)
        return f"source {', '.join(reopened)} reopened" if reopened else None

    def reload_backend(self) -> str | None:
        self.notifier.extend_timeout(300)
        backend = self.load_backend()
        self._take_over_inference(backend)
        return f"backend reloaded from {backend.info.model_path}"

    def previous_model(self) -> str | None:
        if self.manager is not None:
            try:
                result = self.manager.rollback("the watchdog's previous_model step")
            except ManagerError as exc:
                log.warning("previous_model: %s", exc)
                return None
            self._abandon_hung_inference()
            return f"fell back to model {result.get('active')}"
        previous = self.model.previous
        if previous is None or previous is self.model():
            return None  # no earlier model in this run (the model store adds slots on disk)
        self._take_over_inference(previous)
        return f"fell back to model {previous.info.model_name} {previous.info.model_version}"

    def exit_for_restart(self) -> str:
        self.exit_code = self.config.watchdog.exit_code
        self.pipeline.stop()
        self._hard_exit = threading.Timer(HARD_EXIT_AFTER_S, os._exit, args=(self.exit_code,))
        self._hard_exit.daemon = True
        self._hard_exit.start()
        return f"exiting with status {self.exit_code} so that systemd restarts the agent"

    def cancel_hard_exit(self) -> None:
        if self._hard_exit is not None:
            self._hard_exit.cancel()

    def _take_over_inference(self, backend: Backend) -> None:
        self.model.swap(backend)
        self._abandon_hung_inference()

    def _abandon_hung_inference(self) -> None:
        """The watchdog's steps do not wait for a run that may never return."""
        if self.pipeline.busy_since.get("inference") is not None:
            self.pipeline.replace_inference_worker()
        self.pipeline.stats.inference_failures = 0
