"""TensorRT: everything around the engine that is plain Python (the cache's keys, hits, rebuilds and
error mapping; the precision chosen; the records of compiled models), and clean refusals where
tensorrt, pycuda and cuda-python are not installed. No engine is built here (no GPU): the cache
is exercised with the bytes a builder returns, which is all it ever sees of an engine."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml

from agent.config import ModelConfig
from agent.contract.errors import BackendUnavailable, ModelError
from agent.vision import load_backend
from agent.vision.backends import engine_cache
from agent.vision.backends.engine_cache import (
    EngineBuildError,
    EngineCache,
    EngineKey,
    resolve_precision,
)
from tests.conftest import agent_config, run_agent_on_backend, run_cli


def key(**changes) -> EngineKey:
    fields = {
        "model_sha256": "ab" * 32,
        "tensorrt": "10.13.0.35",
        "gpu": "Orin",
        "compute_capability": "8.7",
        "precision": "int8",
        "options": {"workspace_mb": 1024},
    }
    return EngineKey(**{**fields, **changes})


class Builder:
    """Counts builds; returns distinct bytes per build, records the timing cache it was given."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.builds, self.fail, self.timing_caches = 0, fail, []

    def __call__(self, timing_cache):
        self.timing_caches.append(timing_cache)
        if self.fail is not None:
            raise self.fail
        self.builds += 1
        return f"plan {self.builds}".encode() * 100


def test_an_engine_is_built_once_and_found_on_the_next_start(tmp_path):
    events = []
    undo = engine_cache.subscribe(lambda kind, details: events.append(kind))
    try:
        build = Builder()
        first = EngineCache(tmp_path).ensure(key(), build, progress=engine_cache.notify)
        second = EngineCache(tmp_path).ensure(key(), build, progress=engine_cache.notify)
    finally:
        undo()
    assert first.built and not second.built and build.builds == 1
    assert first.path == second.path and second.path.read_bytes() == b"plan 1" * 100
    assert events == ["engine_build_started", "engine_built"]
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["key"]["gpu"] == "Orin" and record["bytes"] == 600


@pytest.mark.parametrize(
    "change",
    [
        {"tensorrt": "10.14.1.48"},
        {"gpu": "NVIDIA H200", "compute_capability": "9.0"},
        {"precision": "fp16"},
        {"options": {"workspace_mb": 2048}},
        {"model_sha256": "cd" * 32},
    ],
)
def test_any_change_in_the_key_is_a_rebuild_beside_the_old_engine(tmp_path, change):
    build = Builder()
    cache = EngineCache(tmp_path)
    old = cache.ensure(key(), build)
    new = cache.ensure(key(**change), build)
    assert new.built and build.builds == 2 and new.path != old.path
    assert cache.lookup(key()) == old.path  # the old one still serves the previous model


def test_a_record_that_names_another_key_is_deleted_and_rebuilt(tmp_path):
    build = Builder()
    cache = EngineCache(tmp_path)
    path = cache.ensure(key(), build).path
    record_path = path.with_suffix(".json")
    record = json.loads(record_path.read_text())
    record["key"]["tensorrt"] = "8.6.1"
    record_path.write_text(json.dumps(record))
    again = cache.ensure(key(), build)
    assert again.built and build.builds == 2


@pytest.mark.parametrize("damage", ["flipped", "cut", "record", "no-record"])
def test_a_damaged_cache_entry_is_deleted_and_rebuilt_never_loaded(tmp_path, damage, caplog):
    build = Builder()
    cache = EngineCache(tmp_path)
    path = cache.ensure(key(), build).path
    data = path.read_bytes()
    if damage == "flipped":
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    elif damage == "cut":
        path.write_bytes(data[:10])
    elif damage == "record":
        path.with_suffix(".json").write_text("{not json")
    else:
        path.with_suffix(".json").unlink()
    assert cache.lookup(key()) is None
    assert not path.exists() and not path.with_suffix(".json").exists()
    again = cache.ensure(key(), build)
    assert again.built and again.path.read_bytes() == b"plan 2" * 100
    assert "deleting it and building again" in caplog.text


