"""The arm64 container image, built and run here: Dockerfile.arm64 built with podman (under qemu)
from a locally made Debian base (no registry is reachable here; users get the official Python
image by default), then run against the host's mosquitto: detections arrive, the image's
HEALTHCHECK says healthy, and a stop is clean. Dockerfile.jetson needs NVIDIA's base images and
is only linted (tests/test_packaging.py)."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import yaml

from tests.brokers import Subscriber
from tests.conftest import wait_until
from tests.device.conftest import ROOT, board_config, emulated
from tests.device.nspawn import EMULATED_CPU, arm_cpuinfo

pytestmark = pytest.mark.slow


def podman(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:3])} … exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def base_image() -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup-container-base.sh"), "arm64"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            "this test needs podman and a local arm64 Debian base image "
            f"(bash scripts/setup-container-base.sh arm64), which failed:\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def arm64_image(base_image: str) -> str:
    """docs/install.md, "Run in a container": the build command, with the local base."""
    tag = "localhost/edge-agent:arm64-test"
    podman("build", "--platform", "linux/arm64", "--format", "docker", "--network", "host",
           "--build-arg", f"PYTHON_IMAGE={base_image}", "-f", "Dockerfile.arm64", "-t", tag,
           str(ROOT))  # fmt: skip
    return tag


def test_the_arm64_image_runs_detects_reports_healthy_and_stops_cleanly(
    tmp_path, broker, arm64_image, shared
):
    config = emulated(board_config(broker.port, "container-arm64"))
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "agent.yaml").write_text(yaml.safe_dump(config))
    cpuinfo = tmp_path / "cpuinfo"  # what an ARM kernel shows; qemu shows the host's
    cpuinfo.write_text(arm_cpuinfo())
    name = f"edge-agent-test-{uuid.uuid4().hex[:8]}"
    sub = Subscriber(broker.port, ["edge/#"]).start()
    prefix = "edge/container-arm64"
    try:
        # docs/install.md's command, plus: the emulated cpuinfo, the shared data, and rlimits
        # this sandbox allows (it refuses the 1048576 podman asks for a root container)
        podman("run", "-d", "--name", name, "--network", "host",
               "-v", f"{etc}:/etc/edge-agent:ro", "-v", "edge-agent-test-state:/var/lib/edge-agent",
               "-v", f"{shared}:/srv/shared:ro", "-v", f"{cpuinfo}:/proc/cpuinfo:ro",
               "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
               "--env", f"QEMU_CPU={EMULATED_CPU}",
               arm64_image)  # fmt: skip
        arch = podman("image", "inspect", "--format", "{{.Architecture}}", arm64_image)
        assert arch.stdout.strip() == "arm64"
        detections = sub.wait_topic(f"{prefix}/detections", timeout=600).json()
        assert detections["model"]["name"] == "yolov8n-coco-fp32"

        # the image's HEALTHCHECK, run as podman's timer would (this host has no systemd for
        # the timer): healthy once the agent's health file says its first frame is through
        checks = []

        def healthy() -> bool:
            checks.append(podman("healthcheck", "run", name, check=False, timeout=60))
            return checks[-1].returncode == 0

        try:
            wait_until(healthy, 300, "the HEALTHCHECK to pass")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {checks[-1].stdout}{checks[-1].stderr}") from None
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["Health"]["Status"] == "healthy", state["Health"]

        # SIGTERM drains the frames in flight: seconds on a board, minutes under qemu
        podman("stop", "--time", "600", name, timeout=660)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0, state
        stopped = sub.wait_topic(
            f"{prefix}/status", where=lambda m: m.json()["state"] == "stopped"
        ).json()
        assert stopped["device_id"] == "container-arm64"
        assert "model loaded" in podman("logs", name).stderr
    finally:
        podman("rm", "--force", "--volumes", name, check=False)
        podman("volume", "rm", "--force", "edge-agent-test-state", check=False)
        sub.stop()
