"""The MQTT link against real Mosquitto brokers, with a real subscriber and the real model."""

from __future__ import annotations

import base64
import json
import signal
import time

import cv2
import numpy as np
import pytest

from tests.brokers import Subscriber
from tests.conftest import AgentProcess, agent_config
from tests.schemas import validate

PREFIX = "edge/dev1"


@pytest.fixture
def looping(bus_video):
    return {"uri": str(bus_video), "pace": "realtime", "loop": True}


def test_every_message_type_round_trips_and_matches_its_schema(
    tmp_path, broker, fp32_model, looping
):
    sub = Subscriber(broker.port, ["edge/#", "homeassistant/#"]).start()
    config = agent_config(
        tmp_path,
        fp32_model,
        looping,
        {
            "port": broker.port,
            "home_assistant": {"enabled": True, "classes": ["person", "bus"]},
        },
    )
    agent = AgentProcess(config)
    try:
        online = sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "online")
        assert online.json()["model"]["name"] == "yolov8n-coco-fp32"
        detections = sub.wait_topic(f"{PREFIX}/detections").json()
        assert detections["device_id"] == "dev1" and detections["detections"]
        telemetry = sub.wait_topic(f"{PREFIX}/telemetry").json()
        assert telemetry["system"]["rss_bytes"] > 0
        assert "gpus" not in telemetry  # no GPU here: absent, not zero
        started = sub.wait_topic(
            f"{PREFIX}/events", where=lambda m: m.json()["kind"] == "started"
        ).json()
        assert started["level"] == "info"
        model = sub.wait_topic(f"{PREFIX}/model").json()
        assert model["active"]["precision"] == "fp32"

        sub.publish(f"{PREFIX}/cmd/ping", json.dumps({"id": "p1"}))
        pong = sub.wait_topic(f"{PREFIX}/cmd/ping/result").json()
        assert pong["ok"] and pong["id"] == "p1" and pong["result"]["pong"] is True

        sub.publish(
            f"{PREFIX}/cmd/config/thresholds", json.dumps({"confidence": 0.6, "classes": ["bus"]})
        )
        changed = sub.wait_topic(f"{PREFIX}/cmd/config/thresholds/result").json()
        assert changed["ok"] and changed["result"]["confidence"] == 0.6
        later = time.time() + 0.5
        sub.wait_for(
            lambda m: (
                m.topic == f"{PREFIX}/detections"
                and m.at > later
                and all(d["label"] == "bus" and d["score"] > 0.6 for d in m.json()["detections"])
                and m.json()["detections"]
            ),
            what="detections under the new thresholds",
        )

        sub.publish(f"{PREFIX}/cmd/snapshot", json.dumps({"quality": 70}))
        snapshot = sub.wait_topic(f"{PREFIX}/cmd/snapshot/result").json()
        assert snapshot["ok"]
        jpeg = cv2.imdecode(
            np.frombuffer(base64.b64decode(snapshot["result"]["jpeg_base64"]), np.uint8),
            cv2.IMREAD_COLOR,
        )
        assert jpeg.shape == (480, 640, 3)

        discovery = sub.wait_topic("homeassistant/binary_sensor/dev1/person/config").json()
        assert discovery["state_topic"] == f"{PREFIX}/detections" and discovery["off_delay"] == 5
        sub.wait_topic("homeassistant/sensor/dev1/fps_out/config")
    finally:
        assert agent.stop() == 0, agent.log()
    stopped = sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "stopped")
    assert stopped.json()["session"] == online.json()["session"]
    sub.stop()
    outbound = [
        m
        for m in sub.messages
        if m.topic.startswith("edge/") and ("/cmd/" not in m.topic or m.topic.endswith("/result"))
    ]
    for message in outbound:
        validate(message.topic, message.json())
    assert {m.topic.split("/", 2)[2] for m in outbound} >= {
        "status",
        "detections",
        "telemetry",
        "events",
        "model",
        "cmd/ping/result",
        "cmd/config/thresholds/result",
        "cmd/snapshot/result",
    }
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_last_will_says_offline_when_the_agent_is_killed(
    tmp_path, broker, fp32_model, looping, protocol
):
    config = agent_config(
        tmp_path, fp32_model, looping, {"port": broker.port, "protocol": protocol}
    )
    agent = AgentProcess(config)
    sub = Subscriber(broker.port, [f"{PREFIX}/status"]).start()
    sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "online", timeout=60)
    agent.stop(signal.SIGKILL)
    offline = sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "offline")
    validate(offline.topic, offline.json())
    sub.stop()
    # a subscriber arriving later gets the retained last will
    late = Subscriber(broker.port, [f"{PREFIX}/status"]).start()
    assert late.wait_topic(f"{PREFIX}/status").json()["state"] == "offline"
    late.stop()


