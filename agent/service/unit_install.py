"""``edge-agent service install|uninstall|status``: the systemd unit, its user and its folders.

Every change is a plain step that ``--dry-run`` prints instead of doing. ``--root DIR`` writes
files under DIR (for packaging and tests) and only prints the steps that act on the running
system (user creation, systemctl).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.contract.errors import AgentError

UNIT = "edge-agent.service"
USER = "edge-agent"
DEVICE_GROUPS = ("video", "render")  # cameras (V4L2) and GPU/NPU render nodes


class ServiceError(AgentError):
    """A service step failed; the message says which and why."""


@dataclass(frozen=True)
class Layout:
    root: Path

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def unit(self) -> Path:
        return self.at(f"/etc/systemd/system/{UNIT}")

    @property
    def config(self) -> Path:
        return self.at("/etc/edge-agent/agent.yaml")

    @property
    def env_file(self) -> Path:
        return self.at("/etc/edge-agent/edge-agent.env")

    @property
    def state_dir(self) -> Path:
        return self.at("/var/lib/edge-agent")


def unit_text(executable: str) -> str:
    template = _shipped("edge-agent.service")
    return template.replace("@EXEC@", executable)


def _shipped(name: str) -> str:
    """Files from systemd/ (package data: agent/systemd links to it in the source tree)."""
    return resources.files("agent").joinpath(f"systemd/{name}").read_text()


def _executable() -> str:
    """The edge-agent that runs this install: the script beside this Python (a venv's bin, which
    is rarely on root's PATH), else the one on PATH, else this Python with the module."""
    beside = Path(sys.executable).parent / "edge-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("edge-agent")
    return found or f"{sys.executable} -m agent.cli"


class Steps:
    """Runs (or prints) each step of a service action."""

    def __init__(self, dry_run: bool, live: bool) -> None:
        self.dry_run, self.live = dry_run, live
        self.log: list[str] = []

    def _say(self, text: str) -> None:
        self.log.append(text)
        print(("would " if self.dry_run else "") + text)

    def write(self, path: Path, text: str, mode: int = 0o644, keep_existing: bool = False) -> None:
        if keep_existing and path.exists():
            self._say(f"keep existing {path}")
            return
        self._say(f"write {path} (mode {mode:o})")
        if not self.dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(mode)

    def mkdir(self, path: Path, mode: int = 0o750) -> None:
        self._say(f"create {path} (mode {mode:o})")
        if not self.dry_run:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)

    def remove(self, path: Path) -> None:
        self._say(f"remove {path}")
        if not self.dry_run:
            path.unlink(missing_ok=True)

    def run(self, *command: str, check: bool = True) -> None:
        """A command acting on the running system: only with a live root, never in a dry run."""
        if self.dry_run or not self.live:
            self.log.append("run " + " ".join(command))
            print(
                ("would run " if self.dry_run else "skipped (not the live root): ")
                + " ".join(command)
            )
            return
        self._say("run " + " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise ServiceError(
                f"{' '.join(command)} failed: {result.stderr.strip() or result.returncode}"
            )


def _steps(root: Path, dry_run: bool, action: str) -> Steps:
    live = root == Path("/")
    if live and not dry_run and os.geteuid() != 0:
        raise ServiceError(
            f"{action} the service needs root (try sudo, or --dry-run to see the steps)"
        )
    return Steps(dry_run, live)


def install(root: Path = Path("/"), dry_run: bool = False, enable: bool = True) -> list[str]:
    steps = _steps(root, dry_run, "installing")
    layout = Layout(root)
    steps.run(
        "useradd",
        "--system",
        "--no-create-home",
        "--home-dir",
        "/var/lib/edge-agent",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        USER,
        check=False,
    )
    # the unit's SupplementaryGroups: systemd refuses to start it (216/GROUP) if one is missing,
    # and a minimal image without udev has no render group
    for group in DEVICE_GROUPS:
        steps.run("groupadd", "--system", "--force", group)
    steps.run("usermod", "-aG", ",".join(DEVICE_GROUPS), USER)
    steps.mkdir(layout.state_dir)
    steps.run("chown", f"{USER}:{USER}", "/var/lib/edge-agent")
    steps.write(layout.config, _shipped("agent.example.yaml"), 0o640, keep_existing=True)
    # the service reads it as edge-agent: root owns it, the group may read it
    steps.run("chgrp", USER, "/etc/edge-agent/agent.yaml")
    steps.run("chmod", "g+r", "/etc/edge-agent/agent.yaml")
    steps.write(
        layout.env_file,
        "# secrets for edge-agent, e.g.\n# EDGE_AGENT_MQTT__PASSWORD=...\n",
        0o600,
        keep_existing=True,
    )
    steps.write(layout.unit, unit_text(_executable()), 0o644)
    steps.run("systemctl", "daemon-reload")
    if enable:
        steps.run("systemctl", "enable", "--now", UNIT)
    return steps.log


def uninstall(root: Path = Path("/"), dry_run: bool = False, purge: bool = False) -> list[str]:
    steps = _steps(root, dry_run, "removing")
    layout = Layout(root)
    steps.run("systemctl", "disable", "--now", UNIT, check=False)
    steps.remove(layout.unit)
    steps.run("systemctl", "daemon-reload")
    if purge:
        steps.remove(layout.config)
        steps.remove(layout.env_file)
        steps.run("rm", "-rf", "/var/lib/edge-agent")
        steps.run("userdel", USER, check=False)
    return steps.log


def service_status() -> tuple[int, str]:
    if shutil.which("systemctl") is None:
        return 1, "systemctl not found: not a systemd machine"
    result = subprocess.run(
        ["systemctl", "status", "--no-pager", UNIT], capture_output=True, text=True
    )
    return (0 if result.returncode == 0 else 1), (result.stdout or result.stderr).strip()