def test_a_failed_build_names_its_reason_and_stores_nothing(tmp_path):
    events = []
    cache = EngineCache(tmp_path)
    failing = Builder(fail=RuntimeError("out of memory allocating 2147483648 bytes"))
    with pytest.raises(EngineBuildError, match="RuntimeError: out of memory allocating"):
        cache.ensure(key(), failing, progress=lambda kind, details: events.append((kind, details)))
    assert [kind for kind, _ in events] == ["engine_build_started", "engine_build_failed"]
    assert "out of memory" in events[-1][1]["reason"]
    assert not list(tmp_path.glob("*.engine")) and cache.lookup(key()) is None
    unsupported = Builder(fail=EngineBuildError("TensorRT cannot parse m.onnx: /model.22/Foo"))
    with pytest.raises(EngineBuildError, match=r"/model\.22/Foo"):
        cache.ensure(key(), unsupported)
    with pytest.raises(EngineBuildError, match="returned no engine"):
        cache.ensure(key(), lambda timing_cache: b"")


def test_one_timing_cache_per_gpu_and_tensorrt_version_is_handed_to_every_build(tmp_path):
    build = Builder()
    cache = EngineCache(tmp_path)
    cache.ensure(key(), build)
    cache.ensure(key(model_sha256="cd" * 32), build)
    cache.ensure(key(gpu="NVIDIA H200", compute_capability="9.0"), build)
    first, second, other = build.timing_caches
    assert first == second and first.name == "timing-orin-sm87-trt10.13.0.35.cache"
    assert other.name == "timing-nvidia-h200-sm90-trt10.13.0.35.cache"


def test_prune_keeps_the_most_recently_used_engines(tmp_path):
    cache = EngineCache(tmp_path)
    build = Builder()
    paths = [cache.ensure(key(model_sha256=f"{i:02d}" * 32), build).path for i in range(6)]
    for age, path in enumerate(reversed(paths)):
        os.utime(path, (1_000_000 - age * 10, 1_000_000 - age * 10))
    cache.lookup(key(model_sha256="00" * 32))  # used now: the newest
    dropped = cache.prune(keep=2)
    assert set(dropped) == set(paths[1:5])
    assert sorted(p.name for p in tmp_path.glob("*.engine")) == sorted(
        [paths[0].name, paths[5].name]
    )


def test_the_precision_follows_the_model_unless_asked_and_never_lies(tmp_path):
    model = tmp_path / "m.onnx"
    assert resolve_precision("auto", True, model) == "int8"
    assert resolve_precision("auto", False, model) == "fp16"
    assert resolve_precision("fp32", False, model) == "fp32"
    with pytest.raises(ModelError, match="float model: TensorRT builds INT8 from a QDQ"):
        resolve_precision("int8", False, model)
    with pytest.raises(ModelError, match="QDQ INT8 model: build it as int8"):
        resolve_precision("fp16", True, model)
    with pytest.raises(ValueError, match="precision 'int4'"):
        key(precision="int4")


# -- where TensorRT is not installed ------------------------------------------------------------
def test_the_tensorrt_backend_refuses_cleanly_where_tensorrt_is_not_installed(
    tmp_path, fp32_model, bus_video
):
    with pytest.raises(BackendUnavailable, match=r"'tensorrt' is not installed here: .*tensorrt"):
        load_backend("tensorrt", fp32_model, ModelConfig(path=fp32_model, backend="tensorrt"))
    result = run_agent_on_backend(tmp_path, fp32_model, bus_video, "tensorrt")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "backend 'tensorrt' is not installed here" in result.stderr


def test_gpu_memory_without_pycuda_or_cuda_python_is_one_clear_refusal():
    from agent.vision.backends.cuda_memory import open_device

    with pytest.raises(BackendUnavailable, match="needs pycuda or cuda-python") as caught:
        open_device(0)
    assert "pycuda:" in str(caught.value) and "cuda-python:" in str(caught.value)


def test_a_bad_tensorrt_setting_is_a_config_error(tmp_path, fp32_model, bus_video):
    config = agent_config(tmp_path, fp32_model, {"uri": str(bus_video)})
    data = yaml.safe_load(config.read_text())
    data["model"]["tensorrt"] = {"precision": "int4"}
    config.write_text(yaml.safe_dump(data))
    result = run_cli("run", "-c", str(config), "--frames", "2")
    assert result.returncode == 1 and "model.tensorrt.precision: Input should be" in result.stderr