def frame_ids(messages):
    """(session, frame_id) in order of first arrival, duplicates (at-least-once) removed."""
    seen, ordered = set(), []
    for m in messages:
        record = m.json()
        key = (record["session"], record["frame_id"])
        if key not in seen:
            seen.add(key)
            ordered.append(key)
    return ordered


def jsonl_ids(path):
    return [json.loads(line)["frame_id"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_broker_outage_of_30_s_loses_no_detection(tmp_path, fp32_model, looping):
    from tests.brokers import Mosquitto

    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    # a persistent session: the broker keeps what arrives for the subscriber while it is away too
    sub = Subscriber(
        broker.port, [f"{PREFIX}/detections"], client_id="outage-watcher", clean=False
    ).start()
    agent = AgentProcess(agent_config(tmp_path, fp32_model, looping, {"port": broker.port}))
    try:
        sub.wait_topic(f"{PREFIX}/detections", timeout=60)
        sub.stop()
        before = sub.on(f"{PREFIX}/detections")
        broker.stop()  # at once: the frame in flight then is resent before anything newer
        outage = (time.time(), time.time() + 30)
        time.sleep(30)
        assert agent.alive(), agent.log()
        broker.start()
        sub = Subscriber(
            broker.port, [f"{PREFIX}/detections"], client_id="outage-watcher", clean=False
        )
        sub.start()
        time.sleep(2)
    finally:
        assert agent.stop() == 0, agent.log()
    expected = jsonl_ids(tmp_path / "out.jsonl")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = frame_ids(before + sub.on(f"{PREFIX}/detections"))
        if len(got) >= len(expected):
            break
        time.sleep(0.2)
    sub.stop()
    broker.stop()
    # ~30 s of frames went through the outbox: judged by their capture times, not by their count,
    # which depends on how fast this machine runs the model (278 frames in one loaded CI run)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    during = [r["timestamp"] for r in records if outage[0] <= r["timestamp"] <= outage[1]]
    assert len(during) >= 30 and max(during) - min(during) > 25
    assert [frame for _, frame in got] == expected
    assert len({session for session, _ in got}) == 1
    # 30 s of reconnect attempts: paho's "Client is not connected" is not an error a second
    assert "Client is not connected" not in agent.log(), agent.log()


def test_paho_while_disconnected_is_debug_not_error(caplog):
    import logging

    from agent.config import MqttConfig
    from agent.link.mqtt import new_client

    client = new_client(MqttConfig(), "never-connected")
    with caplog.at_level(logging.INFO):
        client.loop(timeout=0.01)  # no socket: paho logs at ERROR
    assert not [r for r in caplog.records if r.name == "paho"], caplog.text
    with caplog.at_level(logging.DEBUG, logger="paho"):
        client.loop(timeout=0.01)
    quiet = [r for r in caplog.records if "Client is not connected" in r.getMessage()]
    assert quiet and {r.levelname for r in quiet} == {"DEBUG"}


def test_outbox_is_replayed_in_order_after_an_agent_restart(tmp_path, fp32_model, bus_video):
    from tests.brokers import Mosquitto

    broker = Mosquitto(tmp_path / "broker")  # not started: the first run sees no broker at all
    source = {"uri": str(bus_video), "pace": "fast", "loop": True}
    first = AgentProcess(
        agent_config(tmp_path, fp32_model, source, {"port": broker.port}), "--frames", "30"
    )
    assert first.wait() == 0, first.log()
    assert "left in the outbox" in first.log()
    broker.start()
    sub = Subscriber(broker.port, [f"{PREFIX}/detections"]).start()
    second = AgentProcess(
        agent_config(tmp_path, fp32_model, source, {"port": broker.port}), "--frames", "10"
    )
    assert second.wait() == 0, second.log()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(frame_ids(sub.on(f"{PREFIX}/detections"))) < 40:
        time.sleep(0.1)
    got = frame_ids(sub.on(f"{PREFIX}/detections"))
    sub.stop()
    broker.stop()
    sessions = list(dict.fromkeys(session for session, _ in got))
    assert len(sessions) == 2
    assert got == [(sessions[0], i) for i in range(30)] + [(sessions[1], i) for i in range(10)]


def wait_for_log(agent: AgentProcess, text: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = agent.log()
        if log.count(text) >= count:
            return log
        assert agent.alive(), log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} x{count} not in the agent log:\n{agent.log()[-3000:]}")


def test_bad_credentials_are_reported_and_retried_while_detection_goes_on(
    tmp_path, fp32_model, looping
):
    from tests.brokers import Mosquitto

    broker = Mosquitto(tmp_path / "broker", users={"dev1": "right"}).start()
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("wrong\n")
    config = agent_config(
        tmp_path,
        fp32_model,
        looping,
        {
            "port": broker.port,
            "username": "dev1",
            "password_file": str(password_file),
        },
    )
    agent = AgentProcess(config)
    try:
        log = wait_for_log(agent, "broker refused the connection", count=2)
        assert "check mqtt.username and the password" in log
        assert "wrong" not in log  # the password is never logged
        # detection carries on meanwhile: wait for it (a loaded 2-core machine once wrote 3
        # frames by the second refusal), never count what fits in a time window
        deadline = time.monotonic() + 120
        out = tmp_path / "out.jsonl"
        while not out.exists() or len(out.read_text().splitlines()) <= 5:
            assert agent.alive() and time.monotonic() < deadline, agent.log()[-3000:]
            time.sleep(0.2)
        assert "MQTT connected" not in agent.log()
    finally:
        assert agent.stop() == 0, agent.log()
        broker.stop()


def test_acl_denial_is_reported_and_other_topics_still_flow(tmp_path, fp32_model, looping):
    from tests.brokers import Mosquitto

    acl = (
        "\n".join(
            [
                "user dev1",
                "topic readwrite edge/dev1/status",
                "topic readwrite edge/dev1/telemetry",
                "topic readwrite edge/dev1/events",
                "topic readwrite edge/dev1/model",
                "topic readwrite edge/dev1/cmd/#",
                "topic read edge/dev1/detections",  # may not publish detections
                "user watcher",
                "topic read edge/#",
            ]
        )
        + "\n"
    )
    broker = Mosquitto(
        tmp_path / "broker", users={"dev1": "pw1", "watcher": "pw2"}, acl=acl
    ).start()
    sub = Subscriber(broker.port, ["edge/#"], auth=("watcher", "pw2")).start()
    agent = AgentProcess(
        agent_config(
            tmp_path,
            fp32_model,
            looping,
            {
                "port": broker.port,
                "username": "dev1",
            },
        ),
        env={"EDGE_AGENT_MQTT__PASSWORD": "pw1"},
    )
    try:
        wait_for_log(agent, "broker refused a publish: Not authorized")
        refused = sub.wait_topic(
            f"{PREFIX}/events", where=lambda m: m.json()["kind"] == "publish_refused"
        )
        validate(refused.topic, refused.json())
        sub.wait_topic(f"{PREFIX}/telemetry")
        assert not sub.on(f"{PREFIX}/detections")
        assert agent.alive()
    finally:
        assert agent.stop() == 0, agent.log()
        sub.stop()
        broker.stop()


def test_tls_with_client_certificates(tmp_path, fp32_model, looping):
    from tests.brokers import Mosquitto, make_certificates

    certs = make_certificates(tmp_path / "certs")
    broker = Mosquitto(tmp_path / "broker", tls=certs).start()
    sub = Subscriber(broker.port, [f"{PREFIX}/#"], tls=certs).start()
    good = agent_config(
        tmp_path,
        fp32_model,
        looping,
        {
            "port": broker.port,
            "host": "localhost",
            "tls": {
                "ca_file": str(certs.ca),
                "cert_file": str(certs.client_cert),
                "key_file": str(certs.client_key),
            },
        },
    )
    agent = AgentProcess(good)
    try:
        sub.wait_topic(f"{PREFIX}/detections", timeout=60)
    finally:
        assert agent.stop() == 0, agent.log()
    # without its client certificate the agent is refused, says so, and keeps retrying
    (tmp_path / "b").mkdir()
    bare = agent_config(
        tmp_path / "b",
        fp32_model,
        looping,
        {"port": broker.port, "host": "localhost", "tls": {"ca_file": str(certs.ca)}},
    )
    agent = AgentProcess(bare)
    try:
        wait_for_log(agent, "MQTT", count=2)
        assert agent.alive()
    finally:
        assert agent.stop() == 0, agent.log()
        sub.stop()
        broker.stop()


def test_tls_files_that_do_not_exist_are_a_config_error(tmp_path, fp32_model, looping):
    config = agent_config(
        tmp_path, fp32_model, looping, {"tls": {"ca_file": str(tmp_path / "nope.pem")}}
    )
    agent = AgentProcess(config)
    assert agent.wait(60) == 1
    assert "mqtt.tls.ca_file: file not found" in agent.log() and "Traceback" not in agent.log()


def test_a_broker_that_stops_acknowledging_is_noticed_and_the_link_reconnected(
    tmp_path, fp32_model, looping
):
    """Issue 24: a dead MQTT side went unnoticed while the connection looked up. A frozen broker
    (SIGSTOP: the TCP connection stays open, nothing is acknowledged) within paho's keepalive:
    the watchdog sees messages waiting for a PUBACK while connected, cuts the connection, and
    the detections of the outage arrive once the broker is back; the agent exits 0."""
    from tests.brokers import Mosquitto

    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    try:
        _frozen_broker_is_noticed(tmp_path, fp32_model, looping, broker)
    finally:
        if broker.process is not None:
            broker.process.send_signal(signal.SIGCONT)
        broker.stop()


def _frozen_broker_is_noticed(tmp_path, fp32_model, looping, broker) -> None:
    sub = Subscriber(
        broker.port, [f"{PREFIX}/detections"], client_id="stall-watcher", clean=False
    ).start()
    config = agent_config(
        tmp_path, fp32_model, looping, {"port": broker.port, "keepalive_s": 300,
                                        "ack_timeout_s": 1},
        watchdog={"link_stall_s": 3, "verify_s": 2},
    )  # fmt: skip
    agent = AgentProcess(config)
    try:
        sub.wait_topic(f"{PREFIX}/detections", timeout=60)
        broker.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while "reconnect_link: MQTT connection cut" not in agent.log():
            assert time.monotonic() < deadline, agent.log()[-3000:]
            assert agent.alive(), agent.log()
            time.sleep(0.2)
        assert "MQTT: no acknowledgement for" in agent.log()
        broker.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        while "MQTT connected" not in agent.log().split("reconnect_link")[-1]:
            assert time.monotonic() < deadline, agent.log()[-3000:]
            time.sleep(0.2)
    finally:
        broker.process.send_signal(signal.SIGCONT)
        code = agent.stop()
    assert code == 0, agent.log()
    expected = jsonl_ids(tmp_path / "out.jsonl")
    deadline = time.monotonic() + 30
    while len(frame_ids(sub.on(f"{PREFIX}/detections"))) < len(expected):
        assert time.monotonic() < deadline, "detections of the stall never arrived"
        time.sleep(0.2)
    sub.stop()
    assert [frame for _, frame in frame_ids(sub.on(f"{PREFIX}/detections"))] == expected
