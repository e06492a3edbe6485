"""Model updates inside a running agent: a video plays while models come and go over nginx."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import build_config
from agent.demo_inputs import synthesise_video
from agent.runtime import Agent
from models.channel.publish import open_repository
from tests import models_for_tests
from tests.channel_server import Nginx

BASE_NAME = "yolov8n-coco-fp32"


@pytest.fixture(scope="module")
def video(shared, tmp_path_factory) -> Path:
    images = [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]
    return synthesise_video(images, tmp_path_factory.mktemp("ota-video"), 20, fps=10.0)


@pytest.fixture
def server(tmp_path, channel):
    nginx = Nginx(tmp_path / "nginx", channel.folder).start()
    yield nginx
    nginx.stop()


def make_config(tmp_path: Path, model: Path, video: Path, channel, url: str, **ota):
    return build_config(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "model": {"path": str(model)},
            "source": {"uri": str(video), "loop": True, "pace": "realtime"},
            "sinks": {"jsonl": str(tmp_path / "out.jsonl"), "every_frame": True},
            "ota": {
                "enabled": True,
                "channel": url,
                "root": str(channel.root),
                "model_name": "yolov8n-coco",
                "first_check_s": 3600,  # the tests ask for checks themselves
                "retry_backoff_s": 0.2,
                "probation": {"frames": 15, "seconds": 30, "min_frames": 5},
                **ota,
            },
        }
    )


class Running:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.events: list[dict] = []
        agent.events.attach(self.events.append)
        self.thread = threading.Thread(target=agent.run, daemon=True)

    @property
    def manager(self):
        return self.agent.manager

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events]

    def event(self, kind: str) -> dict:
        return next(e for e in self.events if e["kind"] == kind)

    def wait_frames(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.agent.pipeline.stats.frames_out < count:
            assert time.monotonic() < deadline, f"only {self.agent.pipeline.stats.frames_out}"
            time.sleep(0.05)

    def wait_event(self, kind: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while kind not in self.kinds():
            assert time.monotonic() < deadline, f"no {kind} event; saw {self.kinds()}"
            time.sleep(0.05)
        return self.event(kind)

    def version(self) -> str:
        return self.agent.model().info.model_version


@contextlib.contextmanager
def running(config) -> Iterator[Running]:
    run = Running(Agent(config))
    run.thread.start()
    try:
        run.wait_frames(12)  # the base model's baseline for probation
        yield run
    finally:
        run.agent.stop()
        run.thread.join(timeout=30)


def frames(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_a_new_model_goes_live_between_two_frames_and_none_is_dropped(
    tmp_path, video, fp32_model, update_model, update_golden, channel, server
):
    channel.publish(update_model, "1.1.0", update_golden)
    config = make_config(tmp_path, fp32_model, video, channel, server.url)
    with running(config) as run:
        result = run.manager.call("check", {"trigger": "test"})
        assert result["ok"] and result["updated"], result
        committed = run.wait_event("ota_committed")
        assert run.version() == "1.1.0"
        assert committed["details"]["figures"]["pairs"] >= 1  # the old model ran beside it
        assert run.agent.model.shadow is None  # and no longer does
        run.wait_frames(run.agent.pipeline.stats.frames_out + 3)
        stats = run.agent.pipeline.stats
        assert stats.dropped == 0 and stats.errors == 0
    kinds = run.kinds()
    expected = ["ota_download_started", "ota_downloaded", "ota_staged", "ota_activated"]
    assert [k for k in kinds if k in expected] == expected
    assert kinds.index("ota_activated") < kinds.index("ota_committed")

    rows = frames(tmp_path)
    ids = [r["frame_id"] for r in rows]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "a frame went missing"
    versions = [r["model"]["version"] for r in rows]
    switch = versions.index("1.1.0")
    assert switch > 0 and versions[switch - 1] != "1.1.0"
    assert ids[switch] == ids[switch - 1] + 1  # consecutive frame ids, different models
    assert set(versions[switch:]) == {"1.1.0"}  # and it stays

    state = json.loads((tmp_path / "state" / "models" / "state.json").read_text())
    assert state["active"]["version"] == "1.1.0" and state["probation"] is None
    assert state["previous"]["name"] == BASE_NAME
    assert state["last_outcome"]["result"] == "committed"


def test_operator_rollback_and_pin(
    tmp_path, video, fp32_model, update_model, update_golden, channel, server
):
    channel.publish(update_model, "1.1.0", update_golden)
    config = make_config(tmp_path, fp32_model, video, channel, server.url)
    with running(config) as run:
        assert run.manager.call("check")["updated"]
        run.wait_event("ota_committed")
        rolled = run.manager.call("rollback", {"reason": "operator test"})
        assert rolled["ok"], rolled
        assert run.agent.model().info.model_name == BASE_NAME
        assert run.manager.state.rejected["1.1.0"] == "operator test"
        again = run.manager.call("check")
        assert again["ok"] and not again["updated"]  # a rolled-back version is not retaken
        pinned = run.manager.call("pin", {"version": "1.1.0"})
        assert pinned["ok"] and pinned["pinned"] == "1.1.0", pinned
        assert run.version() == "1.1.0"  # came back from the previous slot, no download
        nothing = run.manager.call("rollback", {"reason": "twice"})
        assert nothing["ok"]
        assert run.manager.call("pin", {"version": None})["pinned"] is None


def test_a_collapsed_model_is_refused_by_the_golden_self_test(
    tmp_path, video, fp32_model, collapsed_model, golden_set, channel, server
):
    channel.publish(collapsed_model, "1.1.0", golden_set)
    config = make_config(tmp_path, fp32_model, video, channel, server.url)
    with running(config) as run:
        result = run.manager.call("check")
        assert result["ok"] and result["kind"] == "self_test_failed", result
        assert "golden self-test recall" in result["reason"]
        assert run.agent.model().info.model_name == BASE_NAME
        assert run.manager.state.rejected["1.1.0"]
        assert run.manager.call("check")["updated"] is False  # not tried again
    event = run.event("ota_rejected")
    assert event["level"] == "error" and "never went live" in event["message"]
    assert "ota_activated" not in run.kinds()


def test_a_collapsed_model_that_gets_past_the_self_test_is_rolled_back_in_probation(
    tmp_path, video, fp32_model, collapsed_model, golden_set, channel, server
):
    """Blindness is a soft failure (a scene change can look like it): the first probation sends
    the model back without rejecting it, the next one it fails rejects it for good."""
    channel.publish(collapsed_model, "1.1.0", golden_set)
    config = make_config(tmp_path, fp32_model, video, channel, server.url, self_test_min_recall=0.0)
    with running(config) as run:
        assert run.manager.call("check")["updated"]
        first = run.wait_event("ota_rolled_back")
        assert run.agent.model().info.model_name == BASE_NAME
        postponed = run.manager.state
        assert "1.1.0" not in postponed.rejected and postponed.soft_failures == {"1.1.0": 1}
        assert postponed.last_outcome["result"] == "postponed"
        assert first["details"]["rejected"] is False and first["level"] == "warning"
        run.wait_frames(run.agent.pipeline.stats.frames_out + 12)  # the base model's baseline
        assert run.manager.call("check")["updated"]  # offered again: not rejected
        deadline = time.monotonic() + 60
        while run.kinds().count("ota_rolled_back") < 2:
            assert time.monotonic() < deadline, run.kinds()
            time.sleep(0.05)
    reason = first["details"]["reason"]
    assert "disagrees with the previous model" in reason or "looks blind" in reason, reason
    state = run.manager.state
    assert state.active is None and "1.1.0" in state.rejected and not state.soft_failures
    assert state.last_outcome["result"] == "rolled_back"
    versions = [r["model"]["version"] for r in frames(tmp_path)]
    assert "1.1.0" in versions and versions[-1] != "1.1.0"  # it ran, then it was sent back


def test_a_model_that_crashes_on_warm_up_is_never_activated(
    tmp_path, video, fp32_model, golden_set, channel, server
):
    crasher = models_for_tests.warmup_crasher(tmp_path / "crasher.onnx")
    channel.publish(crasher, "1.1.0", golden_set)
    config = make_config(tmp_path, fp32_model, video, channel, server.url)
    with running(config) as run:
        result = run.manager.call("check")
        assert result["kind"] == "load_failed", result
        assert "failed to load or warm up" in result["reason"]
        assert run.agent.model().info.model_name == BASE_NAME
    assert "ota_activated" not in run.kinds()
    assert not list((tmp_path / "state" / "models" / "slots").iterdir())


def test_a_tampered_or_stale_channel_leaves_the_running_model_alone(
    tmp_path, video, fp32_model, dynamic_model, golden_set, channel, server
):
    from datetime import datetime, timedelta, timezone

    published = channel.publish(dynamic_model, "1.1.0", golden_set)
    stored = channel.stored(published.model_path)
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0x55
    stored.write_bytes(bytes(data))
    config = make_config(tmp_path, fp32_model, video, channel, server.url)
    with running(config) as run:
        result = run.manager.call("check")
        assert result["kind"] == "corrupt", result
        with open_repository(channel.folder, channel.keys) as repo:
            repo.commit(expires={"timestamp": datetime.now(timezone.utc) - timedelta(minutes=5)})
        assert run.manager.call("check")["kind"] == "expired"
        assert run.agent.model().info.model_name == BASE_NAME
        assert run.agent.pipeline.stats.errors == 0
    failures = [e for e in run.events if e["kind"] == "ota_failed"]
    assert [e["details"]["check"] for e in failures] == ["corrupt", "expired"]
    assert run.manager.state.active is None


def test_too_little_disk_space_fails_before_anything_is_written(
    tmp_path, video, fp32_model, dynamic_model, golden_set, channel, server
):
    channel.publish(dynamic_model, "1.1.0", golden_set)
    config = make_config(
        tmp_path, fp32_model, video, channel, server.url, free_space_margin_bytes=10**18
    )
    with running(config) as run:
        result = run.manager.call("check")
        assert result["kind"] == "disk" and "not enough disk space" in result["error"]
        assert run.agent.model().info.model_name == BASE_NAME
    models = tmp_path / "state" / "models"
    assert not list((models / "slots").iterdir()) and not list((models / "downloads").iterdir())
