"""Unattended operation: the watchdog and its escalation ladder, systemd notify, the service unit.

This wing imports only ``agent.config`` and ``agent.contract``; what it supervises (the
pipeline, the ladder's steps) is handed to it by the wiring in ``agent.runtime``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> module, imported on first use: ``edge-agent health`` (a container's HEALTHCHECK, every
# 30 s) then loads the health module alone, not the watchdog, the config and pydantic
_HOMES = {
    "Notifier": "notify",
    "RestartGuard": "watchdog",
    "Supervisor": "watchdog",
    "install": "unit_install",
    "quick_check": "health",
    "read_health": "health",
    "service_status": "unit_install",
    "uninstall": "unit_install",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'agent.service' has no attribute {name!r}")
    return getattr(import_module(f"agent.service.{_HOMES[name]}"), name)


__all__ = [
    "Notifier",
    "RestartGuard",
    "Supervisor",
    "install",
    "quick_check",
    "read_health",
    "service_status",
    "uninstall",
]
