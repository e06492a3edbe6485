"""INT8 per target: recipes, verification on the target's own kernels, and the device's guard.

Nothing here depends on this host's ISA except through the target the code detects: where a
result differs between an AVX2-only and a VNNI host, the expectation is taken from
``agent.contract.targets.detect()``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.config import ModelConfig
from agent.contract import targets
from agent.updates.kernel_check import check_kernels, probe_frames
from agent.updates.selftest import run_self_test
from agent.vision.backends import load_backend
from agent.vision.postprocess import DetectionParams, decode
from agent.vision.preprocess import Preprocessor
from models.channel import create, init_keys
from models.golden import record_golden
from models.kernels import EmulatedRunner, SemanticsRunner, runner_for
from models.probe import first_conv_probe
from models.release import GateSettings, Published, ReleaseRequest, release
from tests.conftest import ROOT
from tests.test_publish import index_of, models_cli

HOST = targets.detect()


def photos(shared: Path) -> list[Path]:
    return [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]


def first_descriptor(channel: Path, keys: Path, target: str) -> dict:
    """The descriptor of the first release's ``target`` variant, as the channel signed it."""
    from models.channel.publish import open_repository

    release = index_of(channel, keys).releases[0]
    with open_repository(channel, keys) as repo:
        return json.loads(repo.read_target(release.variants[target].descriptor))


def metadata(model: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(model)).metadata_props}


# -- quantize --target --------------------------------------------------------------------------
def test_quantize_defaults_to_this_machines_target_and_records_it(fp32_model, calib, tmp_path):
    out = tmp_path / "int8.onnx"
    made = models_cli("quantize", "--model", fp32_model, "--calib", calib, "--out", out, "--quiet")
    assert made.returncode == 0, made.stderr
    assert f"for {HOST.target}" in made.stdout and "(this machine" in made.stderr
    assert metadata(out)["target"] == HOST.target
    assert json.loads(metadata(out)["quantization"])["target"] == HOST.target


def test_each_cpu_target_gets_its_own_recipe(u8s8_model, u8s8_full_model, aarch64_model):
    recipes = {
        path: json.loads(metadata(path)["quantization"])
        for path in (u8s8_model, u8s8_full_model, aarch64_model)
    }
    assert recipes[u8s8_model]["scheme"] == "U8S8"
    assert recipes[u8s8_model]["reduce_range"] == "first"
    assert recipes[u8s8_full_model]["scheme"] == "U8S8"
    assert recipes[u8s8_full_model]["reduce_range"] == "none"
    assert recipes[aarch64_model]["scheme"] == "S8S8"
    assert metadata(u8s8_full_model)["target"] == "cpu-x86_64-vnni"


