"""The MQTT link: connection, topics, last will, and the publisher that drains the outbox.

paho-mqtt runs the network on its own thread and reconnects with backoff. The publisher thread
hands outbox rows to paho a window at a time and deletes a row only on its PUBACK, so nothing is
lost while the broker is away: paho re-sends its in-flight window after a reconnect, and rows it
never got stay in the outbox (across restarts too). Delivery is at least once, in order.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.contract.errors import ConfigError
from agent.link.outbox import Outbox
from agent.threads import restarting

log = logging.getLogger(__name__)


def guarded(handler: Callable[..., None], on_error: Callable[[str, BaseException], None]):
    """``handler`` as a paho callback that never raises: paho re-raises a callback's exception
    on its network thread, which then dies while ``connected`` stays set and nothing reconnects
    (one poison message would silence the device for good). The error is logged and counted."""

    def callback(*args: Any) -> None:
        try:
            handler(*args)
        except Exception as exc:
            on_error(getattr(handler, "__name__", "callback"), exc)

    return callback


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    per_camera: bool = False  # several cameras: detections and objects under {camera}/

    def device(self, leaf: str) -> str:
        return f"{self.prefix}/{self.device_id}/{leaf}"

    def of_camera(self, camera: str, leaf: str) -> str:
        """A camera's ``detections`` or ``objects``: per camera when there are several."""
        return self.device(f"{camera}/{leaf}" if self.per_camera else leaf)

    @property
    def status(self) -> str:
        return self.device("status")

    @property
    def detections(self) -> str:
        return self.device("detections")

    @property
    def objects(self) -> str:
        return self.device("objects")

    @property
    def telemetry(self) -> str:
        return self.device("telemetry")

    @property
    def events(self) -> str:
        return self.device("events")

    @property
    def model(self) -> str:
        return self.device("model")

    @property
    def commands(self) -> str:
        return self.device("cmd/+")

    def command_name(self, topic: str) -> str | None:
        """``cmd/<name>`` (name may contain one more level, e.g. ``config/thresholds``); with
        several cameras also ``<camera>/cmd/<name>``, returned whole (the router splits it)."""
        if topic.endswith("/result"):
            return None
        head = self.device("cmd/")
        if topic.startswith(head):
            return topic[len(head) :] or None
        rest = topic[len(self.device("")) :] if topic.startswith(self.device("")) else ""
        camera, found, name = rest.partition("/cmd/")
        if self.per_camera and found and camera and "/" not in camera and name:
            return rest
        return None

    def command_result(self, name: str) -> str:
        """Where a command's reply goes: beside the topic it came on."""
        return self.device(f"{name}/result" if "/cmd/" in name else f"cmd/{name}/result")


def read_password(config: MqttConfig) -> str | None:
    if config.password_file is not None:
        try:
            lines = config.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"mqtt.password_file: cannot read {config.password_file}: {exc}"
            ) from None
        return lines[0] if lines else ""
    if config.password is not None:
        return config.password.get_secret_value()
    return None


def _check_readable(path: Path | None, field: str) -> None:
    if path is not None and not path.is_file():
        raise ConfigError(f"mqtt.tls.{field}: file not found: {path}")


