from pathlib import Path

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.contract.errors import BackendUnavailable, ModelError
from agent.vision.backends import available_backends, load_backend
from agent.vision.backends.onnxruntime import resolve_providers
from tests import models_for_tests


def load(path: Path, **options):
    return load_backend("onnxruntime", path, ModelConfig(path=path, **options))


def test_model_info_comes_from_onnx_metadata(fp32_backend, dynamic_backend):
    info = fp32_backend.info
    assert info.imgsz == (640, 640)
    assert info.num_classes == 80
    assert info.class_names[0] == "person" and info.class_names[79] == "toothbrush"
    assert info.stride == 32
    assert info.precision == "fp32"
    assert info.provider == "CPUExecutionProvider"
    assert info.model_version.startswith("sha256:8868c7b16efa")
    assert dynamic_backend.info.precision == "int8"


def test_config_overrides_class_names(tmp_path):
    path = models_for_tests.tiny_detector(tmp_path / "tiny.onnx", classes=2)
    backend = load(path, names={0: "cat", 1: "dog"})
    assert backend.info.class_names == {0: "cat", 1: "dog"}
    assert backend.infer(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 6, 84)


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"model file not found: .*nope\.onnx"):
        load(tmp_path / "nope.onnx")


def test_empty_model_file_is_refused(tmp_path):
    path = tmp_path / "empty.onnx"
    path.touch()
    with pytest.raises(ModelError, match="model file is empty"):
        load(path)


def test_corrupt_model_file_is_refused(tmp_path, fp32_model):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(fp32_model.read_bytes()[:200_000])  # a truncated download
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load(path)


def test_classifier_is_refused_as_not_a_detect_head(tmp_path):
    with pytest.raises(
        ModelError, match=r"expected output \[1, 4\+classes, anchors\].*\[1, 1000\]"
    ):
        load(models_for_tests.classifier(tmp_path / "cls.onnx"))


def test_image_to_image_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="YOLOv8 detect head"):
        load(models_for_tests.identity(tmp_path / "id.onnx"))


def test_segmentation_task_is_refused(tmp_path):
    path = models_for_tests.tiny_detector(tmp_path / "seg.onnx", metadata={"task": "segment"})
    with pytest.raises(ModelError, match="task is 'segment'"):
        load(path)


def test_class_name_count_must_match_the_head(tmp_path):
    path = models_for_tests.tiny_detector(
        tmp_path / "t.onnx", classes=2, metadata={"names": "{0: 'a'}"}
    )
    with pytest.raises(ModelError, match="2 class scores but 1 class names"):
        load(path)


def test_unknown_backend_is_reported_with_the_known_ones(fp32_model):
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'nonesuch' .*onnxruntime"):
        load_backend("nonesuch", fp32_model, ModelConfig(path=fp32_model))
    assert available_backends()["onnxruntime"] == "available"


def test_unavailable_providers_are_skipped_and_cpu_is_the_last_resort():
    chosen = resolve_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider"], ["CPUExecutionProvider"], None
    )
    assert chosen == [("CPUExecutionProvider", {})]


def test_tensorrt_provider_gets_its_engine_cache(tmp_path):
    chosen = resolve_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        tmp_path,
    )
    assert [name for name, _ in chosen] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert chosen[0][1]["trt_engine_cache_path"] == str(tmp_path)
    assert chosen[0][1]["trt_engine_cache_enable"] == "True"


def test_no_usable_provider_is_an_error():
    with pytest.raises(BackendUnavailable, match="none of the providers"):
        resolve_providers(["CUDAExecutionProvider"], ["TensorrtExecutionProvider"], None)


def test_warmup_runs_happen_at_load(tmp_path, monkeypatch):
    from agent.vision.backends.onnxruntime import OnnxRuntimeBackend

    calls = []
    original = OnnxRuntimeBackend.infer
    monkeypatch.setattr(
        OnnxRuntimeBackend, "infer", lambda self, t: calls.append(1) or original(self, t)
    )
    path = models_for_tests.tiny_detector(tmp_path / "tiny.onnx")
    load(path, warmup_runs=3)
    assert len(calls) == 3
    calls.clear()
    load(path, warmup_runs=0)
    assert len(calls) == 1  # the output check always runs once


def test_memory_freed_between_live_objects_goes_back_to_the_system():
    """glibc keeps freed heap pages that lie between live allocations; a swapped-out model or a
    drained outage buffer would stay in the agent's RSS for good without ``malloc_trim``."""
    import os

    import psutil

    from agent.vision import release_freed_memory

    process = psutil.Process(os.getpid())
    blocks = [bytes(2048) for _ in range(100_000)]  # 200 MB on the heap, not mmap'd
    survivors = blocks[::16]  # pin the heap: the pages between them are free but kept
    del blocks
    before = process.memory_info().rss
    assert release_freed_memory()
    after = process.memory_info().rss
    assert before - after > 100 * 2**20, (before / 2**20, after / 2**20)
    assert len(survivors) == 6250
