"""RK3588: the head cut by structure and finished on the CPU (checked against ONNX Runtime running
the whole graph), the INT8 conversion on rknn-toolkit2's simulator (reference detections,
coco8 mAP), the refused full-graph conversion, and clean refusals where the toolchain or the NPU
runtime is missing."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import weakref

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.config import ModelConfig
from agent.contract.errors import BackendUnavailable, ModelError
from agent.vision import Preprocessor, load_backend, merge_split_head, npu_input
from models.convert.split_head import cut_at_head, head_maps
from tests import models_for_tests
from tests.conftest import run_agent_on_backend
from tests.test_detection_reference import detect
from tests.test_publish import models_cli

IMAGES = ("bus", "zidane")


@pytest.fixture(scope="session")
def rknn_python():
    """rknn-toolkit2's own environment; fails (never skips) when scripts/setup-rknn.sh has not
    made it."""
    from models.convert.rknn import toolkit_python
    from models.errors import FactoryError

    try:
        return toolkit_python()
    except FactoryError as exc:
        pytest.fail(f"this test needs the RKNN conversion environment: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def cut_model(fp32_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cut") / "cut.onnx"
    cut_at_head(fp32_model, out)
    return out


def tensor_of(shared, name):
    tensor, _ = Preprocessor((640, 640), pool_size=1)(
        cv2.imread(str(shared / "images" / f"{name}.jpg"))
    )
    return np.array(tensor)


# -- the split head, against the whole graph ------------------------------------------------------
@pytest.mark.parametrize("name", IMAGES)
def test_the_split_head_finished_on_the_cpu_equals_the_whole_graph(name, shared, fp32_model,
                                                                   cut_model):  # fmt: skip
    x = tensor_of(shared, name)
    whole = ort.InferenceSession(str(fp32_model), providers=["CPUExecutionProvider"])
    cut = ort.InferenceSession(str(cut_model), providers=["CPUExecutionProvider"])
    expected = whole.run(None, {"images": x})[0]
    merged = merge_split_head(cut.run(None, {"images": x}))
    assert merged.shape == expected.shape == (1, 84, 8400)
    assert np.abs(merged[0, :4] - expected[0, :4]).max() < 0.5  # px at the network input
    assert np.abs(merged[0, 4:] - expected[0, 4:]).max() < 1e-4  # scores


def test_the_head_is_found_by_structure_not_by_names(fp32_model):
    model = onnx.load(str(fp32_model))
    renamed = {}
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
        for j, output in enumerate(node.output):
            renamed[output] = renamed.get(output, f"t{i}_{j}")
    for node in model.graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
        node.output[:] = [renamed.get(x, x) for x in node.output]
    for output in model.graph.output:
        output.name = renamed.get(output.name, output.name)
    maps = head_maps(model)
    assert [(m.kind, m.channels, m.height) for m in maps] == [
        ("box", 64, 80), ("class", 80, 80), ("box", 64, 40), ("class", 80, 40),
        ("box", 64, 20), ("class", 80, 20),
    ]  # fmt: skip


def test_a_model_without_a_yolov8_head_is_refused(tmp_path):
    path = models_for_tests.tiny_detector(tmp_path / "tiny.onnx")
    with pytest.raises(ModelError, match="head"):
        cut_at_head(path, tmp_path / "cut.onnx")
    assert not (tmp_path / "cut.onnx").exists()


def test_the_npu_input_is_the_letterboxed_image_in_uint8_nhwc():
    tensor = np.random.default_rng(0).integers(0, 256, (1, 3, 8, 6)).astype(np.float32) / 255
    image = npu_input(tensor)
    assert image.dtype == np.uint8 and image.shape == (1, 8, 6, 3)
    assert np.array_equal(image[0].transpose(2, 0, 1), np.round(tensor[0] * 255))


# -- the toolkit and its simulator --------------------------------------------------------------
def test_rk3588_int8_on_the_simulator_detects_what_the_float_model_does(
    rknn_python, fp32_model, fp32_backend, calib, shared, tmp_path
):
    from models.convert.rknn import SavedOutputs, convert, letterbox_images

    images = [shared / "images" / f"{name}.jpg" for name in IMAGES]
    prepared = letterbox_images(images, (640, 640))
    handed: list[weakref.ref] = []
    alive_at_each_hand = []

    def one_at_a_time():  # fresh copies, so only the conversion can keep them alive
        for tensor, _ in prepared:
            gc.collect()
            alive_at_each_hand.append(sum(ref() is not None for ref in handed))
            copy = tensor.copy()
            handed.append(weakref.ref(copy))
            yield copy

    done = convert(fp32_model, calib, tmp_path / "yolov8n.rknn", one_at_a_time())
    # the evaluation images are consumed as they come (a whole set would not fit in memory),
    # and the outputs wait on disk, not in a list
    assert max(alive_at_each_hand) <= 1  # at most the one being saved, never the set
    assert isinstance(done.outputs, SavedOutputs) and len(done.outputs) == len(images)
    assert (tmp_path / "yolov8n.rknn").stat().st_size > 1_000_000
    record = json.loads((tmp_path / "yolov8n.rknn.json").read_text())
    assert record["imgsz"] == [640, 640] and "names" in record["metadata"]
    assert record["algorithm"] == "normal" and record["hybrid"] is None  # plain INT8 by default
    assert record["calibration_frames"] == 32  # the fixture's 32, all of them at the default
    names = fp32_backend.info.class_names
    from agent.vision import DetectionParams, decode

    for path, output, (_, box) in zip(images, done.outputs, prepared, strict=True):
        found = decode(output, box, DetectionParams(confidence=0.25), names)
        reference = detect(fp32_backend, cv2.imread(str(path)), confidence=0.25)
        strong = [d for d in reference if d.score > 0.5]
        for want in strong:  # every confident float detection, found again with its score
            match = max((d for d in found if d.class_id == want.class_id),
                        key=lambda d: _iou(d.box, want.box), default=None)  # fmt: skip
            assert match is not None and _iou(match.box, want.box) > 0.8, (path.name, want)
            assert abs(match.score - want.score) < 0.05, (path.name, want, match)


def _iou(a, b) -> float:
    from tests.reference import iou

    return iou(a, b)


def test_convert_cli_reports_simulator_map_beside_the_float(rknn_python, fp32_model, calib,
                                                            shared, tmp_path):  # fmt: skip
    out = tmp_path / "m.rknn"
    result = models_cli(
        "convert", "--target", "rk3588", "--model", fp32_model, "--calib", calib, "--out", out,
        "--data", shared / "datasets" / "coco8", "--json", "--hybrid", "0.95", "--count", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["runtime"].split()[0]: r for r in json.loads(result.stdout)["results"]}
    float_map, npu_map = rows["onnxruntime"]["map50_95"], rows["rk3588"]["map50_95"]
    assert npu_map >= float_map - 0.015, (float_map, npu_map)  # within 1.5 points
    low, high = rows["rk3588"]["interval_points"]  # paired bootstrap over the 8 images
    assert low <= rows["rk3588"]["delta_points"] <= high
    assert rows["rk3588"]["delta_points"] == pytest.approx((npu_map - float_map) * 100, abs=0.01)
    record = json.loads(out.with_name("m.rknn.json").read_text())
    asked = ("normal", 0.95, 16)  # what was asked, kept beside the model
    assert (record["algorithm"], record["hybrid"], record["calibration_frames"]) == asked


@pytest.mark.parametrize(
    "flag, value",
    [("--hybrid", "1.5"), ("--hybrid", "0"), ("--hybrid", "abc"), ("--count", "0")],
)
def test_a_bad_hybrid_threshold_or_frame_count_is_refused_before_anything_runs(
    flag, value, tmp_path
):
    out = tmp_path / "m.rknn"
    result = models_cli(
        "convert", "--target", "rk3588", "--model", tmp_path / "none.onnx", "--calib", tmp_path,
        "--out", out, flag, value,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"argument {flag}" in result.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_the_whole_graph_in_int8_is_refused_and_nothing_is_written(rknn_python, fp32_model,
                                                                     calib, tmp_path):  # fmt: skip
    out = tmp_path / "full.rknn"
    result = models_cli(
        "convert", "--target", "rk3588", "--model", fp32_model, "--calib", calib, "--out", out,
        "--full-graph",
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the whole graph in INT8 is refused for rk3588" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("*.json"))


# -- where the toolchain or the NPU is missing ----------------------------------------------------
def test_a_missing_conversion_environment_is_one_line(fp32_model, calib, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "m.rknn"
    result = subprocess.run(
        [sys.executable, "-m", "models.cli", "convert", "--target", "rk3588", "--model",
         str(fp32_model), "--calib", str(calib), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "EDGE_MODELS_RKNN_PYTHON": str(tmp_path / "no" / "python")},
    )  # fmt: skip
    assert result.returncode == 1
    assert "RKNN conversion environment is missing" in result.stderr
    assert "setup-rknn.sh" in result.stderr and not out.exists()


def test_an_rknn_model_without_the_npu_runtime_is_refused_cleanly(tmp_path, bus_video):
    model = tmp_path / "m.rknn"
    model.write_bytes(b"RKNN" + bytes(64))
    with pytest.raises(BackendUnavailable, match=r"'rknn' is not installed here: .*rknnlite"):
        load_backend("rknn", model, ModelConfig(path=model, backend="rknn"))
    result = run_agent_on_backend(tmp_path, model, bus_video, "rknn")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "backend 'rknn' is not installed here" in result.stderr


# -- publishing for the RK3588 ------------------------------------------------------------------
def _new_channel(tmp_path):
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    assert models_cli("keys", "init", "--keys", keys, "--channel", channel).returncode == 0
    return ["--channel", channel, "--keys", keys, "--name", "yolov8n-coco"], channel, keys


def test_publish_for_rk3588_ships_the_very_build_its_simulator_gated(
    rknn_python, fp32_model, calib, shared, tmp_path
):
    from agent.contract.targets import for_backend
    from agent.updates.ota import choose
    from agent.vision.backends.model_record import read_record
    from models.channel.publish import open_repository
    from models.release import GateSettings, Published, ReleaseRequest, release
    from tests.test_publish import index_of

    _, channel, keys = _new_channel(tmp_path)
    images = tuple(shared / "images" / f"{name}.jpg" for name in IMAGES)
    gate = GateSettings(fp32_model, shared / "datasets" / "coco8", max_map_drop=1.5)
    published = release(ReleaseRequest(channel, keys, fp32_model, "1.0.0", name="yolov8n-coco",
                                       target="rk3588", calib=calib, golden_images=images,
                                       gate=gate))  # fmt: skip
    assert isinstance(published, Published), published
    assert (published.name, published.target) == ("yolov8n-coco", "rk3588")
    index = index_of(channel, keys)
    variant = index.releases[0].variants["rk3588"]
    with open_repository(channel, keys) as repo:
        raw = repo.read_target(variant.descriptor)
        descriptor = json.loads(raw)
        shipped = repo.read_target(descriptor["file"]["path"])
    assert descriptor["format"] == "rknn" and descriptor["precision"] == "int8"
    assert descriptor["file"]["sha256"] == hashlib.sha256(shipped).hexdigest()
    gate = descriptor["gate"]
    assert gate["passed"] and "simulator" in gate["kernels"] and gate["target"] == "rk3588"
    assert gate["checks"]["map50_95_drop_points"] <= 1.5 and "latency_ratio" not in gate["checks"]
    golden = descriptor["golden"]
    assert "simulator" in golden["recorded_on"] and "kernel_probe" not in golden
    bus = next(e for e in golden["images"] if e["name"] == "bus.jpg")
    assert any(d["label"] == "bus" and d["score"] > 0.5 for d in bus["detections"])

    # a board running the rknn backend takes it; one running ONNX Runtime follows CPU models
    assert choose(index, "yolov8n-coco", for_backend("rk3588", "rknn"), "d1", None)
    assert choose(index, "yolov8n-coco", for_backend("rk3588", "onnxruntime"), "d1", None) is None
    # installed over the air, the .rknn finds its names and size in the slot's descriptor
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "model.rknn").write_bytes(shipped)
    (slot / "descriptor.json").write_bytes(raw)
    record = read_record(slot / "model.rknn")
    assert record.imgsz == (640, 640) and record.names[5] == "bus"
    assert record.metadata["model_name"] == "yolov8n-coco"
    assert record.metadata["model_version"] == "1.0.0" and record.metadata["precision"] == "int8"


@pytest.mark.parametrize(
    "model, extra, says",
    [
        ("m.rknn", ["--calib", "CALIB"], "converts the float ONNX itself"),
        ("fp32", [], "needs --calib DIR"),
        ("int8", ["--calib", "CALIB"], "quantizes the float model itself"),
    ],
)
def test_publish_for_rk3588_refuses_what_it_cannot_verify(
    model, extra, says, fp32_model, u8s8_model, calib, shared, tmp_path
):
    from tests.test_publish import index_of

    common, channel, keys = _new_channel(tmp_path)
    path = {"fp32": fp32_model, "int8": u8s8_model}.get(model, tmp_path / model)
    if model.endswith(".rknn"):
        path.write_bytes(b"RKNN" + bytes(64))
    result = models_cli(
        "publish", *common, "--model", path, "--version", "1.0.0", "--target", "rk3588",
        "--no-gate", "--golden-images", shared / "images" / "bus.jpg",
        *[calib if a == "CALIB" else a for a in extra],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert index_of(channel, keys).releases == []


def test_a_compiled_model_reads_its_names_from_its_sidecar_or_its_ota_descriptor(tmp_path):
    from agent.vision.backends.model_record import read_record

    model = tmp_path / "m.rknn"
    model.write_bytes(b"RKNN")
    with pytest.raises(ModelError, match=r"no m\.rknn\.json .* and no descriptor\.json"):
        read_record(model)
    (tmp_path / "descriptor.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"descriptor\.json is unreadable"):
        read_record(model)
    sidecar = {"imgsz": [480, 640], "sha256": "ab" * 32,
               "metadata": {"names": "{0: 'person', 1: 'bicycle'}", "model_name": "n"}}  # fmt: skip
    (tmp_path / "m.rknn.json").write_text(json.dumps(sidecar))
    record = read_record(model)  # the converter's record wins over a slot's descriptor
    assert record.imgsz == (480, 640) and record.names == {0: "person", 1: "bicycle"}
    assert record.identity == "ab" * 6 and record.metadata["model_name"] == "n"


def test_the_cpu_gate_points_rk3588_models_to_the_simulator(fp32_model, shared):
    result = models_cli(
        "gate", "--candidate", fp32_model, "--reference", fp32_model,
        "--data", shared / "datasets" / "coco8", "--target", "rk3588",
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "simulator during their conversion" in lines[0] and "--calib DIR" in lines[0]
