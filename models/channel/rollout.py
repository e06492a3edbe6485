"""Health-gated staged rollout: from what devices report, raise a release's share, hold, or halt.

The decision reads only what any subscriber of the broker can read: each device's retained
``status`` and ``model`` messages. It puts each device in or out of the release's cohort with
the hash the devices themselves use (``in_rollout``), so it knows exactly which devices the
current percentage reaches, and it judges the release only by them: a step is raised while the
devices that took it committed it, and the rollout halts when failures in the cohort pass a
threshold (after enough outcomes to mean something, as AWS IoT jobs' abort criteria do).

Everything here is a pure function of (release, device reports, policy, clock), tested on
recorded fleets; ``rollout_controller`` does the MQTT, the signing and the loop.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from agent.contract import Release, in_rollout, semver_key, targets

ROLLOUT_SCHEMA = "edge-agent/rollout/v1"
FAILED_RESULTS = ("rolled_back", "rejected")
# where a device of the cohort stands with the release
STANDINGS = ("committed", "failed", "probation", "pending", "offline", "superseded", "pinned")
Action = Literal["raise", "hold", "halt", "complete", "withdrawn"]


@dataclass(frozen=True)
class RolloutPolicy:
    """When to raise and when to stop. Defaults follow a cautious exponential rollout."""

    steps: tuple[float, ...] = (1.0, 5.0, 25.0, 100.0)
    max_failure_rate: float = 0.10  # failed / (committed + failed) in the cohort that halts
    min_outcomes: int = 5  # outcomes before the rate can halt (a smaller cohort: all of it)
    success_share: float = 0.90  # of the cohort's reachable devices committed before a raise
    soak_s: float = 600.0  # at least this long at a step before the next
    withdraw_on_halt: bool = False

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps or any(not 0.0 < s <= 100.0 for s in steps):
            raise ValueError(f"rollout steps must be percentages in (0, 100], got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] != 100.0:
            raise ValueError(f"rollout steps must rise and end at 100, got {steps}")
        for name in ("max_failure_rate", "success_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.min_outcomes < 1 or self.soak_s < 0:
            raise ValueError("min_outcomes must be >= 1 and soak_s >= 0")

    def next_step(self, percent: float) -> float | None:
        """The first step above ``percent``; None once the release reaches everyone."""
        return next((step for step in self.steps if step > percent), None)


def parse_steps(text: str) -> tuple[float, ...]:
    """``"1,5,25,100"`` -> (1.0, 5.0, 25.0, 100.0); RolloutPolicy checks the values."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"rollout steps must be numbers separated by commas, got {text!r}"
        ) from None


@dataclass
class DeviceReport:
    """One device as its retained messages describe it."""

    device_id: str
    online: bool
    agent_version: str | None = None
    channel: str | None = None
    model_name: str | None = None
    target: str | None = None
    active_version: str | None = None
    probation_version: str | None = None
    pinned: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    last_outcome: dict[str, Any] = field(default_factory=dict)


def read_device(
    device_id: str, status: dict[str, Any] | None, model: dict[str, Any] | None
) -> DeviceReport | None:
    """A report from a device's retained ``status`` and ``model``; None when the device follows
    no channel (no OTA state) or its messages are not what the schemas promise."""
    if not isinstance(model, dict) or not isinstance(model.get("ota"), dict):
        return None
    ota = model["ota"]
    try:
        running = (model.get("active") or {}).get("version")
        slot = ota.get("active") or {}
        probation = ota.get("probation") or {}
        return DeviceReport(
            device_id=device_id,
            online=isinstance(status, dict) and status.get("state") == "online",
            agent_version=(status or {}).get("agent_version"),
            channel=ota.get("channel"),
            model_name=ota.get("model_name"),
            target=ota.get("target"),
            active_version=slot.get("version") or running,
            probation_version=probation.get("version"),
            pinned=ota.get("pinned"),
            rejected=dict(ota.get("rejected") or {}),
            last_outcome=dict(ota.get("last_outcome") or {}),
        )
    except (AttributeError, TypeError, ValueError):
        return None


def eligible(device: DeviceReport, release: Release, channel: str | None) -> bool:
    """Would this device take the release at 100%: same line and channel, a variant it can run,
    an agent new enough."""
    if device.model_name != release.name:
        return False
    if channel is not None and device.channel not in (None, channel):
        return False  # an agent older than the channel field is judged by its model line alone
    if not any(t in release.variants for t in targets.preferences(device.target or "")):
        return False
    return device.agent_version is None or semver_key(device.agent_version) >= semver_key(
        release.min_agent_version
    )


def standing(device: DeviceReport, release: Release) -> str:
    """Where a device stands with the release: one of STANDINGS."""
    version = release.version
    outcome = device.last_outcome
    if version in device.rejected or (
        outcome.get("version") == version and outcome.get("result") in FAILED_RESULTS
    ):
        return "failed"
    if device.probation_version == version:
        return "probation" if device.online else "offline"
    if device.active_version == version:
        return "committed"
    if device.active_version and semver_key(device.active_version) > semver_key(version):
        return "superseded"
    if device.pinned is not None and device.pinned != version:
        return "pinned"
    return "pending" if device.online else "offline"


def took(device: DeviceReport, release: Release) -> bool:
    return standing(device, release) in ("committed", "failed", "probation")


