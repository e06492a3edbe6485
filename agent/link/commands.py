"""Commands arriving on ``cmd/<name>``, answered on ``cmd/<name>/result``.

Payloads are checked before anything runs: size, JSON object, known command, typed arguments
(unknown fields refused). A bad command gets an error reply naming the problem and changes
nothing. Commands run one at a time on a worker thread, so paho's network thread never waits on
a slow handler; a full queue answers "busy" instead of growing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.config import describe_validation_error
from agent.link.messages import BadPayload, command_result, parse_object
from agent.threads import restarting

log = logging.getLogger(__name__)

Handler = Callable[[BaseModel], Any]


class CommandError(Exception):
    """A command was understood but cannot be carried out; the message is the reply's error."""


class CommandRouter:
    def __init__(
        self,
        reply: Callable[[str, dict[str, Any]], None],
        max_bytes: int = 65536,
        queue_size: int = 64,
    ) -> None:
        self._reply = reply
        self._handlers: dict[str, tuple[type[BaseModel], Handler]] = {}
        self.max_bytes = max_bytes
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(queue_size)
        run = restarting("commands", self._work, lambda: False)  # ends on its queue's None
        self._thread = threading.Thread(target=run, name="commands", daemon=True)
        self.handled = 0
        self.rejected = 0

    def register(self, name: str, arguments: type[BaseModel], handler: Handler) -> None:
        self._handlers[name] = (arguments, handler)

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=2.0)

    def submit(self, name: str, payload: bytes, properties: Any = None) -> None:
        """Called on paho's thread: queue the command, or answer at once if it cannot wait."""
        if len(payload) > self.max_bytes:
            self._error(
                name, None, f"payload too large: {len(payload)} bytes (max {self.max_bytes})"
            )
            return
        try:
            self._queue.put_nowait((name, payload))
        except queue.Full:
            self._error(name, None, "busy: too many commands waiting, try again")

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            name, payload = item
            try:
                self.execute(name, payload)
            except Exception:  # a handler bug must not take the agent down
                log.exception("command %s failed", name)
                self._error(name, None, "internal error while running the command")

    def execute(self, name: str, payload: bytes) -> dict[str, Any]:
        """Parse, validate and run one command; publish and return its reply."""
        try:
            body = parse_object(payload, self.max_bytes)
        except BadPayload as exc:
            return self._error(name, None, str(exc))
        request_id = body.pop("id", None)
        if request_id is not None and not (
            isinstance(request_id, str | int)
            and not isinstance(request_id, bool)
            and len(str(request_id)) <= 128
        ):
            return self._error(
                name, None, "id must be a string or integer of at most 128 characters"
            )
        camera, per_camera, command = name.rpartition("/cmd/")
        if per_camera:  # <camera>/cmd/<command>: the topic names the camera
            if body.get("camera", camera) != camera:
                return self._error(name, request_id, f"the topic is camera {camera}'s; the "
                                   f"payload says camera {body['camera']!r}")  # fmt: skip
            body["camera"] = camera
            entry = self._handlers.get(command)
            if entry is not None and "camera" not in entry[0].model_fields:
                return self._error(name, request_id, f"{command} is a device command: publish "
                                   f"it on cmd/{command}")  # fmt: skip
        else:
            command = name
        entry = self._handlers.get(command)
        if entry is None:
            return self._error(
                name, request_id, f"unknown command {command!r} (known: {', '.join(self.names)})"
            )
        arguments_type, handler = entry
        try:
            arguments = arguments_type.model_validate(body)
        except ValidationError as exc:
            detail = describe_validation_error(exc, f"command {command}").split("\n", 1)[-1]
            return self._error(name, request_id, "invalid arguments:\n" + detail)
        try:
            result = handler(arguments)
        except CommandError as exc:
            return self._error(name, request_id, str(exc))
        self.handled += 1
        reply = command_result(name, request_id, True, result=result)
        self._reply(name, reply)
        return reply

    def _error(self, name: str, request_id: str | int | None, message: str) -> dict[str, Any]:
        self.rejected += 1
        log.warning("command %r rejected: %s", name[:80], message.splitlines()[0])
        reply = command_result(name, request_id, False, error=message)
        self._reply(name, reply)
        return reply
