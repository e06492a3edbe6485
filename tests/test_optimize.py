"""Pruning and distillation from the factory's side: the graph rewrites (exact, plain onnx), the
frames' hygiene, and `edge-models prune` / `distill` end to end, which re-run themselves in the
training environment (torch lives only there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.contract.errors import ModelError
from models.errors import FactoryError
from models.optimize.frames import frame_paths, refuse_overlap
from models.optimize.graph import HEAD_NAMES, attach_decode, prepare
from tests import models_for_tests
from tests.conftest import ROOT
from tests.test_publish import models_cli


@pytest.fixture(scope="session")
def train_python():
    """torch's own environment; fails (never skips) when scripts/setup-train.sh has not made it."""
    from models.optimize.environment import train_python

    try:
        return train_python()
    except FactoryError as exc:
        pytest.fail(f"this test needs the training environment: {exc}", pytrace=False)


def run(model_path, x):
    session = ort.InferenceSession(
        model_path if isinstance(model_path, bytes) else str(model_path),
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, {"images": x})


def test_the_rewritten_graph_computes_exactly_what_the_source_does(fp32_model):
    source = onnx.load(str(fp32_model))
    prepared = prepare(source)
    assert prepared.split_convs == 8  # one per C2f
    assert [n.name for n in prepared.model.graph.node if n.name in HEAD_NAMES] == HEAD_NAMES
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    expected = run(fp32_model, x)[0]
    assert np.array_equal(run(prepared.model.SerializeToString(), x)[0], expected)
    maps = run(prepared.body.SerializeToString(), x)
    assert [m.shape[1] for m in maps] == [64, 80] * 3
    again = attach_decode(prepared.body, prepared)  # the decode grafted back on the body
    assert np.array_equal(run(again.SerializeToString(), x)[0], expected)


def test_quantize_merges_the_split_back_so_a_pruned_model_runs_the_sources_int8_layout(
    fp32_model, shared, tmp_path
):
    """Pruned models keep C2f's first convolution split (two convolutions, two SiLUs); quantize
    merges the pair back (exact), so INT8 runs one integer convolution where it ran two."""
    from models.calibration import synthesise
    from models.quantize import QuantizeSettings, merge_split_convolutions, quantize

    source = onnx.load(str(fp32_model))
    split = prepare(source).model
    merged = onnx.ModelProto()
    merged.CopyFrom(split)
    assert merge_split_convolutions(merged) == 8
    onnx.checker.check_model(merged)
    x = np.random.default_rng(1).random((1, 3, 640, 640), dtype=np.float32)
    assert np.array_equal(run(merged.SerializeToString(), x)[0], run(fp32_model, x)[0])
    assert merge_split_convolutions(merged) == 0  # nothing left to merge: the source's layout
    convs = lambda m: sum(n.op_type == "Conv" for n in m.graph.node)  # noqa: E731
    assert convs(merged) == convs(source) == convs(split) - 8

    onnx.save(split, str(tmp_path / "split.onnx"))
    calib = tmp_path / "calib"
    synthesise([shared / "images" / "bus.jpg"], calib, per_image=2)
    stages = []
    quantize(tmp_path / "split.onnx", calib, tmp_path / "q.onnx", QuantizeSettings(),
             progress=False, on_stage=stages.append)  # fmt: skip
    assert "8 split C2f convolution(s) merged back" in " ".join(stages)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert convs(quantized) == convs(source) - 1  # the DFL's convolution is a MatMul there


def test_a_model_without_a_yolov8_head_is_not_rewritten(tmp_path):
    tiny = onnx.load(str(models_for_tests.tiny_detector(tmp_path / "tiny.onnx")))
    with pytest.raises(ModelError, match="head"):
        prepare(tiny)


def test_frames_that_are_evaluation_images_are_refused_even_renamed(shared, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(shared / "images" / "bus.jpg", frames / "a.jpg")
    evaluation = sorted((shared / "datasets" / "coco8" / "images").rglob("*.jpg"))
    refuse_overlap(frame_paths(frames), evaluation)  # no overlap: fine
    shutil.copy(evaluation[0], frames / "renamed.jpg")
    with pytest.raises(FactoryError, match=r"renamed\.jpg is the evaluation image"):
        refuse_overlap(frame_paths(frames), evaluation)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FactoryError, match="holds no images"):
        frame_paths(empty)


def one_line_error(result, says):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert says in lines[0], lines[0]


