"""The systemd unit, `edge-agent service`, and the container images' Dockerfiles."""

from __future__ import annotations

import shutil
import subprocess
import sys

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