class PahoWhileDisconnected(logging.Filter):
    """paho logs ``Client is not connected`` at ERROR on every pass of its loop while the broker
    is away (each reconnect attempt): an error-priority line a second in the journal for a state
    the link already reports once. Those lines become DEBUG (shown with ``--log-level debug``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.levelno >= logging.ERROR and message.startswith("Client is not connected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


PAHO_LOG = logging.getLogger("paho")
if not any(isinstance(f, PahoWhileDisconnected) for f in PAHO_LOG.filters):
    PAHO_LOG.addFilter(PahoWhileDisconnected())


def new_client(config: MqttConfig, client_id: str) -> paho.Client:
    """A paho client with the protocol, credentials and TLS of ``config`` (agent and watch alike).

    Raises:
        ConfigError: a password or certificate file that cannot be read.
    """
    protocol = paho.MQTTv5 if config.protocol == "5" else paho.MQTTv311
    kwargs: dict[str, Any] = {
        "callback_api_version": CallbackAPIVersion.VERSION2,
        "client_id": client_id,
        "protocol": protocol,
    }
    if protocol == paho.MQTTv311:
        kwargs["clean_session"] = True
    client = paho.Client(**kwargs)
    client.enable_logger(PAHO_LOG)
    if config.username is not None:
        client.username_pw_set(config.username, read_password(config))
    if config.tls is not None:
        tls = config.tls
        _check_readable(tls.ca_file, "ca_file")
        _check_readable(tls.cert_file, "cert_file")
        _check_readable(tls.key_file, "key_file")
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls: cannot load certificates: {exc}") from None
        if tls.insecure:
            log.warning("mqtt.tls.insecure is set: the broker's certificate is NOT checked")
            client.tls_insecure_set(True)
    return client


def describe_reason(reason: ReasonCode | int | None) -> str:
    if reason is None:
        return "unknown"
    text = str(reason)
    hints = {
        "Not authorized": " (check mqtt.username and the password)",
        "Bad user name or password": " (check mqtt.username and the password)",
    }
    return text + hints.get(text, "")


class MqttLink:
    """One paho client: connects in the background, keeps reconnecting, routes callbacks."""

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        last_will: bytes,
        on_command: Callable[[str, bytes, Any], None] | None = None,
        subscriptions: list[str] | None = None,
        on_connected: Callable[[], None] | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
        per_camera: bool = False,
    ) -> None:
        """``per_camera``: several cameras, each with its own topics (and commands)."""
        self.config = config
        self.topics = Topics(config.prefix, device_id, per_camera)
        self.connected = threading.Event()
        self.connects = 0
        self.connect_failures = 0
        self.last_error: str | None = None
        self.on_publish: Callable[[int, bool, str], None] | None = None
        self.bad_messages = 0  # received messages dropped: too big, or their handler failed
        self.callback_errors = 0
        self.last_bad_message: str | None = None
        self._stopping = False
        self._on_command = on_command
        self._on_connected = on_connected
        self._on_message = on_message
        commands = [self.topics.device("cmd/#")]
        if per_camera:
            commands.append(self.topics.device("+/cmd/#"))
        self._subscriptions = [*commands, *(subscriptions or [])]
        client = new_client(config, config.client_id or f"edge-agent-{device_id}")
        client.max_inflight_messages_set(config.inflight)
        # paho's own store, bounded: while acks are stuck, fire-and-forget messages (telemetry,
        # replies) beyond this are refused instead of piling up in memory
        client.max_queued_messages_set(config.max_queued)
        client.reconnect_delay_set(
            int(config.reconnect_min_s) or 1, int(config.reconnect_max_s) or 1
        )
        client.will_set(self.topics.status, last_will, qos=1, retain=True)
        client.on_connect = guarded(self._handle_connect, self._callback_failed)
        client.on_connect_fail = guarded(self._handle_connect_fail, self._callback_failed)
        client.on_disconnect = guarded(self._handle_disconnect, self._callback_failed)
        client.on_message = guarded(self._handle_message, self._callback_failed)
        client.on_publish = guarded(self._handle_publish, self._callback_failed)
        client.on_subscribe = guarded(self._handle_subscribe, self._callback_failed)
        self.client = client

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(
            self.config.host, self.config.port, keepalive=self.config.keepalive_s
        )
        self.client.loop_start()

    def stop(self, final_status: bytes | None = None, timeout: float = 3.0) -> None:
        """Publish ``final_status`` (retained) if connected, then disconnect cleanly."""
        self._stopping = True
        if final_status is not None and self.connected.is_set():
            info = self.client.publish(self.topics.status, final_status, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the final status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def drop_connection(self) -> bool:
        """Cut the connection under paho so that its loop reconnects (and resends the unacked
        window) as after a network failure; False when there is no connection to cut."""
        sock = self.client.socket()
        if sock is None or not self.connected.is_set():
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)  # safe from any thread; paho's loop sees EOF
        except OSError as exc:
            log.warning("could not cut the MQTT connection: %s", exc)
            return False
        return True

    def publish_info(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> paho.MQTTMessageInfo | None:
        """Hand one message to paho; None when not connected (paho did not take it)."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info if info.rc == paho.MQTT_ERR_SUCCESS else None

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Fire and forget (telemetry, command replies): True if paho took it."""
        return self.publish_info(topic, payload, qos, retain) is not None

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self.connect_failures += 1
            self.last_error = f"broker refused the connection: {describe_reason(reason)}"
            log.error("MQTT %s; retrying", self.last_error)
            return
        self.connects += 1
        self.last_error = None
        log.info("MQTT connected to %s:%s", self.config.host, self.config.port)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _handle_connect_fail(self, client, userdata) -> None:
        self.connect_failures += 1
        self.last_error = f"cannot reach broker {self.config.host}:{self.config.port}"
        log.warning("MQTT %s; retrying", self.last_error)

    def _handle_disconnect(self, client, userdata, flags, reason, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if self._stopping:
            return
        if was_connected:
            self.last_error = f"disconnected: {describe_reason(reason)}"
            log.warning("MQTT %s; reconnecting", self.last_error)
        elif reason is not None and reason.is_failure:
            # refused before CONNACK: TLS handshake (certificate), or the broker closed on us
            self.connect_failures += 1
            where = f"{self.config.host}:{self.config.port}"
            hint = " (check the mqtt.tls certificates)" if self.config.tls else ""
            self.last_error = f"connection to {where} failed: {describe_reason(reason)}{hint}"
            log.error("MQTT %s; retrying", self.last_error)

    def _handle_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        for reason in reasons:
            if reason.is_failure:
                self.last_error = f"subscription refused by the broker: {describe_reason(reason)}"
                log.error(
                    "MQTT %s (check the broker ACL for %s)", self.last_error, self._subscriptions
                )

    def _handle_publish(self, client, userdata, mid, reason, properties) -> None:
        if self.on_publish is not None:
            refused = bool(reason is not None and reason.is_failure)
            self.on_publish(mid, refused, describe_reason(reason) if refused else "")

    def _callback_failed(self, where: str, exc: BaseException) -> None:
        self.callback_errors += 1
        if where == "_handle_message":
            self.bad_messages += 1
            self.last_bad_message = f"a received message failed its handler: {exc!r:.200}"
        log.error("MQTT %s failed (%r); the connection goes on", where, exc, exc_info=exc)

    def _handle_message(self, client, userdata, message) -> None:
        name = self.topics.command_name(message.topic)
        if name is not None and self._on_command is not None:
            self._on_command(name, message.payload, message.properties)
            return
        if len(message.payload) > self.config.max_message_bytes:
            self.bad_messages += 1
            self.last_bad_message = (
                f"dropped a {len(message.payload)}-byte message on {message.topic[:200]} "
                f"(mqtt.max_message_bytes {self.config.max_message_bytes})"
            )
            log.warning("MQTT %s", self.last_bad_message)
            return
        if self._on_message is not None:
            self._on_message(message.topic, message.payload)


class Publisher:
    """Drains the outbox through the link, in order, deleting rows only when acknowledged.

    Completion is read from each message's ``MQTTMessageInfo`` on this thread; paho's callback
    only notes MQTT 5 refusals (an ACL denial), so no lock is shared with paho's threads.

    After a reconnect paho resends the unacknowledged window itself, but only after its
    ``on_connect`` has run, where the link says it is connected: new rows sent in between would
    overtake the old ones. So after a reconnect nothing new is sent until the old window is
    acknowledged (or its ack timeout sends it again from the outbox).

    QoS 0 rows (telemetry-like detections, when configured so) leave the outbox as soon as
    paho takes them: at most once, as QoS 0 promises; QoS 1 and 2 rows stay until acknowledged.
    """

    def __init__(
        self, outbox: Outbox, link: MqttLink, window: int, ack_timeout_s: float = 60.0
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.published = 0
        self.refused = 0
        self.resends = 0  # windows sent again after ack_timeout_s without an acknowledgement
        self.last_refusal: str | None = None
        self._inflight: list[tuple[int, paho.MQTTMessageInfo, float]] = []  # row id, info, sent at
        self._refusals: dict[int, tuple[str, float]] = {}  # mid -> (reason, when)
        self._refusals_lock = threading.Lock()
        self._last_sent = 0
        self._connects_seen = 0
        self._old_window_upto = 0  # after a reconnect: rows up to this id go first
        # since when messages wait for an ack (the last ack, or the first send after none
        # waited); a resend of the same rows does not reset it; a new connection does
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        run = restarting("mqtt-publisher", self._run, self._stop.is_set)
        self._thread = threading.Thread(target=run, name="mqtt-publisher", daemon=True)
        link.on_publish = self._note_refusal

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush_timeout: float = 0.0) -> bool:
        """Stop; first wait up to ``flush_timeout`` for the outbox to empty. True if it did."""
        deadline = time.monotonic() + flush_timeout
        self.outbox.flush(flush_timeout)  # messages still on their way into the outbox count too
        while len(self.outbox) and time.monotonic() < deadline and self.link.connected.is_set():
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout=2.0)
        return len(self.outbox) == 0

    def _note_refusal(self, mid: int, refused: bool, reason: str) -> None:
        if refused:
            with self._refusals_lock:
                self._refusals[mid] = (reason, time.monotonic())

    def ack_stall_s(self, now: float | None = None) -> float:
        """How long QoS>0 messages have waited for an acknowledgement while connected (0: none
        waiting, or not connected: an outage is the outbox's business, not a fault)."""
        since = self._waiting_since
        if since is None or not self.link.connected.is_set():
            return 0.0
        return (time.monotonic() if now is None else now) - since

    def _collect_acks(self) -> None:
        done: list[int] = []
        while self._inflight and self._inflight[0][1].is_published():
            row, info, _ = self._inflight.pop(0)
            done.append(row)
            with self._refusals_lock:
                refusal = self._refusals.pop(info.mid, None)
            if refusal is not None:
                # an ACL refusal is final: retrying would block everything behind it
                self.refused += 1
                self.last_refusal = f"broker refused a publish: {refusal[0]}"
                log.error("MQTT %s; message dropped", self.last_refusal)
            else:
                self.published += 1
        if done:
            self._waiting_since = time.monotonic() if self._inflight else None
        self.outbox.ack(*done)
        with self._refusals_lock:
            cutoff = time.monotonic() - 30.0
            for mid in [m for m, (_, when) in self._refusals.items() if when < cutoff]:
                del self._refusals[mid]

    def _resend_if_stuck(self) -> None:
        if self._inflight and time.monotonic() - self._inflight[0][2] > self.ack_timeout_s:
            first_row = self._inflight[0][0]
            log.warning(
                "no PUBACK for %.0f s; sending again from outbox row %d",
                self.ack_timeout_s,
                first_row,
            )
            self._inflight.clear()
            self._last_sent = first_row - 1
            self.resends += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.link.connected.wait(0.2):
                continue
            self._collect_acks()
            self._resend_if_stuck()
            if self.link.connects != self._connects_seen:
                self._connects_seen = self.link.connects
                self._old_window_upto = self._inflight[-1][0] if self._inflight else 0
                if self._waiting_since is not None:
                    self._waiting_since = time.monotonic()  # a new connection's fair chance
            if self._inflight and self._inflight[0][0] <= self._old_window_upto:
                time.sleep(0.002)  # paho is resending the old window: its acks come first
                continue
            room = self.window - len(self._inflight)
            if room <= 0:
                time.sleep(0.002)
                continue
            batch = self.outbox.peek(self._last_sent, room)
            if not batch:
                if not self._inflight:
                    self._waiting_since = None  # nothing left waiting (rows may have expired)
                self.outbox.wait_newer(self._last_sent, 0.01 if self._inflight else 0.2)
                continue
            for message in batch:
                info = self.link.publish_info(
                    message.topic, message.payload, message.qos, message.retain
                )
                if info is None:
                    break  # disconnected meanwhile; the row stays for later
                self._last_sent = message.id
                if message.qos == 0:
                    self.outbox.ack(message.id)
                else:
                    if self._waiting_since is None:
                        self._waiting_since = time.monotonic()
                    self._inflight.append((message.id, info, time.monotonic()))
