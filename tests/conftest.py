"""Shared fixtures: the real data in ../shared, the real model, and small test helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import ModelConfig
from agent.vision.backends import load_backend

ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    explicit = os.environ.get("EDGE_AGENT_SHARED")
    return Path(explicit) if explicit else ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    path = _shared_dir()
    needed = [path / "models" / "yolov8n-coco-fp32.onnx", path / "images" / "bus.jpg"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.fail(
            f"this test needs the shared data folder {path} (../shared beside the project, or "
            f"$EDGE_AGENT_SHARED); missing: {', '.join(missing)}",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def fp32_model(shared: Path) -> Path:
    return shared / "models" / "yolov8n-coco-fp32.onnx"


@pytest.fixture(scope="session")
def dynamic_model(shared: Path) -> Path:
    return shared / "models" / "yolov8n-coco-int8-dynamic.onnx"


@pytest.fixture(scope="session")
def coco8(shared: Path):
    """8 labelled COCO images: for quick tests only, never for accuracy claims."""
    from models.datasets import load_dataset

    return load_dataset(shared / "datasets" / "coco8")


@pytest.fixture(scope="session")
def voc_val(shared: Path):
    """The reference evaluation set: 990 labelled PASCAL VOC 2007 photos, COCO-80 class ids."""
    from models.datasets import load_dataset

    path = shared / "datasets" / "voc2007-val"
    if not (path / "images").is_dir():
        pytest.fail(f"this test needs {path} (../shared/datasets/voc2007-val)", pytrace=False)
    return load_dataset(path)


@pytest.fixture(scope="session")
def fp32_backend(fp32_model: Path):
    backend = load_backend("onnxruntime", fp32_model, ModelConfig(path=fp32_model))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def dynamic_backend(dynamic_model: Path):
    backend = load_backend("onnxruntime", dynamic_model, ModelConfig(path=dynamic_model))
    yield backend
    backend.close()


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="session")
def bus_video(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-frame 640x480 video of the bus photo sliding sideways."""
    image = cv2.resize(cv2.imread(str(shared / "images" / "bus.jpg")), (720, 480))
    frames = [np.ascontiguousarray(image[:, i * 3 : i * 3 + 640]) for i in range(24)]
    return write_video(tmp_path_factory.mktemp("video") / "bus.mp4", frames)


def wait_until(condition, timeout: float, what: str) -> None:
    """Wait for a condition (never for a fixed time); fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
):
    """Run ``edge-agent`` as a user would, in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or ROOT,
    )


@pytest.fixture
def broker(tmp_path):
    from tests.brokers import Mosquitto

    instance = Mosquitto(tmp_path / "broker").start()
    yield instance
    instance.stop()