@pytest.mark.parametrize(
    ("target", "message"),
    [("cpu-x86", "unknown target 'cpu-x86'"), ("rk3588", "rknn-toolkit2")],
)
def test_quantize_refuses_a_target_it_cannot_make_and_writes_nothing(
    target, message, fp32_model, calib, tmp_path
):
    out = tmp_path / "int8.onnx"
    result = models_cli(
        "quantize", "--target", target, "--model", fp32_model, "--calib", calib, "--out", out
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


# -- verification on the target's kernels -------------------------------------------------------
def test_a_vnni_model_is_refused_by_the_gate_unless_this_machine_has_vnni(
    u8s8_full_model, fp32_model, shared
):
    gate = models_cli(
        "gate", "--candidate", u8s8_full_model, "--reference", fp32_model,
        "--data", shared / "datasets" / "coco8", "--rounds", "3",
    )  # fmt: skip
    if HOST.target == "cpu-x86_64-vnni":
        assert gate.returncode == 0, gate.stderr
    else:
        assert gate.returncode == 1
        assert "cannot verify cpu-x86_64-vnni here" in gate.stderr
        assert HOST.target in gate.stderr and "--unverified-target" in gate.stderr


def test_the_aarch64_kernels_keep_the_detections_that_x86_without_vnni_saturates(
    u8s8_full_model, fp32_model, aarch64_runner, shared
):
    """The full-range U8S8 model on ONNX Runtime's aarch64 kernels, under qemu, on 2 photos:
    the same objects as the float model, at close scores."""
    backend = load_backend("onnxruntime", fp32_model, ModelConfig(path=fp32_model))
    pre = Preprocessor(backend.info.imgsz, pool_size=1)
    import cv2

    prepared = [
        pre(cv2.imread(str(p)), out=np.empty((1, 3, 640, 640), np.float32)) for p in photos(shared)
    ]
    tensors = [t for t, _ in prepared]
    params, names = DetectionParams(), backend.info.class_names
    arm = aarch64_runner.run(u8s8_full_model, tensors)
    for (_, box), want, got in zip(prepared, [backend.infer(t) for t in tensors], arm, strict=True):
        expected = sorted((d.class_id, d.score) for d in decode(want, box, params, names))
        found = sorted((d.class_id, d.score) for d in decode(got, box, params, names))
        strong = [(c, s) for c, s in expected if s > 0.5]
        assert [c for c, _ in strong] == [c for c, s in found if s > 0.45]
        for (_, s_want), (_, s_got) in zip(
            sorted(strong, key=lambda x: -x[1]), sorted(found, key=lambda x: -x[1]), strict=False
        ):
            assert abs(s_want - s_got) < 0.05
    assert "qemu-aarch64" in aarch64_runner.describe()


def test_emulated_avx2_kernels_saturate_on_full_range_weights_whatever_the_host(
    u8s8_full_model, u8s8_model, tmp_path
):
    """qemu-x86_64 -cpu Haswell runs the kernels of a plain AVX2 CPU on any x86-64 host: the
    first conv of the full-range model comes out many steps off; the cpu-x86_64 recipe's not."""
    if HOST.arch != "x86_64":
        pytest.fail("this test runs x86-64 kernels under qemu-x86_64: it needs an x86-64 host")
    runner = runner_for("cpu-x86_64", targets.from_cpuinfo("flags: avx2 avx512_vnni", "x86_64"))
    assert isinstance(runner, EmulatedRunner) and runner.cpu == "Haswell"
    steps = {}
    for name, model in (("full", u8s8_full_model), ("first", u8s8_model)):
        probe = tmp_path / f"{name}-probe.onnx"
        probe.write_bytes(first_conv_probe(onnx.load(str(model))))
        frames = probe_frames()
        avx2 = runner.run(probe, frames)
        meant = SemanticsRunner("cpu-x86_64").run(probe, frames)
        steps[name] = max(
            int(np.abs(a.astype(int) - m.astype(int)).max())
            for a, m in zip(avx2, meant, strict=True)
        )
    assert steps["full"] > 8 and steps["first"] <= 1, steps


def test_publish_for_aarch64_gates_on_the_aarch64_kernels_and_says_so(
    tmp_path, aarch64_model, fp32_model, aarch64_runner, shared
):
    keys, channel = new_channel(tmp_path)
    gate = GateSettings(fp32_model, shared / "datasets" / "coco8")
    request = ReleaseRequest(channel, keys, aarch64_model, "2.0.0", name="yolov8n-coco",
                             golden_images=tuple(photos(shared)), gate=gate)  # fmt: skip
    published = release(request)  # the target it was made for, verified under qemu here
    assert isinstance(published, Published) and published.target == "cpu-aarch64", published
    descriptor = first_descriptor(channel, keys, "cpu-aarch64")
    gate = descriptor["gate"]
    assert gate["passed"] and gate["target"] == "cpu-aarch64"
    assert "qemu-aarch64" in gate["kernels"] and "latency_ratio" not in gate["checks"]
    assert gate["checks"]["map50_95_drop_points"] <= 1.0
    assert "qemu-aarch64" in descriptor["golden"]["recorded_on"]


def test_publish_for_openvino_gates_in_openvino_and_says_so(tmp_path, fp32_model, calib, shared):
    """The ``openvino`` target: our QDQ file, judged on OpenVINO's own kernels, the float
    reference timed there too (so the latency ratio compares OpenVINO with itself)."""
    from tests.conftest import quantized_for

    if HOST.arch != "x86_64":
        pytest.fail(f"the openvino target is verified on x86-64; this host is {HOST.arch}")
    (tmp_path / "q").mkdir()
    model = quantized_for("openvino", fp32_model, calib, tmp_path / "q")
    recipe = json.loads(metadata(model)["quantization"])
    assert (recipe["scheme"], recipe["reduce_range"]) == ("U8S8", "first")
    keys, channel = new_channel(tmp_path)
    # coco8's 8 images judge the plumbing, not the accuracy (its interval spans about 10
    # points; the drop on voc2007-val is in docs/performance.md): a 3-point limit
    gate = GateSettings(fp32_model, shared / "datasets" / "coco8", max_map_drop=3.0, rounds=3)
    request = ReleaseRequest(channel, keys, model, "2.0.0", name="yolov8n-coco",
                             golden_images=tuple(photos(shared)), gate=gate)  # fmt: skip
    published = release(request)
    assert isinstance(published, Published) and published.target == "openvino", published
    descriptor = first_descriptor(channel, keys, "openvino")
    checks = descriptor["gate"]["checks"]
    assert descriptor["gate"]["passed"] and descriptor["gate"]["target"] == "openvino"
    assert descriptor["gate"]["kernels"].startswith("native: OpenVINO")
    assert "latency_ratio" in checks and checks["map50_95_drop_points"] <= 3.0
    assert "OpenVINO" in descriptor["golden"]["recorded_on"]


def test_the_openvino_target_is_refused_off_x86_with_what_would_verify_it():
    from models.kernels import UnverifiableTarget

    arm = targets.Detected("cpu-aarch64", "aarch64", "Cortex-A76", ())
    with pytest.raises(UnverifiableTarget, match="OpenVINO's x86-64 CPU kernels"):
        runner_for("openvino", arm)


def test_unverifiable_targets_and_missing_emulation_are_one_line_errors_that_publish_nothing(
    tmp_path, u8s8_model, aarch64_model, fp32_model, shared
):
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    assert models_cli("keys", "init", "--keys", keys, "--channel", channel).returncode == 0
    before = sorted(p.name for p in (channel / "metadata").iterdir())
    common = [
        "publish", "--channel", channel, "--keys", keys, "--version", "1.0.0",
        "--reference", fp32_model, "--data", shared / "datasets" / "coco8",
        "--golden-images", *photos(shared),
    ]  # fmt: skip
    cases = [
        (["--model", fp32_model, "--target", "jetson-orin"], {}, "cannot verify jetson-orin"),
        (["--model", u8s8_model, "--target", "nope"], {}, "unknown target 'nope'"),
        (["--model", u8s8_model, "--target", "cpu-aarch64"], {}, "was made for cpu-x86_64"),
        (
            ["--model", aarch64_model],
            {"EDGE_AGENT_AARCH64_SYSROOT": str(tmp_path / "absent")},
            "scripts/setup-aarch64.sh",
        ),
    ]
    import os
    import subprocess
    import sys

    for args, env, message in cases:
        if env and HOST.arch == "aarch64":
            continue  # verified natively there: no emulation to miss
        result = subprocess.run(
            [sys.executable, "-m", "models.cli", *map(str, common + args)],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, (message, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("edge-models")]
        assert len(errors) == 1
    assert sorted(p.name for p in (channel / "metadata").iterdir()) == before
    assert index_of(channel, keys).releases == []


def test_unverified_target_is_published_on_the_models_semantics_and_recorded(
    tmp_path, u8s8_model, fp32_model, shared
):
    keys, channel = new_channel(tmp_path)
    gate = GateSettings(fp32_model, shared / "datasets" / "coco8", rounds=2)
    request = ReleaseRequest(channel, keys, fp32_model, "1.0.0", name="m", target="jetson-orin",
                             unverified_target=True, golden_images=tuple(photos(shared)),
                             gate=gate)  # fmt: skip
    done = release(request)
    assert isinstance(done, Published) and done.gate["unverified_target"] is True, done
    descriptor = first_descriptor(channel, keys, "jetson-orin")
    assert descriptor["gate"]["unverified_target"] is True
    assert descriptor["gate"]["kernels"].startswith("unverified")


def new_channel(tmp_path):
    keys, channel = tmp_path / "keys", tmp_path / "channel"
    _, root = init_keys(keys, channel)
    create(channel, keys, root, "stable")
    return keys, channel


# -- the device's guard -------------------------------------------------------------------------
def test_the_golden_set_carries_the_first_conv_as_a_small_kernel_probe(u8s8_model, shared):
    golden = record_golden(u8s8_model, photos(shared))
    probe = golden["kernel_probe"]
    assert probe["target"] == "cpu-x86_64"
    assert len(base64.b64decode(probe["onnx_base64"])) < 8_000
    assert check_kernels(probe["onnx_base64"]).max_steps <= 1  # exact on every CPU


def test_the_device_self_test_refuses_a_model_its_int8_kernels_get_wrong(u8s8_full_model, shared):
    """The full-range model's golden set records its meaning (as a VNNI publisher would see it).
    A CPU without VNNI computes other numbers: the self-test must say so, naming the target,
    the features and the recall; elsewhere it passes."""
    golden = record_golden(
        u8s8_full_model, photos(shared), runner=SemanticsRunner("cpu-x86_64-vnni")
    )
    backend = load_backend("onnxruntime", u8s8_full_model, ModelConfig(path=u8s8_full_model))
    result = run_self_test(backend, golden)
    saturates = HOST.target == "cpu-x86_64"
    assert result.passed is not saturates, result.reasons
    assert result.details["target"] == HOST.target
    assert "recall" in result.details and "features" in result.details
    if saturates:
        reason = result.reasons[-1]
        assert "int8 kernels do not compute this model as it means" in reason
        assert "cpu-x86_64" in reason and "avx2" in reason and "golden recall" in reason
        assert "made for cpu-x86_64-vnni" in reason


def test_a_damaged_kernel_probe_fails_the_self_test_without_crashing(u8s8_model, shared):
    golden = record_golden(u8s8_model, photos(shared))
    golden["kernel_probe"]["onnx_base64"] = base64.b64encode(b"not a model").decode()
    backend = load_backend("onnxruntime", u8s8_model, ModelConfig(path=u8s8_model))
    result = run_self_test(backend, golden)
    assert not result.passed and "kernel probe cannot be loaded" in result.reasons[-1]
