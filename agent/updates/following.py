"""Which model line and which target this device follows: one answer for the daemon, the CLI
(``edge-agent target``, ``ota check``) and what ``watch`` shows from the ``model`` topic.

The line is ``ota.model_name``, else the name of the model running from a slot, else the base
model's own name. The target is ``ota.target``, else the target detected here as the configured
backend runs it: an RK3588 running RKNN follows ``rk3588``, the same board on ONNX Runtime
follows ``cpu-aarch64``, a Jetson on TensorRT follows its ``jetson-*`` class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig, OtaConfig
from agent.contract import Detected, targets
from agent.updates.model_store import SlotRecord


@dataclass(frozen=True)
class Following:
    line: str | None  # None: no line can be named (no OTA name, no model readable)
    target: str
    channel: str
    detected: Detected

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "target": self.target, "channel": self.channel}

    def describe(self) -> str:
        line = self.line or "(no model line: set ota.model_name or give the config)"
        return f"{line} for {self.target} on channel {self.channel}"


def followed_target(ota: OtaConfig, backend: str, detected: Detected | None = None) -> str:
    """The target whose releases this device takes (see the module's docstring)."""
    if ota.target:
        return ota.target
    return targets.for_backend((detected or targets.detect()).target, backend)


def following(
    config: AgentConfig,
    active: SlotRecord | None,
    base_name: Callable[[], str | None],
    detected: Detected | None = None,
) -> Following:
    """What ``config`` makes this device follow, given its active slot (None: the base model);
    ``base_name`` reads the base model's name, only when the line depends on it."""
    detected = detected or targets.detect()
    line = config.ota.model_name or (active.name if active is not None else None) or base_name()
    target = followed_target(config.ota, config.model.backend, detected)
    return Following(line, target, config.ota.channel_name, detected)