# -- engines over the air ------------------------------------------------------------------------
ORIN = {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7"}


def engine_beside(model, folder, environment=ORIN, payload=b"stand-in plan bytes " * 50):
    """An engine file with the record build-engine writes. The bytes stand in for a plan: the
    channel, the descriptor and the device's choice never look inside one (no GPU here)."""
    engine = folder / f"{environment['gpu'].lower()}-{environment['tensorrt']}.engine"
    engine.write_bytes(payload)
    record = {
        **environment,
        "source": model.name,
        "source_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "precision": "int8",
        "imgsz": [640, 640],
        "metadata": {"names": "{0: 'person'}"},
    }
    (folder / (engine.name + ".json")).write_text(json.dumps(record))
    return engine, record


def test_a_device_takes_a_prebuilt_engine_only_on_its_own_tensorrt_and_gpu(
    channel, dynamic_model, golden_set, tmp_path
):
    from agent.contract.descriptor import EngineEnvironment
    from tests.channel_server import Nginx
    from tests.test_ota_channel import client_for

    xavier = {"tensorrt": "8.5.2.2", "gpu": "Xavier", "compute_capability": "7.2"}
    engines = [engine_beside(dynamic_model, tmp_path, env) for env in (ORIN, xavier)]
    channel.publish(dynamic_model, "1.1.0", golden_set, target="jetson-orin", engines=engines)
    server = Nginx(tmp_path / "nginx", channel.folder).start()
    try:
        client = client_for(server.url, channel, tmp_path / "device")
        cases = {
            "same TensorRT and GPU": (EngineEnvironment(**ORIN), "engine"),
            "another TensorRT": (EngineEnvironment(**{**ORIN, "tensorrt": "10.7.0.23"}), "onnx"),
            "another GPU": (EngineEnvironment(**{**ORIN, "compute_capability": "8.6"}), "onnx"),
            "no TensorRT": (None, "onnx"),
        }
        for case, (environment, expected) in cases.items():
            offer = client.find("yolov8n-coco", "jetson-orin", None, engines=environment)
            assert offer.file_format == expected, case
            path = client.download(offer, tmp_path / f"{case}.part")
            want = engines[0][0] if expected == "engine" else dynamic_model
            assert path.read_bytes() == want.read_bytes(), case
    finally:
        server.stop()
    assert len(offer.descriptor.engines) == 2 and offer.descriptor.engines[1].gpu == "Xavier"


def test_an_installed_engine_reads_its_names_from_its_slot_descriptor(tmp_path):
    from agent.vision.backends.model_record import read_record

    slot = tmp_path / "a"
    slot.mkdir()
    (slot / "model.engine").write_bytes(b"plan")
    descriptor = {"name": "yolov8n-coco", "version": "1.1.0", "class_names": {"0": "person"},
                  "input": {"height": 640, "width": 640}, "precision": "int8",
                  "file": {"sha256": "ef" * 32}}  # fmt: skip
    (slot / "descriptor.json").write_text(json.dumps(descriptor))
    record = read_record(slot / "model.engine")
    assert record.names == {0: "person"} and record.imgsz == (640, 640)
    assert record.metadata["precision"] == "int8"


def test_publish_refuses_an_engine_built_from_another_model(
    fp32_model, dynamic_model, golden_set, tmp_path
):
    from tests.test_publish import index_of, models_cli

    keys, channel = tmp_path / "keys", tmp_path / "channel"
    assert models_cli("keys", "init", "--keys", keys, "--channel", channel).returncode == 0
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps(golden_set))
    engine, _ = engine_beside(fp32_model, tmp_path)
    result = models_cli(
        "publish", "--channel", channel, "--keys", keys, "--model", dynamic_model,
        "--version", "1.0.0", "--target", "jetson-orin", "--unverified-target", "--no-gate",
        "--golden", golden, "--engine", engine,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "was built from another model" in lines[0]
    assert index_of(channel, keys).releases == []


def test_build_engine_where_tensorrt_is_not_installed_says_where_to_run_it(fp32_model, tmp_path):
    from tests.test_publish import models_cli

    out = tmp_path / "m.engine"
    result = models_cli("build-engine", "--model", fp32_model, "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "build-engine needs TensorRT" in lines[0] and "device of the target class" in lines[0]
    assert not list(tmp_path.iterdir())
