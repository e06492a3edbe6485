"""An arm64 board for real: Debian arm64 booted with systemd as PID 1 (under qemu), the agent
installed the way docs/install.md tells a user, detecting a real video on ONNX Runtime's aarch64
kernels, reporting to the host's mosquitto, and taking a cpu-aarch64 INT8 release over the air
from the host's nginx.

Slow (emulated): one boot, a few frames. The systemd behaviours (restart after a crash, the
watchdog, a clean stop, the journal) are checked on the amd64 board (test_systemd_amd64.py),
which runs the same unit natively and much faster."""

from __future__ import annotations

import json

import pytest
import yaml

from models.release import GateSettings, Published, ReleaseRequest, release
from tests.brokers import Subscriber
from tests.channel_server import Nginx
from tests.device.conftest import (
    board,
    board_config,
    emulated,
    host_detections,
    install_as_a_user,
    same_boxes,
)
from tests.ota_helpers import new_channel

pytestmark = pytest.mark.slow
UNIT = "edge-agent.service"


@pytest.fixture
def int8_channel(tmp_path, aarch64_model, fp32_model, shared):
    """A channel holding a cpu-aarch64 INT8 release, gated on the aarch64 kernels (under qemu)."""
    channel = new_channel(tmp_path / "ota")
    images = (shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg")
    gate = GateSettings(fp32_model, shared / "datasets" / "coco8")
    request = ReleaseRequest(channel.folder, channel.keys, aarch64_model, "2.0.0",
                             name="yolov8n-coco", golden_images=images, gate=gate)  # fmt: skip
    published = release(request)
    assert isinstance(published, Published) and published.target == "cpu-aarch64", published
    return channel


def test_an_arm64_board_installs_the_service_detects_and_commits_an_int8_update(
    tmp_path, broker, shared, agent_wheel, int8_channel
):
    server = Nginx(tmp_path / "nginx", int8_channel.folder).start()
    sub = Subscriber(broker.port, ["edge/#"]).start()
    prefix = "edge/board-arm64"
    config = board_config(
        broker.port,
        "board-arm64",
        ota={
            "enabled": True,
            "channel": server.url,
            "root": "/etc/edge-agent/root.json",
            "model_name": "yolov8n-coco",
            "first_check_s": 3600,
            "announce_jitter_s": 0,
            # the fewest frames a verdict takes (8 pairs, every frame run on both models, no
            # warm-up left out); emulated timings say nothing about a board: judge on the boxes
            "probation": {
                "frames": 8,
                "seconds": 900,
                "min_frames": 8,
                "warmup_frames": 0,
                "pair_every": 1,
                "max_latency_ratio": 10,
                "max_p95_ratio": 10,
            },
        },
    )
    emulated(config)
    device = board("arm64", tmp_path / "board", shared, agent_wheel)
    try:
        device.boot(timeout=600)
        assert device.run("uname", "-m").stdout.strip() == "aarch64"
        device.write("/etc/edge-agent/agent.yaml", yaml.safe_dump(config))
        device.write("/etc/edge-agent/root.json", int8_channel.root.read_text())
        install_as_a_user(device, agent_wheel)

        target = device.run("/opt/edge-agent/bin/edge-agent", "target", "--json",
                            "-c", "/etc/edge-agent/agent.yaml")  # fmt: skip
        assert json.loads(target.stdout)["follows"]["target"] == "cpu-aarch64", target.stdout
        device.wait_until(
            lambda: device.unit(UNIT, "ActiveState")["ActiveState"] == "active",
            600,
            "the service to report READY=1",
        )
        first = sub.wait_topic(f"{prefix}/detections", timeout=600).json()
        assert first["model"]["name"] == "yolov8n-coco-fp32"
        # the aarch64 kernels see what x86 sees in the same frame of the video
        expected = host_detections(tmp_path, first["frame_id"])
        assert same_boxes(first["detections"], expected), (first["detections"], expected)

        sub.publish("edge/fleet/stable/announce", json.dumps({"version": "2.0.0"}))
        committed = sub.wait_topic(
            f"{prefix}/events", timeout=900, where=lambda m: m.json()["kind"] == "ota_committed"
        ).json()
        assert committed["details"]["version"] == "2.0.0"
        # downloaded and verified, staged, live (only once its golden self-test passed on the
        # board's own kernels), committed after probation
        kinds = [m.json()["kind"] for m in sub.on(f"{prefix}/events")]
        steps = ["ota_downloaded", "ota_staged", "ota_activated", "ota_committed"]
        assert [k for k in kinds if k in steps] == steps, kinds
        after = sub.wait_topic(
            f"{prefix}/detections",
            timeout=300,
            where=lambda m: m.json()["model"].get("version") == "2.0.0",
        ).json()
        assert after["model"]["name"] == "yolov8n-coco"
        journal = device.journal(UNIT)
        assert "INFO agent.link.events: event ota_committed" in journal, journal[-3000:]
    finally:
        try:
            device.shutdown()
        finally:
            server.stop()
            sub.stop()
