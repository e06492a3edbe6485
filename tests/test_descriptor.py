"""Channel metadata meaning: safe target names, semantic versions, rollout, variant choice."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract.descriptor import (
    INDEX_SCHEMA,
    ChannelFormatError,
    ChannelIndex,
    check_target_path,
    in_rollout,
    parse,
)
from agent.contract.versions import semver_key
from agent.updates.ota import choose


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "models/../../x.onnx",
        "/abs/model.onnx",
        "models//x.onnx",
        "models/./x.onnx",
        "models\\x.onnx",
        "models/.hidden",
        "a/" * 200 + "x",
    ],
)
def test_target_paths_that_leave_the_channel_are_refused(path):
    with pytest.raises(ValueError, match="unsafe target path"):
        check_target_path(path)


def test_plain_target_paths_are_accepted():
    assert check_target_path("models/yolov8n/1.2.0/cpu-x86_64/model.onnx")


def test_semantic_versions_order_like_semver_org():
    ordered = ["0.9.9", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta", "1.0.0", "1.0.1", "1.10.0"]
    assert sorted(reversed(ordered), key=semver_key) == ordered


def test_rollout_is_stable_and_only_grows_with_the_percentage():
    devices = [f"cam-{i:04d}" for i in range(4000)]
    chosen = {p: {d for d in devices if in_rollout(d, "m", "1.0.0", p)} for p in (10, 50, 100)}
    assert chosen[10] <= chosen[50] <= chosen[100] == set(devices)
    assert 300 < len(chosen[10]) < 500  # about 10 %, from a hash, not a list
    assert chosen[10] == {d for d in devices if in_rollout(d, "m", "1.0.0", 10)}


@given(st.text(min_size=1, max_size=40))
def test_no_device_is_in_a_zero_percent_rollout(device_id):
    assert not in_rollout(device_id, "m", "1.0.0", 0.0)


def _index(*releases: dict) -> ChannelIndex:
    return ChannelIndex.model_validate(
        {"schema": INDEX_SCHEMA, "channel": "stable", "releases": list(releases)}
    )


def _release(version: str, targets=("cpu-x86_64",), rollout=100.0, min_agent="0.0.0") -> dict:
    return {
        "name": "yolo",
        "version": version,
        "rollout_percent": rollout,
        "min_agent_version": min_agent,
        "variants": {
            t: {"descriptor": f"models/yolo/{version}/{t}/descriptor.json", "model_length": 9}
            for t in targets
        },
    }


def test_choice_takes_the_newest_runnable_release_for_this_target():
    index = _index(
        _release("1.1.0"),
        _release("1.3.0", targets=("jetson-orin",)),
        _release("1.2.0"),
        _release("2.0.0", min_agent="99.0.0"),
        _release("1.4.0", rollout=0.0),
        {**_release("0.5.0"), "name": "other"},
    )
    release, target, _ = choose(index, "yolo", "cpu-x86_64", "dev1", "1.0.0")
    assert (release.version, target) == ("1.2.0", "cpu-x86_64")
    assert choose(index, "yolo", "cpu-x86_64", "dev1", "1.2.0") is None
    assert choose(index, "yolo", "cpu-x86_64", "dev1", None, rejected={"1.2.0": "bad"})[
        0
    ].version == ("1.1.0")
    release, target, _ = choose(index, "yolo", "jetson-orin", "dev1", "1.0.0")
    assert (release.version, target) == ("1.3.0", "jetson-orin")


def test_a_pin_selects_exactly_its_version_even_an_older_or_rejected_one():
    index = _index(_release("1.1.0"), _release("1.2.0"))
    release, _, _ = choose(
        index, "yolo", "cpu-x86_64", "dev1", "1.2.0", pinned="1.1.0", rejected={"1.1.0": "x"}
    )
    assert release.version == "1.1.0"
    assert choose(index, "yolo", "cpu-x86_64", "dev1", "1.2.0", pinned="9.9.9") is None


def test_malformed_index_is_refused_with_the_field_named():
    bad = (
        b'{"schema": "edge-agent/channel-index/v1", "channel": "stable", "releases": '
        b'[{"name": "yolo", "version": "one", "variants": {"cpu-x86_64": '
        b'{"descriptor": "../../etc/shadow", "model_length": 1}}}]}'
    )
    with pytest.raises(ChannelFormatError) as caught:
        parse(ChannelIndex, bad, "index")
    message = str(caught.value)
    assert "releases.0.version" in message and "not a semantic version" in message
    assert "unsafe target path" in message
    with pytest.raises(ChannelFormatError, match="index is not valid"):
        parse(ChannelIndex, b"[1, 2", "index")
