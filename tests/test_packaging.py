"""The systemd unit, `edge-agent service`, and the container images' Dockerfiles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

UNIT = ROOT / "systemd" / "edge-agent.service"


def test_unit_has_the_protocol_restart_policy_and_hardening():
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=",
        "StartLimitBurst=",
        "StartLimitIntervalSec=",
        "User=edge-agent",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edge-agent",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "DeviceAllow=char-video4linux rw",
        "DeviceAllow=/dev/nvhost-ctrl-gpu rw",
        "DeviceAllow=/dev/rknpu rw",
        "SupplementaryGroups=video render",
        "EnvironmentFile=-/etc/edge-agent/edge-agent.env",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text, line


def test_service_install_dry_run_changes_nothing_and_lists_every_step(tmp_path):
    result = run_cli("service", "install", "--dry-run", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for step in (
        "would run useradd",
        "would write",
        "edge-agent.service",
        "would run systemctl daemon-reload",
        "would run systemctl enable --now edge-agent.service",
        # SupplementaryGroups= fails the unit (216/GROUP) where a group is missing
        "would run groupadd --system --force render",
        # the service reads its config as edge-agent
        "would run chgrp edge-agent /etc/edge-agent/agent.yaml",
    ):
        assert step in result.stdout
    assert not any(tmp_path.iterdir())


def test_service_install_into_a_root_writes_unit_config_and_secrets_file(tmp_path):
    result = run_cli("service", "install", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "etc/systemd/system/edge-agent.service"
    env = tmp_path / "etc/edge-agent/edge-agent.env"
    config = tmp_path / "etc/edge-agent/agent.yaml"
    assert "ExecStart=" in unit.read_text() and "@EXEC@" not in unit.read_text()
    # the venv's own script, found beside its Python though the venv is not on PATH
    assert f"ExecStart={Path(sys.executable).parent / 'edge-agent'} run" in unit.read_text()
    assert oct(env.stat().st_mode & 0o777) == "0o600"
    assert run_cli("config", "check", str(config)).returncode == 0
    config.write_text(config.read_text() + "\n# local edit\n")
    again = run_cli("service", "install", "--root", str(tmp_path))
    assert "keep existing" in again.stdout and "# local edit" in config.read_text()
    removed = run_cli("service", "uninstall", "--root", str(tmp_path))
    assert removed.returncode == 0 and not unit.exists() and config.exists()


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_installed_unit_passes_systemd_analyze_verify(tmp_path):
    run_cli("service", "install", "--root", str(tmp_path))
    unit = tmp_path / "etc/systemd/system/edge-agent.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    problems = [line for line in result.stderr.splitlines() if "edge-agent.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.arm64", "Dockerfile.jetson"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / dockerfile).read_text()
    assert text.count("FROM ") >= 2  # multi-stage: no build tools in the final image
    assert "HEALTHCHECK" in text and 'edge-agent", "health' in text
    assert "USER 10001:10001" in text and 'VOLUME ["/var/lib/edge-agent"]' in text


def test_service_install_refuses_without_root_and_says_so(monkeypatch):
    from agent.contract.errors import AgentError
    from agent.service import install

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(AgentError, match="needs root"):
        install()
    assert sys.executable


def test_under_systemd_each_log_line_carries_its_journal_priority(tmp_path):
    """journald reads a ``<N>`` prefix as the line's priority (``journalctl -p warning``); the
    agent adds it only when its stderr is the stream systemd named in JOURNAL_STREAM."""
    code = (
        "import logging; from agent.cli import _setup_logging; _setup_logging('INFO'); "
        "log = logging.getLogger('agent.test'); log.info('hello'); log.warning('two\\nlines')"
    )
    err = tmp_path / "stderr"
    with err.open("w") as stream:
        stat = err.stat()
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, cwd=ROOT, check=True)
    assert err.read_text().splitlines() == [
        "<6>INFO agent.test: hello",
        "<4>WARNING agent.test: two",
        "<4>lines",
    ]
    with err.open("w") as stream:  # not the journal's stream: timestamps, no prefixes
        env["JOURNAL_STREAM"] = "1:2"
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, cwd=ROOT, check=True)
    assert " INFO agent.test: hello" in err.read_text() and "<6>" not in err.read_text()


def test_health_check_answers_without_importing_the_agent(tmp_path):
    """The containers' HEALTHCHECK runs `edge-agent health` every 30 s: on a Raspberry Pi the
    whole CLI's imports (OpenCV, pydantic, ONNX Runtime) would cost seconds of CPU each time."""
    code = (
        "import sys; from agent.entry import main; "
        f"sys.argv = ['edge-agent', 'health', '--state-dir', {str(tmp_path)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n"
        "    heavy = sorted({'cv2', 'pydantic', 'onnxruntime', 'numpy'} & set(sys.modules))\n"
        "    print(exit.code, heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "1 []", result.stdout + result.stderr
    assert "no health file" in result.stderr
