"""Releasing into a channel (``models.release``) and `edge-models keys init / publish / rollout /
refresh`: the publisher's side of the channel."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from dataclasses import replace

import pytest

from agent.contract import AgentError, ChannelIndex
from models.channel import create, init_keys, open_repository
from models.release import GateFailed, GateSettings, Published, ReleaseRequest, release
from tests.conftest import ROOT


def models_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "models.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def index_of(channel, keys) -> ChannelIndex:
    with open_repository(channel, keys) as repo:
        return repo.index()


def test_keys_init_makes_private_keys_and_a_signed_channel_and_never_overwrites(tmp_path):
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    made = models_cli("keys", "init", "--keys", keys, "--channel", channel)
    assert made.returncode == 0, made.stderr
    assert "move it to offline storage" in made.stdout
    for role in ("targets", "snapshot", "timestamp"):
        assert stat.S_IMODE((keys / f"{role}.pem").stat().st_mode) == 0o600
    assert (keys / "offline" / "root.pem").exists()
    assert (channel / "metadata" / "1.root.json").exists()
    assert index_of(channel, keys).releases == []
    again = models_cli("keys", "init", "--keys", keys, "--channel", channel)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_release_gates_first_answers_a_collapsed_model_with_its_reasons_and_publishes_nothing(
    tmp_path, fp32_model, u8s8_model, aarch64_model, collapsed_model, shared, golden_set
):
    """The release pipeline as the Python API the CLI, the demo and scripts call."""
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    golden_file = tmp_path / "golden.json"
    golden_file.write_text(json.dumps(golden_set))
    _, root = init_keys(keys, channel)
    create(channel, keys, root, "stable")
    images = (shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg")
    gate = GateSettings(fp32_model, shared / "datasets" / "coco8", rounds=3)

    def request(model, **options) -> ReleaseRequest:
        options.setdefault("golden_images", images)
        return ReleaseRequest(channel, keys, model, "1.0.0", name="yolov8n-coco", **options)

    refused = release(request(collapsed_model, gate=gate))
    assert isinstance(refused, GateFailed) and refused.model == collapsed_model.name
    assert any("scores collapsed" in reason for reason in refused.reasons), refused.reasons
    assert index_of(channel, keys).releases == []

    lenient = replace(gate, max_latency_ratio=5)
    good = release(request(u8s8_model, gate=lenient, rollout_percent=10))
    assert isinstance(good, Published), good
    assert (good.name, good.version, good.target) == ("yolov8n-coco", "1.0.0", "cpu-x86_64")
    assert good.gate["passed"] is True and good.gate["target"] == "cpu-x86_64"
    release_ = index_of(channel, keys).releases[0]
    assert release_.rollout_percent == 10 and list(release_.variants) == ["cpu-x86_64"]
    with open_repository(channel, keys) as repo:
        descriptor = json.loads(repo.read_target(release_.variants["cpu-x86_64"].descriptor))
    assert descriptor["precision"] == "int8" and descriptor["gate"]["passed"] is True
    assert descriptor["input"]["height"] == 640 and descriptor["input"]["layout"] == "NCHW"
    assert descriptor["golden"]["images"] and len(descriptor["class_names"]) == 80

    # a second target for the same version; other bytes under an existing one are refused
    warned: list[str] = []
    skip = GateSettings(skip=True)
    arm = release(request(aarch64_model, target="cpu-aarch64", gate=skip), warn=warned.append)
    assert isinstance(arm, Published) and arm.gate["skipped"] is True and warned
    assert set(index_of(channel, keys).releases[0].variants) == {"cpu-x86_64", "cpu-aarch64"}
    # (named: on a VNNI host the float model would otherwise go to cpu-x86_64-vnni)
    clash = request(fp32_model, target="cpu-x86_64", gate=skip, golden=golden_file)
    with pytest.raises(AgentError, match="publish a new version instead"):
        release(clash)
    # a model made for other kernels than the target's devices run: refused before any work
    with pytest.raises(AgentError, match="was made for cpu-x86_64"):
        release(request(u8s8_model, target="cpu-aarch64", gate=skip))


def test_publish_prints_the_release_and_exits_3_on_a_failed_gate(
    tmp_path, fp32_model, u8s8_model, collapsed_model, shared, golden_set
):
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    assert models_cli("keys", "init", "--keys", keys, "--channel", channel).returncode == 0
    images = [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]
    common = ["--channel", channel, "--keys", keys, "--name", "yolov8n-coco"]
    gate = ["--reference", fp32_model, "--data", shared / "datasets" / "coco8", "--rounds", "3"]

    refused = models_cli(
        "publish", *common, "--model", collapsed_model, "--version", "1.0.0", *gate,
        "--golden-images", *images,
    )  # fmt: skip
    assert refused.returncode == 3, refused.stderr
    assert "scores collapsed" in refused.stderr and "not published" in refused.stderr
    assert index_of(channel, keys).releases == []

    good = models_cli(
        "publish", *common, "--model", u8s8_model, "--version", "1.0.0", "--no-gate",
        "--target", "cpu-x86_64", "--rollout", "10", "--golden-images", *images,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "published yolov8n-coco 1.0.0 for cpu-x86_64" in good.stdout
    assert "rollout 10%" in good.stdout and "WARNING: --no-gate" in good.stderr

    widened = models_cli(
        "rollout", "--channel", channel, "--keys", keys, "--name", "yolov8n-coco",
        "--version", "1.0.0", "--percent", "100",
    )  # fmt: skip
    assert widened.returncode == 0 and "10% -> 100%" in widened.stdout
    refreshed = models_cli("refresh", "--channel", channel, "--keys", keys)
    assert refreshed.returncode == 0 and "re-signed" in refreshed.stdout


def test_publish_refuses_bad_input_with_a_clear_message(tmp_path, fp32_model, golden_set):
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    assert models_cli("keys", "init", "--keys", keys, "--channel", channel).returncode == 0
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps(golden_set))
    base = ["publish", "--channel", channel, "--keys", keys, "--no-gate", "--golden", golden]
    cases = {
        "not a semantic version": [*base, "--model", fp32_model, "--version", "v2"],
        "unknown model format": [*base, "--model", golden, "--version", "1.0.0"],
        "is not a channel": [
            "publish", "--channel", tmp_path, "--keys", keys, "--no-gate", "--golden", golden,
            "--model", fp32_model, "--version", "1.0.0",
        ],
        "quality gate needs --reference": [
            "publish", "--channel", channel, "--keys", keys, "--golden", golden,
            "--model", fp32_model, "--version", "1.0.0",
        ],
    }  # fmt: skip
    for expected, args in cases.items():
        result = models_cli(*args)
        assert result.returncode == 1, (expected, result.stderr)
        assert expected in result.stderr, (expected, result.stderr)
        assert "Traceback" not in result.stderr
