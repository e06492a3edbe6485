"""Unattended operation: the watchdog and its escalation ladder, systemd notify, the service unit.

This wing imports only ``agent.config`` and ``agent.contract``; what it supervises (the
pipeline, the ladder's steps) is handed to it by the wiring in ``agent.runtime``.
"""

from agent.service.install import install, service_status, uninstall
from agent.service.notify import Notifier
from agent.service.watchdog import RestartGuard, Supervisor, read_health

__all__ = [
    "Notifier",
    "RestartGuard",
    "Supervisor",
    "install",
    "read_health",
    "service_status",
    "uninstall",
]