def agent_config(
    tmp_path: Path, model: Path, source: dict, mqtt: dict | None = None, **extra
) -> Path:
    """A config file for ``edge-agent run``: JSON lines as ground truth, MQTT when given."""
    import yaml

    data = {
        "device_id": "dev1",
        "state_dir": str(tmp_path / "state"),
        "log_level": "INFO",
        "model": {"path": str(model)},
        "source": source,
        "sinks": {"jsonl": str(tmp_path / "out.jsonl"), "every_frame": True},
        "pipeline": {"summary_interval_s": 1.0},
        **extra,
    }
    if mqtt is not None:
        data["mqtt"] = {
            "enabled": True,
            "host": "127.0.0.1",
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
            "telemetry_interval_s": 1,
            **mqtt,
        }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class AgentProcess:
    """``edge-agent run`` in a child process, with its stderr kept in a file."""

    def __init__(self, config: Path, *args: str, env: dict | None = None) -> None:
        self.log_path = config.parent / f"agent-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config), *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive():
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code

    def wait(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code


# -- models and channels for the factory and OTA tests ------------------------------------------
@pytest.fixture(scope="session")
def calib(shared, tmp_path_factory) -> Path:
    """Calibration frames from the two photos only: never the coco8 evaluation images. As many
    as `edge-models calibration-set` makes by default (16 a photo): the cpu-x86_64 recipe is
    measured at that size (README); with 8 a photo it scores about 2 points lower."""
    from models.calibration import synthesise

    folder = tmp_path_factory.mktemp("calib")
    synthesise([shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"], folder)
    return folder


def quantized_for(
    target: str, fp32_model: Path, calib: Path, folder: Path, name: str | None = None
) -> Path:
    """The fp32 model quantized with ``target``'s recipe, as `edge-models quantize` makes it."""
    from models.quantize import quantize
    from models.recipes import recipe

    out = folder / (name or f"yolov8n-{target}.onnx")
    quantize(fp32_model, calib, out, recipe(target), progress=False, target=target)
    return out


@pytest.fixture(scope="session")
def u8s8_model(fp32_model, calib, tmp_path_factory) -> Path:
    """The cpu-x86_64 recipe: U8S8, 7-bit weights in the first conv. It computes the same
    integers on AVX2, VNNI and aarch64 kernels, so it passes the gate on any host."""
    folder = tmp_path_factory.mktemp("q")
    return quantized_for("cpu-x86_64", fp32_model, calib, folder, "yolov8n-u8s8.onnx")


@pytest.fixture(scope="session")
def u8s8_full_model(fp32_model, calib, tmp_path_factory) -> Path:
    """The cpu-x86_64-vnni recipe: full-range U8S8, which saturates x86 kernels without VNNI."""
    return quantized_for("cpu-x86_64-vnni", fp32_model, calib, tmp_path_factory.mktemp("q"))


@pytest.fixture(scope="session")
def aarch64_model(fp32_model, calib, tmp_path_factory) -> Path:
    """The cpu-aarch64 recipe: S8S8."""
    return quantized_for("cpu-aarch64", fp32_model, calib, tmp_path_factory.mktemp("q"))


@pytest.fixture(scope="session")
def aarch64_runner():
    """ONNX Runtime's aarch64 kernels under qemu; fails (never skips) when not set up."""
    from models.kernels import UnverifiableTarget, runner_for

    try:
        return runner_for("cpu-aarch64")
    except UnverifiableTarget as exc:
        pytest.fail(f"this test needs the aarch64 emulation environment: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def collapsed_model(fp32_model, calib, tmp_path_factory) -> Path:
    """Head quantized too: one int8 scale for the last Concat's 0..640 boxes and 0..1 scores."""
    from models.quantize import QuantizeSettings, quantize

    out = tmp_path_factory.mktemp("q") / "yolov8n-collapsed.onnx"
    quantize(
        fp32_model,
        calib,
        out,
        QuantizeSettings(activations="uint8", keep_head_float=False),
        progress=False,
    )
    return out


def _golden_images(shared: Path) -> list[Path]:
    return [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]


@pytest.fixture(scope="session")
def golden_set(dynamic_model, shared) -> dict:
    """The golden self-test set of the shared int8 model, recorded once."""
    from models.golden import record_golden

    return record_golden(dynamic_model, _golden_images(shared))


@pytest.fixture(scope="session")
def update_model(fp32_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new build of the running fp32 model: other bytes (one more metadata entry), same speed.

    Updates that must go live use it: the shared dynamic INT8 model runs 1.2-1.6x slower than
    fp32 on x86 CPUs without VNNI, so probation rightly sends it back there, and whether it does
    would depend on the host's ISA and load."""
    import onnx

    model = onnx.load(str(fp32_model))
    entry = model.metadata_props.add()
    entry.key, entry.value = "build", "test update of the fp32 model"
    out = tmp_path_factory.mktemp("update") / "yolov8n-coco-fp32-update.onnx"
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="session")
def update_golden(update_model: Path, shared: Path) -> dict:
    """The golden self-test set of ``update_model``."""
    from models.golden import record_golden

    return record_golden(update_model, _golden_images(shared))


@pytest.fixture
def channel(tmp_path):
    from tests.ota_helpers import new_channel

    return new_channel(tmp_path / "ota")


def pytest_report_header(config) -> str | None:
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return None
    return (
        "tests/train (pruning, distillation: torch) is not collected here; it runs in the "
        "training environment: bash scripts/test.sh runs both"
    )


def run_agent_on_backend(tmp_path: Path, model: Path, video: Path, backend: str):
    """`edge-agent run` for two frames with ``model.backend`` set: the refusal paths' check."""
    import yaml

    config = agent_config(tmp_path, model, {"uri": str(video)})
    data = yaml.safe_load(config.read_text())
    data["model"]["backend"] = backend
    config.write_text(yaml.safe_dump(data))
    return run_cli("run", "-c", str(config), "--frames", "2")
