"""``edge-agent watch``: a fleet view built only from the topics, on a real broker and agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from agent.link import FleetView
from tests.brokers import Mosquitto
from tests.conftest import ROOT, AgentProcess, agent_config, run_cli


@pytest.fixture
def running_agent(tmp_path, broker, fp32_model, bus_video):
    source = {"uri": str(bus_video), "pace": "realtime", "loop": True}
    agent = AgentProcess(agent_config(tmp_path, fp32_model, source, {"port": broker.port}))
    yield agent
    assert agent.stop() == 0, agent.log()


def watch_json(broker, *args: str, wait: float = 15) -> subprocess.CompletedProcess:
    return run_cli(
        "watch", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--once", "--json",
        "--wait", str(wait), *args,
    )  # fmt: skip


def test_watch_once_json_shows_a_running_agents_status_model_and_telemetry(broker, running_agent):
    result = watch_json(broker)
    assert result.returncode == 0, result.stderr + running_agent.log()
    snapshot = json.loads(result.stdout)
    row = snapshot["devices"]["dev1"]
    assert row["state"] == "online"
    assert row["model"] == "yolov8n-coco-fp32" and row["precision"] == "fp32"
    assert row["fps_out"] is not None and row["stages_ms"]["inference"]["p50"] > 0
    assert row["outbox_depth"] is not None and row["cpu_percent"] is not None
    assert list(row["cameras"]) == ["main"] and row["cameras"]["main"]["fps_out"] is not None


def test_watch_once_against_a_broker_without_agents_says_so(broker):
    result = watch_json(broker, wait=1)
    assert result.returncode == 2
    assert json.loads(result.stdout)["devices"] == {}
    assert "no agents seen under edge/" in result.stderr


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:1883", "bad --broker URL"),
        ("mqtt://", "bad --broker URL"),
        ("mqtt://127.0.0.1:99999", "bad --broker URL"),
    ],
)
def test_watch_refuses_a_bad_broker_url_in_one_line(url, message):
    result = run_cli("watch", "--broker", url, "--once")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_watch_says_in_one_line_when_the_broker_cannot_be_reached(tmp_path):
    from tests.brokers import free_port

    result = run_cli("watch", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--once")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach broker 127.0.0.1" in lines[0], result.stderr


def test_watch_says_in_one_line_when_the_broker_refuses_the_credentials(tmp_path):
    secured = Mosquitto(tmp_path / "secured", users={"operator": "right"}).start()
    try:
        password = tmp_path / "password"
        password.write_text("wrong\n")
        result = run_cli(
            "watch", "--broker", f"mqtt://127.0.0.1:{secured.port}", "--username", "operator",
            "--password-file", str(password), "--once",
        )  # fmt: skip
    finally:
        secured.stop()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the connection" in lines[0], result.stderr
    assert "--username" in lines[0]


def test_fleet_view_skips_payloads_that_are_not_json_objects_and_foreign_topics():
    view = FleetView("edge")
    assert view.update("edge/cam1/telemetry", b"not json") is None
    assert view.update("edge/cam1/telemetry", b"[1, 2]") is None
    assert view.update("other/cam1/status", b'{"state": "online"}') is None
    assert view.update("edge/cam1/cmd/ping", b"{}") is None
    assert view.malformed == 2
    assert view.update("edge/cam1/status", b'{"state": "online"}') is not None
    assert view.snapshot()["devices"]["cam1"]["state"] == "online"


def test_watch_in_a_real_terminal_shows_the_device_row_and_model_version(
    tmp_path, broker, running_agent
):
    """As a person sees it: the live view in tmux, its pane captured."""
    tmux = shutil.which("tmux")
    assert tmux, "tmux is missing: scripts/setup.sh installs it (Debian package tmux)"
    session = f"watch-{time.monotonic_ns()}"
    # a person's terminal: its own size (pytest exports COLUMNS=80 to its children)
    command = (
        f"cd {ROOT} && env -u COLUMNS -u LINES {sys.executable} -m agent.cli watch "
        f"--broker mqtt://127.0.0.1:{broker.port}"
    )
    subprocess.run(
        [tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "40", command], check=True
    )
    try:
        screen = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            if "dev1" in screen and "fp32" in screen and "online" in screen:
                break
            time.sleep(0.5)
        assert "dev1" in screen and "online" in screen, screen + running_agent.log()
        assert "yolov8n-coco-fp32" in screen and "sha256:" in screen, screen  # name and version
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)