@pytest.mark.parametrize("ratio", ["0", "0.95", "-0.1"])
def test_a_ratio_out_of_range_is_refused_before_anything_runs(ratio, fp32_model, shared, tmp_path):
    out = tmp_path / "p.onnx"
    result = models_cli("prune", "--model", fp32_model, "--ratio", ratio,
                        "--frames", shared / "images", "--out", out)  # fmt: skip
    one_line_error(result, "is out of range: 0 < ratio < 0.9")
    assert not out.exists()


@pytest.mark.parametrize("command", ["prune", "distill", "qat"])
@pytest.mark.parametrize("lr", ["0", "-0.001", "nan", "2"])
def test_a_learning_rate_out_of_range_is_refused_before_anything_runs(
    command, lr, fp32_model, shared, tmp_path
):
    out = tmp_path / "p.onnx"
    models = {
        "prune": ["--model", fp32_model, "--ratio", "0.2"],
        "distill": ["--teacher", fp32_model, "--student", fp32_model],
        "qat": ["--model", fp32_model, "--target", "cpu-x86_64"],
    }[command]
    result = models_cli(command, *models, "--lr", lr, "--frames", shared / "images", "--out", out)
    one_line_error(result, f"--lr {lr} is out of range: 0 < lr < 1")
    assert not out.exists()


def test_qat_for_a_target_the_quantizer_does_not_make_is_refused(fp32_model, shared, tmp_path):
    out = tmp_path / "q.onnx"
    result = models_cli("qat", "--model", fp32_model, "--target", "rk3588",
                        "--frames", shared / "images", "--out", out)  # fmt: skip
    one_line_error(result, "quantizes in rknn-toolkit2")
    assert not out.exists()


def test_optimize_refuses_an_unknown_chain_before_any_work(fp32_model, shared, tmp_path):
    report = tmp_path / "report"
    result = models_cli("optimize", "--model", fp32_model, "--frames", shared / "images",
                        "--data", shared / "datasets" / "coco8", "--target", "cpu-x86_64",
                        "--report", report, "--chains", "ptq,magic")  # fmt: skip
    one_line_error(result, "choose from ptq, prune, prune+ptq, qat, prune+qat")
    assert not report.exists()


def test_a_missing_training_environment_is_one_line(fp32_model, shared, tmp_path):
    out = tmp_path / "p.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "models.cli", "prune", "--model", str(fp32_model), "--ratio", "0.3",
         "--frames", str(shared / "images"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "EDGE_MODELS_TRAIN_PYTHON": str(tmp_path / "no" / "python")},
    )  # fmt: skip
    one_line_error(result, "the training environment is missing")
    assert "setup-train.sh" in result.stderr and not out.exists()


