"""The health-gated rollout: decisions on recorded fleets, the release's withdrawal on both ends,
the command's bad input, and the controller end to end with simulated devices against a real
Mosquitto and a real nginx."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from agent.contract.descriptor import INDEX_SCHEMA, ChannelIndex, Release, in_rollout
from agent.link import announce_spread, model_state, status
from agent.updates.ota import choose
from models.channel import set_rollout, withdraw
from models.channel.rollout import (
    DeviceReport,
    RolloutPolicy,
    decide,
    download_spread_s,
    parse_steps,
    read_device,
)
from models.errors import FactoryError
from tests.brokers import Subscriber
from tests.schemas import validate
from tests.test_publish import index_of, models_cli

NAME, VERSION = "yolov8n-coco", "1.1.0"
NOW = 1_800_000_000.0
POLICY = RolloutPolicy(soak_s=60)


def release(percent: float, **extra) -> Release:
    return Release.model_validate(
        {
            "name": NAME,
            "version": VERSION,
            "rollout_percent": percent,
            "variants": {"cpu-x86_64": {"descriptor": "d/descriptor.json", "model_length": 10}},
            "rollout_updated": "2027-01-15T06:00:00+00:00",  # NOW is 08:00
            **extra,
        }
    )


def device(index: int, outcome: str = "pending", online: bool = True, **extra) -> DeviceReport:
    """A device as its retained messages would describe it after ``outcome`` with VERSION."""
    fields: dict = {"active_version": "1.0.0"}
    if outcome == "committed":
        fields = {"active_version": VERSION, "last_outcome": {"result": "committed"}}
    elif outcome == "failed":
        fields["rejected"] = {VERSION: "probation failed: fps 3.1 < 5"}
        fields["last_outcome"] = {"result": "rolled_back", "version": VERSION}
    elif outcome == "probation":
        fields = {"active_version": "1.0.0", "probation_version": VERSION}
    elif outcome == "postponed":  # a soft probation failure: sent back, tried again later
        fields["last_outcome"] = {"result": "postponed", "version": VERSION}
    defaults = {"channel": "stable", "model_name": NAME, "target": "cpu-x86_64"}
    return DeviceReport(f"cam-{index:04d}", online, **{**defaults, **fields, **extra})


def cohort(percent: float, count: int) -> list[int]:
    return [i for i in range(count) if in_rollout(f"cam-{i:04d}", NAME, VERSION, percent)]


def fleet(percent: float, count: int, outcomes: dict[int, str] | None = None, default="pending"):
    """``count`` devices; those in the cohort get ``default`` unless ``outcomes`` says else."""
    members = set(cohort(percent, count))
    outcomes = outcomes or {}
    return [
        device(i, outcomes.get(i, default if i in members else "pending")) for i in range(count)
    ]


# -- decisions on recorded fleets ---------------------------------------------------------------
def test_a_healthy_cohort_is_raised_to_the_next_step():
    decision = decide(release(5), fleet(5, 400, default="committed"), POLICY, NOW)
    assert (decision.action, decision.new_percent) == ("raise", 25)
    assert decision.counts["committed"] == len(cohort(5, 400)) > 5
    assert decision.counts["cohort"] == len(cohort(5, 400)) and decision.counts["eligible"] == 400


def test_a_step_soaks_before_the_next_raise():
    fresh = release(5, rollout_updated="2027-01-15T07:59:30+00:00")
    decision = decide(fresh, fleet(5, 400, default="committed"), POLICY, NOW)
    assert decision.action == "hold" and decision.reason == "soaking at 5%: 30 of 60 s"


def test_a_raise_waits_until_enough_of_the_cohort_committed():
    members = cohort(25, 100)
    outcomes = {i: "committed" for i in members[: len(members) // 2]}
    decision = decide(release(25), fleet(25, 100, outcomes), POLICY, NOW)
    assert decision.action == "hold" and decision.new_percent == 25
    assert f"{len(members) // 2} of {len(members)} reachable devices" in decision.reason


def test_one_bad_device_in_a_large_cohort_does_not_halt_the_rollout():
    members = cohort(25, 200)
    outcomes = {members[0]: "failed"}
    decision = decide(release(25), fleet(25, 200, outcomes, default="committed"), POLICY, NOW)
    assert decision.action == "raise" and decision.new_percent == 100
    assert decision.failures == {f"cam-{members[0]:04d}": "probation failed: fps 3.1 < 5"}


def test_a_bad_release_halts_with_the_most_common_reason():
    members = cohort(5, 400)
    outcomes = {i: "failed" if n % 2 else "committed" for n, i in enumerate(members)}
    decision = decide(release(5), fleet(5, 400, outcomes), POLICY, NOW)
    assert decision.action == "halt" and decision.new_percent == 5 and not decision.withdraw
    assert "in the 5% cohort failed it" in decision.reason
    assert "most often: probation failed: fps 3.1 < 5" in decision.reason
    withdrawing = RolloutPolicy(withdraw_on_halt=True)
    decision = decide(release(5), fleet(5, 400, outcomes), withdrawing, NOW)
    assert decision.action == "halt" and decision.withdraw and decision.new_percent == 0


def test_postponed_probations_are_unknown_outcomes_that_never_halt_a_release():
    members = cohort(5, 400)
    outcomes = {i: "postponed" if n % 2 else "committed" for n, i in enumerate(members)}
    decision = decide(release(5), fleet(5, 400, outcomes), POLICY, NOW)
    assert decision.action == "hold" and decision.counts["failed"] == 0
    assert decision.counts["pending"] >= len(members) // 2


def test_a_halt_needs_enough_outcomes_unless_the_cohort_is_smaller():
    members = cohort(5, 400)
    assert len(members) > POLICY.min_outcomes
    decision = decide(release(5), fleet(5, 400, {members[0]: "failed"}), POLICY, NOW)
    assert decision.action == "hold"  # one failure among one outcome: not yet evidence
    small = [device(0, "failed"), device(1, "committed")]
    decision = decide(release(100), small, POLICY, NOW)
    assert decision.action == "halt"  # the whole cohort has spoken: 1 of 2 failed


def test_offline_devices_neither_count_nor_block_a_raise():
    members = cohort(25, 100)
    reports = fleet(25, 100, default="committed")
    for i in members[:5]:  # never took it, went away
        reports[i] = device(i, "pending", online=False)
    decision = decide(release(25), reports, POLICY, NOW)
    assert decision.action == "raise" and decision.counts["offline"] == 5


def test_stale_retained_probation_of_a_device_gone_offline_does_not_block_completion():
    reports = fleet(100, 30, default="committed")
    reports[3] = device(3, "probation", online=False)  # its last words, retained by the broker
    decision = decide(release(100), reports, POLICY, NOW)
    assert decision.action == "complete" and decision.counts["offline"] == 1
    reports[3] = device(3, "probation", online=True)
    assert decide(release(100), reports, POLICY, NOW).action == "hold"


def test_an_empty_cohort_is_raised_at_once_and_no_one_online_holds():
    reports = [device(i) for i in range(20) if i not in cohort(1, 20)]
    decision = decide(release(1, rollout_updated=None), reports, POLICY, NOW)
    assert decision.action == "raise" and decision.new_percent == 5
    offline = [device(i, online=False) for i in range(20)]
    decision = decide(release(1), offline, POLICY, NOW)
    assert decision.action == "hold" and "online" in decision.reason


def test_devices_of_other_lines_channels_targets_and_old_agents_are_not_counted():
    others = [
        device(1, model_name="yolov8s-coco"),
        device(2, channel="beta"),
        device(3, target="cpu-aarch64"),
        device(4, agent_version="0.0.1"),
    ]
    ok = device(5, agent_version="99.0.0", channel=None)  # an agent older than the channel field
    rel = release(100, min_agent_version="0.1.0")
    decision = decide(rel, [*others, ok], POLICY, NOW, channel="stable")
    assert decision.counts["eligible"] == 1


def test_a_device_pinned_into_the_release_outside_the_cohort_is_reported():
    outside = next(i for i in range(100) if i not in cohort(5, 100))
    reports = fleet(5, 100, {outside: "committed"}, default="committed")
    decision = decide(release(5), reports, POLICY, NOW)
    assert decision.counts["outside_cohort"] == 1


def test_a_withdrawn_release_is_left_alone():
    decision = decide(release(0, withdrawn="crashes on Orin"), [device(1)], POLICY, NOW)
    assert decision.action == "withdrawn" and decision.new_percent == 0


@pytest.mark.parametrize(
    "steps", ["", "0,100", "5,1,100", "1,5,25", "1,5,150", "one,two"], ids=repr
)
def test_rollout_steps_must_rise_to_100(steps):
    with pytest.raises(ValueError, match="steps"):
        RolloutPolicy(steps=parse_steps(steps))


def test_device_reports_are_read_from_the_agent_s_own_messages():
    from agent.vision import BackendInfo

    info = BackendInfo(
        "onnxruntime", "CPU", "m.onnx", NAME, VERSION, "images", (1, 3, 640, 640),
        "float32", "output0", (1, 84, 8400), {0: "person"}, 32, "int8",
    )  # fmt: skip
    ota = {
        "active": {"slot": "a", "path": "m.onnx", "name": NAME, "version": VERSION},
        "probation": None,
        "rejected": {"1.0.9": "self-test failed"},
        "last_outcome": {"result": "committed", "version": VERSION},
        "target": "cpu-x86_64",
        "model_name": NAME,
        "channel": "stable",
        "pinned": None,
    }
    report = read_device(
        "cam-1", status("online", "cam-1", "s", info), model_state("cam-1", info, ota)
    )
    assert report is not None and report.online and report.active_version == VERSION
    assert report.rejected == {"1.0.9": "self-test failed"}
    assert read_device("cam-2", None, model_state("cam-2", info)) is None  # OTA off
    assert read_device("cam-3", None, {"ota": {"active": "garbage"}}) is None


def test_a_raise_spreads_only_the_newcomers_downloads_over_the_egress_budget():
    reports = fleet(25, 400, default="committed")  # the 25% cohort has the release already
    newcomers = len(cohort(100, 400)) - len(cohort(25, 400))
    spread = download_spread_s(release(25), reports, 100, egress_mbps=0.008)  # 1000 bytes/s
    assert spread == pytest.approx(newcomers * 10 / 1000, abs=0.1)  # model_length is 10 bytes


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"{}", 30.0),
        (b'{"spread_s": 600}', 600.0),
        (b'{"spread_s": 5}', 30.0),  # never sooner than the device's own jitter
        (b'{"spread_s": 1e9}', 6 * 3600.0),
        (b'{"spread_s": NaN}', 30.0),
        (b'{"spread_s": true}', 30.0),
        (b'{"spread_s": "600"}', 30.0),
        (b"[1]", 30.0),
        (b"\xff", 30.0),
    ],
)
def test_an_announce_can_spread_a_fleet_out_but_never_hurry_it(payload, expected):
    assert announce_spread(payload, 30.0) == expected


# -- withdrawal on both ends --------------------------------------------------------------------
def test_a_withdrawn_release_is_never_offered_except_to_a_pin():
    index = ChannelIndex.model_validate(
        {"schema": INDEX_SCHEMA, "channel": "stable", "releases": [release(100).model_dump()]}
    )
    assert choose(index, NAME, "cpu-x86_64", "cam-1", "1.0.0") is not None
    index.releases[0].withdrawn = "bad on AVX2"
    assert choose(index, NAME, "cpu-x86_64", "cam-1", "1.0.0") is None
    assert choose(index, NAME, "cpu-x86_64", "cam-1", "1.0.0", pinned=VERSION) is not None


def test_withdraw_drops_the_share_to_zero_and_a_withdrawn_release_cannot_be_raised(
    channel, dynamic_model, golden_set
):
    channel.publish(dynamic_model, VERSION, golden_set, rollout_percent=5)
    old = set_rollout(channel.folder, channel.keys, NAME, VERSION, 25)
    assert old == 5 and index_of(channel.folder, channel.keys).releases[0].rollout_updated
    withdraw(channel.folder, channel.keys, NAME, VERSION, "rolls back on 40% of devices")
    entry = index_of(channel.folder, channel.keys).releases[0]
    assert entry.withdrawn == "rolls back on 40% of devices" and entry.rollout_percent == 0
    with pytest.raises(FactoryError, match="was withdrawn"):
        set_rollout(channel.folder, channel.keys, NAME, VERSION, 50)


# -- the command's bad input ----------------------------------------------------------------------
def _metadata(channel) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (channel.folder / "metadata").iterdir()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--version", "9.9.9", "--auto"], "9.9.9 is not in channel"),
        (["--version", VERSION, "--percent", "150"], "between 0 and 100"),
        (["--version", VERSION, "--auto", "--steps", "5,1"], "must rise"),
        (["--version", VERSION, "--auto", "--max-failure-rate", "2"], "max_failure_rate"),
        (["--version", VERSION, "--withdraw", " "], "needs a reason"),
        (["--version", VERSION, "--auto", "--broker", "mqtt://127.0.0.1:1"], "cannot reach"),
    ],
    ids=["unknown-release", "percent", "steps", "rate", "no-reason", "broker-unreachable"],
)
def test_bad_rollout_input_is_one_line_and_changes_nothing(
    channel, dynamic_model, golden_set, args, message
):
    channel.publish(dynamic_model, VERSION, golden_set, rollout_percent=5)
    before = _metadata(channel)
    result = models_cli(
        "rollout", "--channel", channel.folder, "--keys", channel.keys, "--name", NAME, *args,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert _metadata(channel) == before


# -- end to end: the controller and simulated devices, real broker and channel server -------------
@pytest.fixture
def simulated(tmp_path, broker, channel):
    from agent.config import MqttConfig
    from tests.channel_server import Nginx
    from tests.fleet_devices import FleetSettings, SimulatedFleet

    server = Nginx(tmp_path / "nginx", channel.folder, connections=256).start()
    failing: set[str] = set()
    settings = FleetSettings(
        broker=MqttConfig(host="127.0.0.1", port=broker.port, prefix="edge"),
        channel_url=server.url,
        root=channel.root,
        work=tmp_path / "devices",
        announce_jitter_s=0.5,
        probation_s=0.5,
        workers=4,
        fails=lambda index, version: version in failing,
    )
    fleet = SimulatedFleet(settings, 20)
    fleet.start()
    yield fleet, failing, server
    fleet.stop()
    server.stop()


def _controller(channel, broker, tmp_path, version, *extra, timeout=120):
    return models_cli(
        "rollout", "--auto", "--channel", channel.folder, "--keys", channel.keys,
        "--name", NAME, "--version", version, "--steps", "10,50,100", "--soak", "0",
        "--interval", "0.5", "--broker", f"mqtt://127.0.0.1:{broker.port}",
        "--log", tmp_path / f"rollout-{version}.jsonl", *extra, timeout=timeout,
    )  # fmt: skip


def _decisions(tmp_path, version) -> list[dict]:
    lines = (tmp_path / f"rollout-{version}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_good_release_reaches_everyone_in_steps_and_a_bad_one_halts_at_its_first_cohort(
    simulated, channel, broker, tmp_path, dynamic_model, golden_set
):
    fleet, failing, _ = simulated
    ids = [d.device_id for d in fleet.devices]
    # the root key is offline (not beside the online keys): the controller never needs it
    shutil.rmtree(channel.keys / "offline", ignore_errors=True)
    watcher = Subscriber(broker.port, ["edge/fleet/stable/+"]).start()

    channel.publish(dynamic_model, VERSION, golden_set, rollout_percent=0)
    good = _controller(channel, broker, tmp_path, VERSION, "--egress-mbps", "1000")
    assert good.returncode == 0, good.stdout + good.stderr
    decisions = _decisions(tmp_path, VERSION)
    raises = [d for d in decisions if d["action"] == "raise"]
    assert [d["new_percent"] for d in raises] == [10, 50, 100]
    assert decisions[-1]["action"] == "complete" and decisions[-1]["counts"]["committed"] == 20
    assert fleet.took(VERSION) == set(ids)
    for record in (r for r in fleet.records if r.kind == "downloaded"):
        # a device took the release only after a raise put it in the cohort
        reached = next(d for d in raises if in_rollout(record.device_id, NAME, VERSION,
                                                       d["new_percent"]))  # fmt: skip
        assert record.at >= reached["timestamp"] - 0.5

    bad = "1.2.0"
    failing.add(bad)
    channel.publish(dynamic_model, bad, golden_set, rollout_percent=0)
    halted = _controller(channel, broker, tmp_path, bad, "--withdraw-on-halt", "--steps", "25,100")
    assert halted.returncode == 4, halted.stdout + halted.stderr
    final = _decisions(tmp_path, bad)[-1]
    assert final["action"] == "halt" and final["percent"] == 25 and final["withdraw"]
    first_cohort = {i for i in ids if in_rollout(i, NAME, bad, 25)}
    assert fleet.took(bad) <= first_cohort and fleet.took(bad)
    retained = watcher.wait_topic(
        "edge/fleet/stable/rollout", where=lambda m: json.loads(m.payload)["action"] == "halt"
    )
    assert "failed it" in json.loads(retained.payload)["reason"]
    fleet_messages = [m for m in watcher.messages if m.payload]
    assert {m.topic for m in fleet_messages} == {
        "edge/fleet/stable/rollout",
        "edge/fleet/stable/announce",
    }
    for message in fleet_messages:  # every decision and announce, as the schemas say
        validate(message.topic, json.loads(message.payload))
    announced = [json.loads(m.payload) for m in watcher.on("edge/fleet/stable/announce")]
    assert [a["rollout_percent"] for a in announced if a["version"] == VERSION] == [10, 50, 100]
    assert all("spread_s" in a for a in announced if a["version"] == VERSION)
    entry = index_of(channel.folder, channel.keys).release(NAME, bad)
    assert entry.withdrawn and entry.rollout_percent == 0

    # after the withdrawal, an announce reaches every device and none takes the bad release
    checks = sum(r.kind == "check" for r in fleet.records)
    watcher.publish("edge/fleet/stable/announce", b"{}")
    deadline = time.monotonic() + 20
    while sum(r.kind == "check" for r in fleet.records) < checks + 20:
        assert time.monotonic() < deadline, "the devices did not all check after the announce"
        time.sleep(0.1)
    time.sleep(1.0)
    assert fleet.took(bad) <= first_cohort
    watcher.stop()