@dataclass
class Decision:
    """What the controller does now and why; published on ``{prefix}/fleet/{channel}/rollout``."""

    action: Action
    name: str
    version: str
    percent: float  # the share before this decision
    new_percent: float  # the share after it
    reason: str
    counts: dict[str, int]
    failures: dict[str, str] = field(default_factory=dict)  # device -> why (first few)
    withdraw: bool = False
    spread_s: float | None = None  # a raise: how long the newcomers should spread their downloads
    timestamp: float = field(default_factory=lambda: round(time.time(), 3))

    def message(self, channel: str) -> dict[str, Any]:
        return {"schema": ROLLOUT_SCHEMA, "channel": channel, **asdict(self)}

    def line(self) -> str:
        share = (
            f"{self.percent:g}% -> {self.new_percent:g}%"
            if self.new_percent != self.percent
            else f"{self.percent:g}%"
        )
        return f"{self.action} {self.name} {self.version} {share}: {self.reason}"


def _started(release: Release) -> float | None:
    stamp = release.rollout_updated or release.published
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None


def tally(
    release: Release, devices: Iterable[DeviceReport], channel: str | None = None
) -> tuple[Counter[str], dict[str, str]]:
    """Counts of the cohort's standings (plus ``eligible``, ``cohort``, ``outside_cohort``:
    devices that took the release though the share does not reach them, by a pin) and the
    failed devices' reasons."""
    counts: Counter[str] = Counter({key: 0 for key in STANDINGS})
    failures: dict[str, str] = {}
    for device in devices:
        if not eligible(device, release, channel):
            continue
        counts["eligible"] += 1
        counts["eligible_online"] += device.online
        if not in_rollout(device.device_id, release.name, release.version, release.rollout_percent):
            counts["outside_cohort"] += took(device, release)
            continue
        counts["cohort"] += 1
        where = standing(device, release)
        counts[where] += 1
        if where == "failed":
            failures[device.device_id] = device.rejected.get(release.version) or str(
                device.last_outcome.get("reason") or "failed"
            )
    for key in ("eligible", "eligible_online", "cohort", "outside_cohort"):
        counts.setdefault(key, 0)
    return counts, failures


def decide(
    release: Release,
    devices: Iterable[DeviceReport],
    policy: RolloutPolicy,
    now: float | None = None,
    channel: str | None = None,
) -> Decision:
    """The next move for ``release`` given the fleet's reports."""
    now = time.time() if now is None else now
    percent = release.rollout_percent
    counts, failures = tally(release, devices, channel)

    def decision(action: Action, reason: str, new: float = percent, **extra: Any) -> Decision:
        shown = dict(list(failures.items())[:20])
        return Decision(
            action, release.name, release.version, percent, new, reason, dict(counts), shown,
            **extra,
        )  # fmt: skip

    if release.withdrawn is not None:
        return decision("withdrawn", f"withdrawn: {release.withdrawn}")
    committed, failed = counts["committed"], counts["failed"]
    reachable = committed + failed + counts["probation"] + counts["pending"]
    outcomes = committed + failed
    needed = max(1, min(policy.min_outcomes, reachable))
    if failed and outcomes >= needed and failed / outcomes > policy.max_failure_rate:
        common = Counter(failures.values()).most_common(1)[0][0]
        reason = (
            f"{failed} of {outcomes} devices in the {percent:g}% cohort failed it "
            f"({failed / outcomes:.0%} > {policy.max_failure_rate:.0%}); most often: {common}"
        )
        if policy.withdraw_on_halt:
            return decision("halt", reason + "; withdrawn", 0.0, withdraw=True)
        return decision("halt", reason)
    in_flight = counts["probation"] + counts["pending"]
    step = policy.next_step(percent)
    if step is None:
        if in_flight:
            return decision("hold", f"{committed} committed, {in_flight} still to finish")
        return decision("complete", f"{committed} committed, {failed} failed")
    if counts["eligible_online"] == 0:
        return decision("hold", "no device that would take this release is online")
    if reachable == 0:
        return decision("raise", f"no reachable device in the {percent:g}% cohort yet", step)
    started = _started(release)
    soaked = now - started if started is not None else policy.soak_s
    if soaked < policy.soak_s:
        return decision("hold", f"soaking at {percent:g}%: {soaked:.0f} of {policy.soak_s:g} s")
    needed_commits = math.ceil(policy.success_share * reachable)
    if committed < needed_commits:
        return decision(
            "hold",
            f"{committed} of {reachable} reachable devices in the {percent:g}% cohort committed "
            f"(a raise needs {needed_commits}); {in_flight} still to finish",
        )
    return decision(
        "raise", f"{committed} of {reachable} committed, {failed} failed at {percent:g}%", step
    )


def download_spread_s(
    release: Release,
    devices: Iterable[DeviceReport],
    new_percent: float,
    egress_mbps: float,
    channel: str | None = None,
) -> float:
    """Seconds over which the devices a raise adds should spread their downloads so that the
    channel serves at most ``egress_mbps`` on average (the announce carries it as ``spread_s``;
    a device never waits less than its own jitter)."""
    newcomers = sum(
        1
        for d in devices
        if eligible(d, release, channel)
        and not took(d, release)
        and in_rollout(d.device_id, release.name, release.version, new_percent)
        and not in_rollout(d.device_id, release.name, release.version, release.rollout_percent)
    )
    size = max(variant.model_length for variant in release.variants.values())
    return round(newcomers * size * 8 / (egress_mbps * 1e6), 1)
