"""``edge-agent watch``: a live terminal view of a fleet, built only from its MQTT topics.

Per device: status, model and probation state, fps, per-stage p50/p95, CPU/GPU/NPU and
temperature, outbox depth, last detections; below, the most recent events. It connects like the
agent does (same TLS and credential options, or the ``mqtt`` section of an agent's config file),
so what it shows is exactly what reaches the broker. ``--once --json`` prints one snapshot.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from agent.config import MqttConfig, TlsConfig, describe_validation_error, load_config
from agent.errors import AgentError, ConfigError
from agent.link import FleetView, describe_reason, new_client

EXIT_NOTHING_SEEN = 2


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


def watch_config(args: Any) -> MqttConfig:
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


class Watcher:
    """One subscriber feeding a ``FleetView``; ``connect`` fails with one clear line."""

    def __init__(self, config: MqttConfig, view: FleetView) -> None:
        self.config, self.view = config, view
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self._connack = threading.Event()
        self._refusal: str | None = None
        self.client = new_client(config, f"edge-agent-watch-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

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


# -- rendering --------------------------------------------------------------------------------
def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _stage(row: dict[str, Any], stage: str) -> str:
    figures = row["stages_ms"].get(stage) or {}
    return f"{_num(figures.get('p50'))}/{_num(figures.get('p95'))}"


def render(snapshot: dict[str, Any]) -> Any:
    """A rich renderable: a table of devices, and the latest events under it."""
    from rich.console import Group
    from rich.table import Table

    devices = snapshot["devices"]
    table = Table(
        title=f"edge-agent fleet on {snapshot['broker']} ({len(devices)} devices)",
        title_justify="left",
    )
    for column in (
        "device",
        "state",
        "model",
        "ota",
        "fps in/out",
        "infer p50/p95",
        "pre",
        "post",
        "cpu%",
        "temp",
        "gpu/npu%",
        "outbox",
        "last detections",
    ):
        keep_whole = column in ("device", "state")  # never folded: the row must stay findable
        table.add_column(column, overflow="fold", no_wrap=keep_whole, min_width=len(column) // 2)
    now = time.time()
    for row in devices.values():
        state = row["state"]
        style = {"online": "green", "offline": "red", "stopped": "yellow"}.get(state, "")
        model = f"{row['model'] or '?'} {row['version'] or ''} {row['precision'] or ''}".strip()
        accelerator = row["gpu_percent"] if row["gpu_percent"] is not None else row["npu_percent"]
        labels = ", ".join(f"{n} {label}" for label, n in sorted(row["last_detections"].items()))
        table.add_row(
            row["device_id"],
            f"[{style}]{state}[/]" if style else state,
            model,
            row["ota"],
            f"{_num(row['fps_in'])}/{_num(row['fps_out'])}",
            _stage(row, "inference"),
            _stage(row, "preprocess"),
            _stage(row, "postprocess"),
            _num(row["cpu_percent"], 0),
            _num(row["temperature_c"], 0),
            _num(accelerator, 0),
            str(row["outbox_depth"] if row["outbox_depth"] is not None else "-"),
            labels or "-",
        )
    events = sorted(
        ((e, row["device_id"]) for row in devices.values() for e in row["events"]),
        key=lambda pair: pair[0].get("timestamp") or 0,
    )[-8:]
    log = Table(title="recent events", title_justify="left", show_header=False, box=None)
    for event, device in events:
        age = now - (event.get("timestamp") or now)
        log.add_row(
            f"{age:5.0f} s ago",
            device,
            event.get("level") or "",
            event.get("kind") or "",
            event.get("message") or "",
        )
    if not devices:
        table.caption = f"no agents seen under {snapshot['prefix']}/ yet"
    return Group(table, log)


def run_watch(args: Any) -> int:
    """The ``watch`` command; returns its exit status."""
    if args.json and not args.once:
        raise ConfigError("--json needs --once (the live view is for a terminal)")
    config = watch_config(args)
    view = FleetView(config.prefix, None if args.all else args.device)
    watcher = Watcher(config, view)
    watcher.connect(timeout=args.timeout)
    try:
        if args.once:
            settle(watcher, args.wait)
            snapshot = watcher.snapshot()
            if args.json:
                print(json.dumps(snapshot, indent=2))
            else:
                from rich.console import Console

                Console().print(render(snapshot))
            if not snapshot["devices"]:
                who = f"device {args.device!r}" if args.device and not args.all else "agents"
                print(
                    f"no {who} seen under {config.prefix}/ on {watcher.where} within "
                    f"{args.wait:g} s",
                    file=sys.stderr,
                )
                return EXIT_NOTHING_SEEN
            return 0
        return _live(watcher)
    finally:
        watcher.close()


def _live(watcher: Watcher) -> int:
    from rich.live import Live

    try:
        with Live(render(watcher.snapshot()), refresh_per_second=2, screen=False) as live:
            while True:
                watcher.changed.wait(0.5)
                watcher.changed.clear()
                live.update(render(watcher.snapshot()))
    except KeyboardInterrupt:
        return 0


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


def add_arguments(parser: Any) -> None:
    add_broker_arguments(parser)
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--device", help="only this device id")
    who.add_argument("--all", action="store_true", help="every device (the default)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    parser.add_argument(
        "--wait", type=float, default=5.0, help="with --once: seconds to gather (default 5)"
    )