def test_prune_then_distill_end_to_end(train_python, fp32_model, shared, tmp_path):
    pruned, distilled = tmp_path / "pruned.onnx", tmp_path / "distilled.onnx"
    coco8 = shared / "datasets" / "coco8"
    result = models_cli(
        "prune", "--model", fp32_model, "--ratio", "0.3", "--frames", shared / "images",
        "--data", coco8, "--steps", "4", "--stages", "2", "--out", pruned,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sensitivity of each block" in result.stderr and "stage 2/2" in result.stderr
    record = json.loads({p.key: p.value for p in onnx.load(str(pruned)).metadata_props}["pruning"])
    assert record["params"][1] < 0.6 * record["params"][0] and record["steps"] == 4
    assert set(record["sensitivity"]) >= {"model.2", "model.3", "model.21"}
    assert record["block_ratios"]["model.2"] < 0.3  # the most sensitive block is spared
    assert run(pruned, np.zeros((1, 3, 640, 640), np.float32))[0].shape == (1, 84, 8400)
    result = models_cli(
        "distill", "--teacher", fp32_model, "--student", pruned, "--frames", shared / "images",
        "--steps", "3", "--out", distilled,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metadata = {p.key: p.value for p in onnx.load(str(distilled)).metadata_props}
    # what the recovery frames showed: people and a bus, no giraffe (the teacher's own eyes)
    seen = json.loads(metadata["distillation"])["frame_classes"]
    assert seen["sampled"] == len(frame_paths(shared / "images"))
    assert seen["frames_with"]["person"] >= 2 and seen["frames_with"]["giraffe"] == 0
    # judged on coco8's giraffes and elephants, the student is flagged: never recovered on them
    judged = models_cli("evaluate", "--model", fp32_model, "--model", distilled, "--data", coco8,
                        "--rounds", "0", "--resamples", "0", "--quiet")  # fmt: skip
    assert judged.returncode == 0, judged.stderr
    warnings = [line for line in judged.stderr.splitlines() if line.startswith("warning:")]
    assert any("distillation recovery frames show no" in w and "giraffe" in w for w in warnings)
    assert not any("person" in w.split("show no")[1].split("(")[0] for w in warnings), warnings
    assert not any(fp32_model.name in w for w in warnings)


def test_a_student_judged_on_classes_its_frames_lack_is_flagged():
    from models.evaluate import unseen_classes

    record = {"frame_classes": {"sampled": 40, "threshold": 0.5,
                                "frames_with": {"person": 31, "car": 0, "dog": 0}}}  # fmt: skip
    metadata = {"pruning": json.dumps(record)}
    (warning,) = unseen_classes("p.onnx", metadata, ["person", "dog", "car"])
    assert "p.onnx: its pruning recovery frames show no dog, car" in warning
    assert "40 sampled frames" in warning
    assert unseen_classes("p.onnx", metadata, ["person"]) == []
    assert unseen_classes("fp32.onnx", {}, ["dog"]) == []  # no recovery, nothing to say
    assert unseen_classes("bad.onnx", {"pruning": "{not json"}, ["dog"]) == []


def test_bad_recovery_input_is_one_line_and_writes_nothing(train_python, fp32_model, shared,
                                                           tmp_path):  # fmt: skip
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    tiny = models_for_tests.tiny_detector(tmp_path / "tiny.onnx")
    overlap = tmp_path / "frames"
    overlap.mkdir()
    coco8 = shared / "datasets" / "coco8"
    shutil.copy(sorted((coco8 / "images").rglob("*.jpg"))[0], overlap / "mine.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--model", tiny, "--frames", shared / "images"], "is not a YOLOv8 detect model"),
        (["--model", fp32_model, "--frames", empty], "holds no images"),
        (["--model", fp32_model, "--frames", overlap, "--data", coco8], "is the evaluation image"),
        (
            ["--model", fp32_model, "--frames", shared / "images", "--device", "cuda:99"],
            "CUDA GPU(s) here",
        ),
        (
            ["--model", fp32_model, "--frames", shared / "images", "--device", "tpu"],
            "use auto, cpu, cuda or cuda:N",
        ),
    ]
    for arguments, says in cases:
        result = models_cli("prune", "--ratio", "0.3", "--steps", "1", "--out", out, *arguments)
        one_line_error(result, says)
        assert not list(out.parent.iterdir())


def test_ctrl_c_stops_after_a_step_and_the_same_command_resumes(train_python, fp32_model, shared,
                                                                 tmp_path):  # fmt: skip
    """Ctrl-C (to the whole process group, as a terminal sends it) stops the run after the current
    step with its state saved and no output written; the same command again resumes and ends
    where an uninterrupted run does."""
    import signal
    import time

    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "EDGE_MODELS_CHECKPOINTS": str(checkpoints)}

    def prune(out, *extra):
        return [sys.executable, "-m", "models.cli", "prune", "--model", str(fp32_model),
                "--ratio", "0.3", "--frames", str(shared / "images"), "--steps", "24",
                "--stages", "2", "--checkpoint-every", "0", "--out", str(out), *extra]  # fmt: skip

    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    process = subprocess.Popen(
        prune(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches the whole process group
    )  # fmt: skip
    deadline = time.monotonic() + 600  # a deadline for a hang, not a speed: busy hosts are slow
    seen = ""
    while "stage 1/2" not in seen and time.monotonic() < deadline:
        seen += process.stderr.read(1) if process.poll() is None else ""
        if process.poll() is not None:
            break
    assert "stage 1/2" in seen, seen
    os.killpg(process.pid, signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, seen + rest
    assert "run the same command again to resume" in rest
    assert not list(out.parent.iterdir())  # no model, no partial file
    assert len(list(checkpoints.glob("prune-*.pt"))) == 1

    resumed = subprocess.run(prune(out), cwd=ROOT, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert not list(checkpoints.glob("*.pt"))  # a finished run clears its checkpoint
    straight = tmp_path / "straight.onnx"
    whole = subprocess.run(prune(straight), cwd=ROOT, capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr

    def record(path):
        return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["pruning"])

    a, b = record(out), record(straight)
    assert a["params"] == b["params"] and a["block_ratios"] == b["block_ratios"]
    assert len(a["curve"]) == len(b["curve"]) == 24
    assert np.allclose(a["curve"], b["curve"], rtol=1e-3, atol=1e-4), (a["curve"], b["curve"])
