"""The whole device: `edge-agent run` with mosquitto and nginx, the CLI, and SIGKILL anywhere."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.brokers import Subscriber
from tests.channel_server import Nginx
from tests.conftest import AgentProcess, agent_config, run_cli
from tests.schemas import validate

PREFIX = "edge/dev1"


# Updates that must go live are a new build of the running fp32 model (conftest.update_model),
# so probation's timing verdict is judged with the limits a device uses.
PROBATION = {"frames": 15, "seconds": 30, "min_frames": 5}


def ota_settings(channel, url: str, **extra) -> dict:
    return {
        "enabled": True,
        "channel": url,
        "root": str(channel.root),
        "model_name": "yolov8n-coco",
        "first_check_s": 3600,
        "announce_jitter_s": 0,
        "retry_backoff_s": 0.2,
        "probation": PROBATION,
        **extra,
    }


def wait_until(predicate, timeout: float = 60, what: str = "condition", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log()[-3000:]}" if log else ""))


def read_state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state" / "models" / "state.json").read_text())


@pytest.fixture
def looping(bus_video):
    return {"uri": str(bus_video), "pace": "realtime", "loop": True}


def test_update_over_mqtt_with_retained_model_state_and_the_cli(
    tmp_path, broker, fp32_model, update_model, update_golden, channel, looping
):
    channel.publish(update_model, "1.1.0", update_golden)
    server = Nginx(tmp_path / "nginx", channel.folder).start()
    sub = Subscriber(broker.port, ["edge/#"]).start()
    config = agent_config(
        tmp_path, fp32_model, looping, {"port": broker.port}, ota=ota_settings(channel, server.url)
    )
    agent = AgentProcess(config)
    try:
        sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "online")
        sub.publish("edge/fleet/stable/announce", json.dumps({"version": "1.1.0"}))
        committed = sub.wait_topic(
            f"{PREFIX}/events", timeout=60, where=lambda m: m.json()["kind"] == "ota_committed"
        ).json()
        assert committed["details"]["version"] == "1.1.0"

        retained = Subscriber(broker.port, [f"{PREFIX}/model"]).start()
        model = retained.wait_topic(
            f"{PREFIX}/model", where=lambda m: m.json()["active"]["version"] == "1.1.0"
        ).json()
        retained.stop()
        assert model["ota"]["last_outcome"]["result"] == "committed"
        assert model["ota"]["previous"]["name"] == "yolov8n-coco-fp32"

        status = run_cli("model", "status", "-c", str(config), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["active"]["version"] == "1.1.0"

        sub.publish(f"{PREFIX}/cmd/model/rollback", json.dumps({"id": "r1"}))
        reply = sub.wait_topic(f"{PREFIX}/cmd/model/rollback/result").json()
        assert reply["ok"] and reply["result"]["active"].startswith("sha256:"), reply

        pinned = run_cli("model", "pin", "1.1.0", "-c", str(config))
        assert pinned.returncode == 0, pinned.stderr
        assert "pinned: 1.1.0" in pinned.stdout

        sub.publish(f"{PREFIX}/cmd/model/pin", json.dumps({"version": "not-a-version"}))
        bad = sub.wait_topic(f"{PREFIX}/cmd/model/pin/result").json()
        assert not bad["ok"] and "semantic version" in bad["error"]
        sub.publish(f"{PREFIX}/cmd/ota/check", json.dumps({}))
        assert sub.wait_topic(f"{PREFIX}/cmd/ota/check/result").json()["result"]["queued"]
    finally:
        code = agent.stop()
        server.stop()
        sub.stop()
    assert code == 0, agent.log()
    for message in sub.messages:
        if message.topic.startswith(PREFIX) and "/cmd/" not in message.topic:
            validate(message.topic, message.json())
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    ids = [r["frame_id"] for r in rows]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "frames were dropped across swaps"
    assert "dropped 0" in agent.log().split("fps")[-1]


def test_cli_edits_the_state_of_a_stopped_agent(
    tmp_path, fp32_model, update_model, update_golden, channel, looping
):
    channel.publish(update_model, "1.1.0", update_golden)
    settings = ota_settings(channel, channel.folder.as_uri(), first_check_s=0)
    config = agent_config(tmp_path, fp32_model, looping, ota=settings)
    agent = AgentProcess(config)
    try:
        wait_until(
            lambda: (
                (tmp_path / "state/models/state.json").exists()
                and (read_state(tmp_path).get("last_outcome") or {}).get("result") == "committed"
            ),
            what="the update to commit",
            log=agent.log,
        )
    finally:
        assert agent.stop() == 0
    status = run_cli("model", "status", "-c", str(config))
    assert "not running" in status.stdout and "1.1.0 (slot" in status.stdout
    rolled = run_cli("model", "rollback", "-c", str(config))
    assert rolled.returncode == 0 and "base model" in rolled.stdout, rolled.stderr
    assert read_state(tmp_path)["active"] is None
    check = run_cli("ota", "check", "-c", str(config))
    assert check.returncode == 0 and "up to date" in check.stdout, check.stdout + check.stderr
    bad = run_cli("model", "pin", "latest", "-c", str(config))
    assert bad.returncode == 2 and "semantic version" in bad.stderr


def _slots(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "state/models/slots").iterdir()}


def _assert_consistent(tmp_path: Path) -> dict:
    """What a restart finds: a parseable state whose named slots exist whole; no temp files."""
    state = read_state(tmp_path)
    for key in ("active", "previous", "staged"):
        record = state.get(key)
        if record and record["slot"]:
            path = Path(record["path"])
            assert path.is_file() and path.stat().st_size == record["length"], (key, record)
    leftovers = [p.name for p in (tmp_path / "state/models").glob(".*.partial")]
    assert not leftovers, leftovers
    return state


@pytest.mark.parametrize("phase", ["download", "staging", "swap", "probation"])
def test_sigkill_at_any_phase_restarts_consistently_and_finishes_the_update(
    phase, tmp_path, fp32_model, update_model, update_golden, channel, looping
):
    channel.publish(update_model, "1.1.0", update_golden)
    server = Nginx(
        tmp_path / "nginx", channel.folder, rate="400k" if phase == "download" else "0"
    ).start()
    probation = {"frames": 100_000, "seconds": 600} if phase == "probation" else {}
    settings = ota_settings(
        channel,
        server.url,
        first_check_s=0,
        probation={**PROBATION, **probation},
    )
    config = agent_config(tmp_path, fp32_model, looping, ota=settings)
    failpoints = {"staging": "staging=30", "swap": "swap=30"}.get(phase, "")
    agent = AgentProcess(config, env={"EDGE_AGENT_FAILPOINTS": failpoints})
    downloads = tmp_path / "state/models/downloads"
    try:
        if phase == "download":
            wait_until(
                lambda: any(p.stat().st_size > 1_000_000 for p in downloads.glob("*.part")),
                what="the download to be under way",
                log=agent.log,
            )
        elif phase in ("staging", "swap"):
            wait_until(lambda: f"failpoint {phase}" in agent.log(), what=phase, log=agent.log)
        else:
            wait_until(
                lambda: "event ota_activated" in agent.log(), what="activation", log=agent.log
            )
    finally:
        agent.stop(signal.SIGKILL)

    state = _assert_consistent(tmp_path)
    if phase == "download":
        assert state["active"] is None and state["staged"] is None
        assert any(downloads.glob("*.part"))  # kept, to resume
    elif phase == "staging":
        assert state["staged"] is None  # the slot was never named: garbage
    elif phase == "swap":
        assert state["staged"]["version"] == "1.1.0"  # live in memory only; not on disk
        assert state["active"] is None
    else:
        assert state["probation"]["version"] == "1.1.0"

    server.stop()
    server.rate = "0"
    server.start()
    settings = ota_settings(
        channel,
        server.url,
        first_check_s=0,
        probation=PROBATION,
    )
    restarted = AgentProcess(agent_config(tmp_path, fp32_model, looping, ota=settings))
    try:
        wait_until(
            lambda: (read_state(tmp_path).get("last_outcome") or {}).get("result") == "committed",
            timeout=90,
            what="the update to finish after the restart",
            log=restarted.log,
        )
        final = _assert_consistent(tmp_path)
    finally:
        code = restarted.stop()
        server.stop()
    assert code == 0, restarted.log()
    assert final["active"]["version"] == "1.1.0"
    assert _slots(tmp_path) == {final["active"]["slot"]}
    if phase == "download":
        assert "resuming at" in restarted.log()
        length = update_model.stat().st_size
        assert server.bytes_sent("model.onnx") < 1.5 * length  # both runs together
