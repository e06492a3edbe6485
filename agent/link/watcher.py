"""Subscribing to a fleet from outside it: the broker options, and a watcher feeding a view.

``edge-agent watch`` and ``edge-models rollout --auto`` both read the fleet only through what any
subscriber receives; the options to reach the broker and the subscriber itself live here, next
to the ``FleetView`` they feed, so neither command reaches into the other's module.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from agent.config import MqttConfig, TlsConfig, describe_validation_error, load_config
from agent.contract.errors import AgentError, ConfigError
from agent.link.fleet_view import FleetView
from agent.link.mqtt import describe_reason, guarded, new_client

log = logging.getLogger(__name__)


class WatchError(AgentError):
    """The broker cannot be reached or refuses us: one line that says which and why."""


def parse_broker(url: str) -> tuple[str, int, bool]:
    """``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]`` -> host, port, TLS."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad --broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(
            f"bad --broker URL {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
        )
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def broker_config(args: Any) -> MqttConfig:
    """The agent's ``mqtt`` section (``--config``), then the command line on top of it."""
    base = load_config(args.config).mqtt if args.config else MqttConfig()
    update: dict[str, Any] = {}
    if args.broker:
        host, port, tls = parse_broker(args.broker)
        update.update(host=host, port=port)
        if tls and base.tls is None:
            update["tls"] = TlsConfig()
    if args.prefix:
        update["prefix"] = args.prefix
    if args.username is not None:
        update["username"] = args.username
    if args.password_file is not None:
        update["password_file"] = args.password_file
    tls_options = {
        key: value
        for key, value in (
            ("ca_file", args.ca_file),
            ("cert_file", args.cert_file),
            ("key_file", args.key_file),
            ("insecure", args.insecure or None),
        )
        if value is not None
    }
    if tls_options:
        tls_base = update.get("tls") or base.tls or TlsConfig()
        try:
            update["tls"] = TlsConfig.model_validate({**tls_base.model_dump(), **tls_options})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "the TLS options")) from None
    return base.model_copy(update=update)


def add_broker_arguments(parser: Any) -> None:
    """How to reach the fleet's broker: shared by ``watch`` and ``edge-models rollout --auto``."""
    parser.add_argument("--broker", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    parser.add_argument("-c", "--config", type=Path, help="take the mqtt section of this config")
    parser.add_argument("--prefix", help="topic prefix (default: the config's, else edge)")
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path, help="file whose first line is the password")
    parser.add_argument("--ca-file", type=Path)
    parser.add_argument("--cert-file", type=Path)
    parser.add_argument("--key-file", type=Path)
    parser.add_argument("--insecure", action="store_true", help="do not check the broker's cert")
    parser.add_argument("--timeout", type=float, default=5.0, help="connect timeout (s)")


class Watcher:
    """One subscriber feeding a ``FleetView``; ``connect`` fails with one clear line."""

    def __init__(self, config: MqttConfig, view: FleetView) -> None:
        self.config, self.view = config, view
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self._connack = threading.Event()
        self._refusal: str | None = None
        self.client = new_client(config, f"edge-agent-watch-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = guarded(self._on_connect, self._callback_failed)
        self.client.on_message = guarded(self._on_message, self._callback_failed)
        self.callback_errors = 0

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def connect(self, timeout: float = 5.0) -> None:
        self.client.connect_timeout = timeout
        try:
            self.client.connect(self.config.host, self.config.port, keepalive=30)
        except ssl.SSLError as exc:
            raise WatchError(f"TLS with broker {self.where} failed: {exc.reason or exc}") from None
        except (TimeoutError, OSError) as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise WatchError(f"cannot reach broker {self.where}: {reason}") from None
        self.client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise WatchError(f"broker {self.where} did not answer within {timeout:g} s")
        if self._refusal is not None:
            self.close()
            raise WatchError(f"broker {self.where} refused the connection: {self._refusal}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            data = self.view.snapshot()
        return {"broker": self.where, **data}

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self._refusal = describe_reason(reason).replace("mqtt.username", "--username")
        else:
            for topic in self.view.topics():
                client.subscribe(topic, qos=0)
        self._connack.set()

    def take(self, topic: str, payload: bytes) -> None:
        """One message into the view (paho's thread, or a caller that routes its own)."""
        with self.lock:
            self.view.update(topic, payload)
        self.changed.set()

    def _callback_failed(self, where: str, exc: BaseException) -> None:
        self.callback_errors += 1  # logged; the subscription goes on (see ``guarded``)
        log.error("watcher %s failed (%r); the subscription goes on", where, exc, exc_info=exc)

    def _on_message(self, client, userdata, message) -> None:
        self.take(message.topic, message.payload)


def settle(watcher: Watcher, wait_s: float) -> None:
    """Wait until each device seen has sent status, model and telemetry, or ``wait_s`` passed."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with watcher.lock:
            views = list(watcher.view.devices.values())
        if views and all(v.status and v.model and v.telemetry for v in views):
            return
        watcher.changed.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        watcher.changed.clear()
