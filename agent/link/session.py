"""The agent's MQTT session: outbox, connection, publisher, command router and detections sink.

Built once at start-up and started, stopped and counted as one. Nothing here blocks the loop:
detections and events only go into the durable outbox, and the publisher thread drains it. On
every (re)connect the retained ``status`` and ``model`` and the Home Assistant discovery configs
are published again; a fleet ``announce`` on the channel's topic nudges the model control.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent import threads
from agent.config import AgentConfig
from agent.link.commands import CommandRouter
from agent.link.events import Watched
from agent.link.handlers import ModelControl
from agent.link.home_assistant import home_assistant_configs
from agent.link.messages import announce_spread, encode, model_state, status
from agent.link.mqtt import MqttLink, Publisher, Topics
from agent.link.outbox import Outbox
from agent.vision import BackendInfo, FrameResult

log = logging.getLogger(__name__)


class MqttSink:
    """Detections and object events into the outbox; the publisher thread takes them from there.

    Object events go at QoS 1 whatever detections use: a subscriber following a scene from
    ``objects`` alone must not miss a ``new`` or an ``end``."""

    def __init__(self, outbox: Outbox, topics: Topics, qos: int, device_id: str,
                 session: str) -> None:  # fmt: skip
        self._outbox, self._topics, self._qos = outbox, topics, qos
        self._device_id, self._session = device_id, session

    def emit(self, result: FrameResult) -> None:
        record = result.to_dict()
        record["device_id"] = self._device_id
        record["session"] = self._session
        record["capture_to_publish_ms"] = round(
            (time.monotonic() - result.frame.captured) * 1000, 3
        )
        topic = self._topics.of_camera(result.camera, "detections")
        self._outbox.submit(topic, encode(record), self._qos)

    def emit_objects(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            record = {**event, "device_id": self._device_id, "session": self._session}
            topic = self._topics.of_camera(event["camera"], "objects")
            self._outbox.submit(topic, encode(record), 1)

    def close(self) -> None:
        pass


class Link:
    def __init__(
        self,
        config: AgentConfig,
        session: str,
        model: Callable[[], BackendInfo],
        control: ModelControl | None = None,
    ) -> None:
        """``model``: the active model's info; ``control``: the model manager when OTA is on
        (its state goes in the ``model`` message, and a fleet announce nudges it)."""
        self.config, self.session = config, session
        self._model, self._control = model, control
        mqtt = config.mqtt
        self.outbox = Outbox(
            config.outbox.path or config.state_dir / "outbox.sqlite",
            config.outbox.max_messages,
            config.outbox.max_bytes,
            config.outbox.max_age_s,
            config.outbox.max_memory_bytes,
        )
        self.commands = CommandRouter(self.reply, mqtt.max_command_bytes)
        will = encode(status("offline", config.device_id, session, model()))
        self.mqtt = MqttLink(
            mqtt,
            config.device_id,
            will,
            on_command=self.commands.submit,
            subscriptions=[self.announce_topic] if control is not None else [],
            on_connected=self._on_connected,
            on_message=self._on_message,
            per_camera=bool(config.cameras),
        )
        self.publisher = Publisher(self.outbox, self.mqtt, mqtt.inflight, mqtt.ack_timeout_s)
        self.topics = self.mqtt.topics
        self.sink = MqttSink(
            self.outbox, self.topics, mqtt.qos_detections, config.device_id, session
        )

    @property
    def announce_topic(self) -> str:
        return f"{self.config.mqtt.prefix}/fleet/{self.config.ota.channel_name}/announce"

    def start(self) -> None:
        self.commands.start()
        self.publisher.start()
        self.mqtt.start()

    def stop(self, flush_timeout: float) -> None:
        """Flush the outbox for a bounded time, publish ``stopped``, disconnect."""
        if not self.publisher.stop(flush_timeout):
            log.warning("%d message(s) left in the outbox for the next start", len(self.outbox))
        self.commands.stop()
        final = status("stopped", self.config.device_id, self.session, self._model())
        self.mqtt.stop(encode(final))
        self.outbox.close()

    def publish_event(self, payload: dict[str, Any]) -> None:
        self.outbox.put(self.topics.events, encode(payload), self.config.mqtt.qos_events)

    def publish_telemetry(self, payload: dict[str, Any]) -> None:
        qos = self.config.mqtt.qos_telemetry
        self.mqtt.publish(self.topics.telemetry, encode(payload), qos=qos)

    def model_message(self) -> dict[str, Any]:
        ota = self._control.status() if self._control is not None else None
        return model_state(self.config.device_id, self._model(), ota)

    def publish_model(self) -> None:
        payload = encode(self.model_message())
        self.mqtt.publish(self.topics.model, payload, qos=1, retain=True)

    def ack_stall_s(self) -> float:
        """Seconds messages have waited for a PUBACK while connected (the watchdog's check)."""
        return self.publisher.ack_stall_s()

    def drop_connection(self) -> bool:
        """The watchdog's reconnect_link step: paho reconnects and resends the window."""
        return self.mqtt.drop_connection()

    def reply(self, name: str, payload: dict[str, Any]) -> None:
        self.mqtt.publish(self.topics.command_result(name[:200]), encode(payload), qos=1)

    def counters(self) -> dict[str, Any]:
        """The outbox's and the connection's counters, for telemetry."""
        return {
            "outbox": self.outbox.counters(),
            "mqtt": {
                "connected": self.mqtt.connected.is_set(),
                "connects": self.mqtt.connects,
                "connect_failures": self.mqtt.connect_failures,
                "published": self.publisher.published,
                "refused": self.publisher.refused,
                "resends": self.publisher.resends,
                "ack_stall_s": int(self.publisher.ack_stall_s()),
                "commands_handled": self.commands.handled,
                "commands_rejected": self.commands.rejected,
                "bad_messages": self.mqtt.bad_messages,
            },
        }

    def watched(self) -> Watched:
        """Counters whose rise is an event: messages the outbox dropped, publishes refused."""
        outbox = self.outbox.counters()
        return {
            "outbox_dropped": (
                outbox["dropped_overflow"]
                + outbox["dropped_expired"]
                + outbox["dropped_unwritten"],
                "outbox full, expired, or unwritable beyond its memory budget: oldest dropped",
                self.outbox.write_error,
            ),
            "outbox_write_failures": (
                outbox["write_failures"],
                "the outbox cannot write to disk (full?): messages wait in memory",
                self.outbox.write_error,
            ),
            "publish_refused": (
                self.publisher.refused,
                "broker refused publishes",
                self.publisher.last_refusal,
            ),
            "thread_restarts": (
                sum(threads.RESTARTS.values()),
                "background threads restarted after an exception",
                "; ".join(threads.LAST_CRASH.values()) or None,
            ),
            "bad_messages": (
                self.mqtt.bad_messages,
                "received messages dropped (too big, unparseable, or their handler failed)",
                self.mqtt.last_bad_message,
            ),
        }

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._control is not None and topic == self.announce_topic:
            spread = announce_spread(payload, self.config.ota.announce_jitter_s)
            log.info("channel announce received: checking for a model update within %.0f s", spread)
            self._control.nudge(spread)

    def _on_connected(self) -> None:
        """On every (re)connect: retained status, model and discovery configs."""
        online = status("online", self.config.device_id, self.session, self._model())
        self.mqtt.publish(self.topics.status, encode(online), qos=1, retain=True)
        self.publish_model()
        if self.config.mqtt.home_assistant.enabled:
            for topic, payload in home_assistant_configs(self.config, self.topics):
                self.mqtt.publish(topic, encode(payload), qos=1, retain=True)
