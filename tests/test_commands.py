"""Commands over a real broker: bad input gets an error reply and changes nothing."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.brokers import Mosquitto, Subscriber
from tests.conftest import AgentProcess, agent_config, wait_until
from tests.schemas import validate

PREFIX = "edge/dev1"


@pytest.fixture(scope="module")
def running(tmp_path_factory, fp32_model, bus_video):
    folder = tmp_path_factory.mktemp("commands")
    broker = Mosquitto(folder / "broker").start()
    sub = Subscriber(
        broker.port, [f"{PREFIX}/cmd/+/result", f"{PREFIX}/cmd/+/+/result", f"{PREFIX}/status"]
    ).start()
    config = agent_config(
        folder,
        fp32_model,
        {"uri": str(bus_video), "pace": "realtime", "loop": True},
        {"port": broker.port},
    )
    agent = AgentProcess(config)
    sub.wait_topic(f"{PREFIX}/status", timeout=60, where=lambda m: m.json()["state"] == "online")
    yield agent, sub
    code = agent.stop()
    sub.stop()
    broker.stop()
    assert code == 0, agent.log()


def ask(sub: Subscriber, name: str, payload: bytes | str | dict, timeout: float = 20) -> dict:
    """Send one command and return its reply. A dict payload gets a unique id and only the reply
    carrying that id counts (late replies to other commands may arrive meanwhile); raw payloads
    cannot carry one, so their reply is the next one on the topic."""
    topic = f"{PREFIX}/cmd/{name}/result"
    count = len(sub.on(topic))
    request_id = None
    if isinstance(payload, dict):
        request_id = f"req-{time.monotonic_ns()}"
        payload = json.dumps({**payload, "id": request_id})
    sub.publish(f"{PREFIX}/cmd/{name}", payload)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = [m.json() for m in sub.on(topic)[count:]]
        if request_id is not None:
            replies = [r for r in replies if r["id"] == request_id]
        if replies:
            validate(topic, replies[0])
            return replies[0]
        time.sleep(0.02)
    raise AssertionError(f"no reply on {topic}")


def current_thresholds(sub: Subscriber) -> dict:
    reply = ask(sub, "config/thresholds", {})
    assert reply["ok"]
    return reply["result"]


@pytest.mark.parametrize(
    ("name", "payload", "error"),
    [
        ("ping", b"{not json", "not valid UTF-8 JSON"),
        ("ping", b"\xff\xfe", "not valid UTF-8 JSON"),
        ("ping", b"[1, 2]", "must be a JSON object, got list"),
        ("ping", json.dumps({"id": {"nested": 1}}), "id must be a string or integer"),
        ("ping", json.dumps({"extra": 1}), "extra: unknown key"),
        ("reboot", "{}", "unknown command 'reboot'"),
        (
            "config/thresholds",
            json.dumps({"confidence": 5}),
            "confidence: Input should be less than or equal to 1",
        ),
        ("config/thresholds", json.dumps({"classes": ["unicorn"]}), "unknown classes 'unicorn'"),
        ("config/thresholds", json.dumps({"iou": "high"}), "iou: Input should be a valid number"),
        ("config/thresholds", json.dumps({"colour": "red"}), "colour: unknown key"),
        (
            "snapshot",
            json.dumps({"quality": 0}),
            "quality: Input should be greater than or equal to 1",
        ),
        ("ping", b"x" * 70_000, "payload too large: 70000 bytes (max 65536)"),
        ("ping", b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    ],
)
def test_bad_commands_get_an_error_reply_and_change_nothing(running, name, payload, error):
    agent, sub = running
    before = current_thresholds(sub)
    reply = ask(sub, name, payload)
    assert reply["ok"] is False
    assert error in reply["error"]
    assert current_thresholds(sub) == before
    assert agent.alive()


def test_command_replies_echo_the_request_id(running):
    _, sub = running
    reply = ask(sub, "ping", json.dumps({"id": 42}))
    assert reply["ok"] and reply["id"] == 42
    assert ask(sub, "ping", {})["result"]["pong"] is True


command_names = st.one_of(
    st.sampled_from(["ping", "snapshot", "config/thresholds", "reboot", "config", "a/b/c"]),
    st.text(
        alphabet=st.characters(blacklist_characters="+#/\x00", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "confidence": json_values,
            "iou": json_values,
            "classes": json_values,
            "max_detections": json_values,
            "quality": json_values,
            "all_classes": json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
)


def test_a_thousand_fuzzed_commands_leave_the_agent_running(running):
    agent, sub = running

    @settings(
        max_examples=1000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(name=command_names, payload=payloads)
    def send(name, payload):
        sub.client.publish(f"{PREFIX}/cmd/{name}", payload, qos=0)
        time.sleep(0.002)

    send()
    time.sleep(1.0)
    assert agent.alive(), agent.log()
    # the test's own client may be reconnecting after the flood (CI saw "not currently
    # connected" once): what is judged is the agent, so wait for the client, never for a time
    wait_until(sub.client.is_connected, 130, "the test's MQTT client to be connected")
    assert ask(sub, "ping", "{}")["ok"]
    assert ask(sub, "config/thresholds", json.dumps({"all_classes": True, "confidence": 0.25}))[
        "ok"
    ]
    assert "Traceback" not in agent.log()


def test_command_counters_are_reported_in_telemetry(running):
    _, sub = running
    ask(sub, "ping", {})
    ask(sub, "reboot", "{}")
    topic = f"{PREFIX}/telemetry"
    sub.client.subscribe(topic, qos=0)
    message = sub.wait_topic(topic, timeout=10)
    validate(topic, message.json())
    counters = message.json()["mqtt"]
    assert counters["commands_handled"] >= 1 and counters["commands_rejected"] >= 1
