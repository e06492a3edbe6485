"""The service under a real systemd, as PID 1 of an amd64 Debian booted in systemd-nspawn: the
unit the project ships, installed with `edge-agent service install`, and what systemd does with
it when the agent crashes, hangs or is stopped. (The arm64 board runs the same install under
qemu in test_board_arm64.py; natively these checks take a minute, not ten.)"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.brokers import Mosquitto, Subscriber
from tests.device.conftest import board, board_config, install_as_a_user

pytestmark = pytest.mark.slow
UNIT = "edge-agent.service"


def active_with_new_pid(device, old_pid: int):
    def check() -> bool:
        state = device.unit(UNIT, "ActiveState", "MainPID")
        return state["ActiveState"] == "active" and int(state["MainPID"]) not in (0, old_pid)

    return check


def test_systemd_restarts_a_crashed_or_hung_agent_and_stops_it_cleanly(
    tmp_path, shared, agent_wheel
):
    prefix = "edge/board-amd64"
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    sub = Subscriber(broker.port, ["edge/#"], client_id="watcher", clean=False).start()
    device = board("amd64", tmp_path / "board", shared, agent_wheel)
    try:
        device.boot(timeout=300)
        config = board_config(broker.port, "board-amd64")
        device.write("/etc/edge-agent/agent.yaml", yaml.safe_dump(config))
        install_as_a_user(device, agent_wheel)
        assert device.unit(UNIT, "UnitFileState")["UnitFileState"] == "enabled"
        device.wait_until(
            lambda: device.unit(UNIT, "ActiveState")["ActiveState"] == "active",
            300,
            "the service to report READY=1",
        )
        online = lambda m: m.json()["state"] == "online"  # noqa: E731
        sub.wait_topic(f"{prefix}/status", timeout=120, where=online)
        session = sub.wait_topic(f"{prefix}/detections", timeout=120).json()["session"]

        # a crash while the broker is away: what was waiting in the outbox survives the restart
        broker.stop()
        first = device.main_pid(UNIT)
        outbox = "/var/lib/edge-agent/outbox.sqlite"
        device.wait_until(lambda: pending(device, outbox) >= 5, 120, "detections held offline")
        device.run("systemctl", "kill", "-s", "SIGKILL", UNIT)
        killed_at = time.time()
        device.wait_until(active_with_new_pid(device, first), 120, "systemd to restart it")
        assert int(device.unit(UNIT, "NRestarts")["NRestarts"]) >= 1
        broker.start()  # kept our subscriber's session: it misses nothing sent before it is back
        sub.wait_for(
            lambda m: m.topic == f"{prefix}/detections" and m.at > killed_at
            and m.json()["session"] == session,
            timeout=120,
            what="detections of the killed process, delivered after its restart",
        )  # fmt: skip

        # a hang: the main loop stopped (SIGSTOP) stops the WATCHDOG=1 pings; systemd kills it
        hung = device.main_pid(UNIT)
        restarts = int(device.unit(UNIT, "NRestarts")["NRestarts"])
        device.run("kill", "-STOP", str(hung))
        device.wait_until(active_with_new_pid(device, hung), 300, "the watchdog to restart it")
        assert int(device.unit(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
        assert "Watchdog timeout" in device.run("journalctl", "--no-pager", "-u", UNIT).stdout

        # a clean stop: `stopped` on MQTT, exit status 0, nothing for systemd to complain about
        sub.wait_topic(
            f"{prefix}/status", timeout=120, where=lambda m: online(m) and m.at > killed_at
        )
        device.run("systemctl", "stop", UNIT, timeout=120)
        state = device.unit(UNIT, "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        stopped = sub.wait_topic(
            f"{prefix}/status", where=lambda m: m.json()["state"] == "stopped"
        ).json()
        assert stopped["device_id"] == "board-amd64"

        # the journal: the agent's lines, each with its own priority
        journal = device.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout
        entries = [json.loads(line) for line in journal.splitlines()]
        agent_lines = [e for e in entries if e.get("_COMM", "") in ("edge-agent", "python3")]
        assert any("agent.runtime" in e["MESSAGE"] for e in agent_lines), agent_lines[-5:]
        priorities = {e["PRIORITY"] for e in agent_lines}
        assert {"6", "4"} <= priorities, priorities  # info, and the warnings of the outage
    finally:
        try:
            device.shutdown()
        finally:
            sub.stop()
            broker.stop()


def pending(device, outbox: str) -> int:
    """Rows waiting in the agent's outbox (sqlite on the device's disk)."""
    code = (
        f"import sqlite3; db = sqlite3.connect('file:{outbox}?mode=ro', uri=True); "
        "print(db.execute('select count(*) from messages').fetchone()[0])"
    )
    result = device.run("/opt/edge-agent/bin/python", "-c", code, check=False)
    return int(result.stdout) if result.returncode == 0 and result.stdout.strip() else 0
