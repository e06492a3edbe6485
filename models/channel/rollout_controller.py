"""``edge-models rollout --auto``: read the fleet from the broker, decide, sign, announce, report.

One pass: the release from the channel, every device's retained ``status`` and ``model`` from the
broker, a decision (``rollout.decide``), then the change signed with the online keys (the root
key is never needed), the decision published retained on ``{prefix}/fleet/{channel}/rollout``,
and after a raise an announce on ``{prefix}/fleet/{channel}/announce`` so the devices now in the
cohort look soon (each after its own jitter). Every decision is also printed, and appended to a
JSON-lines log when one is given. Run it as a loop beside the publisher, or once from cron.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import MqttConfig
from agent.contract import Release
from agent.link import FleetView, Watcher
from models.channel.publish import open_repository, set_rollout, withdraw
from models.channel.rollout import (
    Decision,
    RolloutPolicy,
    decide,
    download_spread_s,
    read_device,
)
from models.errors import FactoryError

ANNOUNCE_SCHEMA = "edge-agent/announce/v1"
FINAL_ACTIONS = ("complete", "halt", "withdrawn")


def find_release(channel: Path, keys: Path, name: str, version: str) -> tuple[Release, str]:
    """The release and the channel's name, as signed on disk.

    Raises:
        FactoryError: not a channel, or no such release in it.
    """
    with open_repository(channel, keys) as repo:
        index = repo.index()
    release = index.release(name, version)
    if release is None:
        known = ", ".join(f"{r.name} {r.version}" for r in index.releases) or "none"
        raise FactoryError(f"{name} {version} is not in channel {channel} (releases: {known})")
    return release, index.channel


@dataclass
class ControllerSettings:
    channel: Path
    keys: Path
    name: str
    version: str
    policy: RolloutPolicy
    log: Path | None = None
    announce: bool = True
    egress_mbps: float | None = None  # spread a raise's downloads to stay under this


class RolloutController:
    """Drives one release through its steps from what the fleet reports."""

    def __init__(self, settings: ControllerSettings, mqtt: MqttConfig) -> None:
        self.settings = settings
        _, self.channel_name = find_release(
            settings.channel, settings.keys, settings.name, settings.version
        )
        self.prefix = mqtt.prefix
        self.view = FleetView(mqtt.prefix, leaves=("status", "model"))
        self.watcher = Watcher(mqtt, self.view)
        self.say: Callable[[Decision], None] = lambda d: print(d.line(), flush=True)

    @property
    def rollout_topic(self) -> str:
        return f"{self.prefix}/fleet/{self.channel_name}/rollout"

    @property
    def announce_topic(self) -> str:
        return f"{self.prefix}/fleet/{self.channel_name}/announce"

    def connect(self, timeout: float, settle_s: float) -> None:
        """Connect and take in the retained state; nothing is signed before this succeeds.

        Raises:
            WatchError: the broker cannot be reached or refuses us.
        """
        self.watcher.connect(timeout=timeout)
        deadline = time.monotonic() + settle_s
        last = time.monotonic()  # retained messages arrive in one burst: wait for a quiet 0.5 s
        while time.monotonic() < deadline and time.monotonic() - last < 0.5:
            if self.watcher.changed.wait(0.1):
                self.watcher.changed.clear()
                last = time.monotonic()

    def close(self) -> None:
        self.watcher.close()

    def step(self, now: float | None = None) -> Decision:
        """One decision, applied, published and logged."""
        s = self.settings
        release, _ = find_release(s.channel, s.keys, s.name, s.version)
        with self.watcher.lock:
            views = list(self.view.devices.values())
        reports = [r for v in views if (r := read_device(v.device_id, v.status, v.model))]
        decision = decide(release, reports, s.policy, now, self.channel_name)
        if decision.action == "raise" and s.egress_mbps is not None:
            decision.spread_s = download_spread_s(
                release, reports, decision.new_percent, s.egress_mbps, self.channel_name
            )
        if decision.action == "raise":
            set_rollout(s.channel, s.keys, s.name, s.version, decision.new_percent)
        elif decision.withdraw:
            withdraw(s.channel, s.keys, s.name, s.version, decision.reason)
        self._publish(self.rollout_topic, decision.message(self.channel_name), retain=True)
        if decision.action == "raise" and s.announce:
            self._publish(self.announce_topic, self._announcement(decision), retain=False)
        self._record(decision)
        return decision

    def run(self, interval_s: float, once: bool) -> Decision:
        """Decide every ``interval_s`` until the release completes, halts or is withdrawn."""
        while True:
            decision = self.step()
            if once or decision.action in FINAL_ACTIONS:
                return decision
            time.sleep(interval_s)

    def _announcement(self, decision: Decision) -> dict[str, Any]:
        message = {
            "schema": ANNOUNCE_SCHEMA,
            "name": decision.name,
            "version": decision.version,
            "rollout_percent": decision.new_percent,
            "timestamp": decision.timestamp,
        }
        if decision.spread_s is not None:
            message["spread_s"] = decision.spread_s
        return message

    def _publish(self, topic: str, payload: dict[str, Any], retain: bool) -> None:
        info = self.watcher.client.publish(topic, json.dumps(payload), qos=1, retain=retain)
        info.wait_for_publish(timeout=10)

    def _record(self, decision: Decision) -> None:
        self.say(decision)
        if self.settings.log is not None:
            self.settings.log.parent.mkdir(parents=True, exist_ok=True)
            with self.settings.log.open("a") as handle:
                handle.write(json.dumps(decision.message(self.channel_name)) + "\n")
