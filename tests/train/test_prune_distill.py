"""DepGraph pruning and distillation on the real YOLOv8n, in torch and back in ONNX Runtime."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agent.config import ModelConfig
from agent.vision import load_backend, merge_split_head
from models.errors import FactoryError
from models.optimize.distill import distil, evaluate_loss
from models.optimize.frames import frame_paths, load_frames
from models.optimize.prune import (
    MAX_SHARE,
    block_ratios,
    prune_groups,
    pruner_for,
    replay,
    root_of,
    zero_group,
)
from models.optimize.torch_model import count, export, load_detector, training_device

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def teacher(fp32_model):
    return load_detector(fp32_model)


@pytest.fixture(scope="module")
def frames(shared):
    return load_frames(frame_paths(shared / "images"), (320, 320))


def image(seed=0, size=640):
    return np.random.default_rng(seed).random((1, 3, size, size), dtype=np.float32)


def test_the_converted_model_computes_what_onnxruntime_does(teacher, fp32_model):
    x = image()
    with torch.no_grad():
        maps = [m.numpy() for m in teacher.module.eval()(torch.from_numpy(x))]
    expected = ort.InferenceSession(str(fp32_model), providers=["CPUExecutionProvider"]).run(
        None, {"images": x}
    )[0]
    merged = merge_split_head(maps)
    assert np.abs(merged[0, :4] - expected[0, :4]).max() < 0.01  # px
    assert np.abs(merged[0, 4:] - expected[0, 4:]).max() < 1e-4


def test_removing_channels_equals_switching_them_off(teacher, frames):
    """The dependency graph is exact: every group removed from the pruned model is zeroed in a
    copy of the unpruned one, and both compute the same maps."""
    student = copy.deepcopy(teacher)
    zeroed = copy.deepcopy(teacher)
    pruner = pruner_for(student, {}, 0.3, 8, 1)
    by_name = dict(zeroed.module.named_modules())
    names = {id(m): n for n, m in student.module.named_modules()}
    groups = 0
    for group, changes in prune_groups(pruner, student, frames, reconstruct=False):
        zero_group(group, by_name, names)
        groups += 1
        assert not changes
    assert groups > 20
    x = torch.from_numpy(image(1, 320))
    with torch.no_grad():
        pruned = student.module.eval()(x)
        switched_off = zeroed.module.eval()(x)
    for a, b in zip(pruned, switched_off, strict=True):
        assert torch.abs(a - b).max() < 1e-3
    (_, before), (_, after) = count(teacher), count(student)
    assert after < 0.6 * before


def test_a_pruned_model_exports_to_onnx_with_its_record_and_runs_like_torch(
    teacher, frames, tmp_path
):
    student = copy.deepcopy(teacher)
    pruner = pruner_for(student, block_ratios(0.3, {"model.2": 2.0, "model.9": 0.5}), 0.3, 8, 1)
    for _ in prune_groups(pruner, student, frames):
        pass
    out = tmp_path / "pruned.onnx"
    export(student, out, {"pruning": {"ratio": 0.3}})
    x = image(2)
    with torch.no_grad():
        maps = [m.numpy() for m in student.module.eval()(torch.from_numpy(x))]
    exported = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"images": x}
    )[0]
    expected = merge_split_head(maps)
    assert exported.shape == (1, 84, 8400)
    assert np.abs(exported[0, :4] - expected[0, :4]).max() < 0.01
    assert np.abs(exported[0, 4:] - expected[0, 4:]).max() < 1e-4
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["pruning"]) == {"ratio": 0.3} and "names" in metadata
    backend = load_backend("onnxruntime", out, ModelConfig(path=out))  # the agent reads it
    assert backend.info.num_classes == 80 and backend.info.imgsz == (640, 640)


def test_twenty_distillation_steps_lower_the_loss(teacher, frames):
    student = copy.deepcopy(teacher)
    for _ in prune_groups(pruner_for(student, {}, 0.3, 8, 1), student, frames):
        pass
    before = evaluate_loss(student, teacher, frames)
    recovery = distil(student, teacher, frames, 20, batch=2)
    after = evaluate_loss(student, teacher, frames)
    assert len(recovery.losses) == 20 and all(np.isfinite(recovery.losses))
    assert after < 0.8 * before, (before, after)


def test_streamed_frames_read_as_the_agent_letterboxes_and_augment_within_the_frame(shared):
    """Recovery reads frames from disk as it needs them (3,522 frames at 640 px would be 17 GB
    in memory): indexing gives what load_frames gives, and the augmented crops stay valid
    letterboxed inputs that differ from the plain frames."""
    import random

    from models.optimize.frames import FrameSet

    paths = frame_paths(shared / "images")
    streamed = FrameSet(paths, 320)
    loaded = load_frames(paths, (320, 320))
    assert len(streamed) == len(paths)
    assert np.array_equal(streamed[:], loaded)
    assert np.array_equal(streamed[[1, 0]], loaded[[1, 0]])
    crops = streamed.augmented([0, 1, 0], random.Random(3))
    assert crops.shape == (3, 3, 320, 320) and crops.dtype == np.float32
    assert crops.min() >= 0.0 and crops.max() <= 1.0
    assert not np.array_equal(crops[0], loaded[0]) and not np.array_equal(crops[0], crops[2])


def test_distillation_streams_augmented_frames_and_lowers_the_loss(teacher, shared):
    from models.optimize.frames import FrameSet

    student = copy.deepcopy(teacher)
    frames = FrameSet(frame_paths(shared / "images"), 320)
    for _ in prune_groups(pruner_for(student, {}, 0.3, 8, 1), student, frames[:]):
        pass
    before = evaluate_loss(student, teacher, frames[:])
    distil(student, teacher, frames, 20, batch=2)
    assert evaluate_loss(student, teacher, frames[:]) < 0.8 * before


def test_reconstruction_keeps_a_pruned_model_nearer_its_teacher(teacher, frames):
    """The consumers of removed channels take over what those carried (predicted from the
    channels that stay): the pruned model strays less from its teacher than without."""
    losses = {}
    for reconstruct in (False, True):
        student = copy.deepcopy(teacher)
        pruner = pruner_for(student, {}, 0.1, 8, 1)
        for _ in prune_groups(pruner, student, frames, reconstruct=reconstruct):
            pass
        losses[reconstruct] = evaluate_loss(student, teacher, frames)
    assert losses[True] < 0.7 * losses[False], losses


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4])
def test_rounding_to_eight_never_cuts_a_thin_layer_far_past_its_ratio(teacher, frames, ratio):
    """Channel counts end on multiples of 8, but no layer loses more than 1.5 x the ratio (with
    torch-pruning's own rounding, 5 % halved the 16-channel stem and first block: mAP 0)."""
    student = copy.deepcopy(teacher)
    before = {name: conv.out_channels for name, conv in student.names.items()}
    pruner = pruner_for(student, {}, ratio, 8, 2)
    for _stage in range(2):
        for _ in prune_groups(pruner, student, frames):
            pass
    cut = False
    for name, conv in student.names.items():
        n, kept = before[name], conv.out_channels
        assert kept % 8 == 0 and kept >= n * (1 - MAX_SHARE * ratio) - 1e-9, (name, n, kept)
        cut = cut or kept < n
    assert cut, "nothing was pruned"


def test_resumed_distillation_ends_where_an_uninterrupted_one_does(teacher, frames):
    straight = copy.deepcopy(teacher)
    whole = distil(straight, teacher, frames, 6, batch=2)
    first, saved = copy.deepcopy(teacher), {}

    class Killed(Exception):
        pass

    def keep(state, step):
        if step == 3:
            saved.update(state())
            raise Killed  # the same run, stopped half-way (its schedule spans all 6 steps)

    with pytest.raises(Killed):
        distil(first, teacher, frames, 6, batch=2, keep=keep)
    resumed = copy.deepcopy(teacher)  # a fresh process: the weights come from the state
    rest = distil(resumed, teacher, frames, 6, batch=2, resume=saved)
    assert len(rest.losses) == 6
    assert np.allclose(rest.losses, whole.losses, rtol=1e-4), (rest.losses, whole.losses)
    for a, b in zip(straight.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_replayed_stage_leaves_the_schedule_where_the_original_run_had_it(teacher, frames):
    """A resumed pruning rebuilds the stages it had done from their record, and its next stage
    removes what an uninterrupted run's next stage removes."""
    straight = copy.deepcopy(teacher)
    pruner = pruner_for(straight, {}, 0.3, 8, 2)
    names = {id(m): n for n, m in straight.module.named_modules()}
    done = [
        [root_of(group, names, pruner.DG) for group, _ in prune_groups(pruner, straight, frames)]
    ]
    resumed = copy.deepcopy(teacher)
    again = pruner_for(resumed, {}, 0.3, 8, 2)
    replay(again, done)
    assert count(resumed) == count(straight)
    resumed.module.load_state_dict(straight.module.state_dict())  # the checkpoint's weights
    for _ in prune_groups(pruner, straight, frames):
        pass
    for _ in prune_groups(again, resumed, frames):
        pass
    assert count(resumed) == count(straight)
    x = torch.from_numpy(image(3, 320))
    with torch.no_grad():
        for a, b in zip(straight.module.eval()(x), resumed.module.eval()(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_training_runs_where_torch_sees_a_gpu_and_refuses_one_it_does_not():
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert training_device("cpu").type == "cpu"
    with pytest.raises(FactoryError, match="CUDA GPU"):
        training_device("cuda:99")


def test_optimize_writes_one_report_for_every_chain(fp32_model, shared, tmp_path, monkeypatch):
    from agent.contract.targets import detect as detect_target
    from models.optimize.chain import optimize
    from models.optimize.frames import frame_paths as paths

    monkeypatch.setenv("EDGE_MODELS_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setattr("models.calibration.CALIBRATION_FRAMES", 1)  # of the two photos
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for path in paths(shared / "images"):
        (frames_dir / path.name).write_bytes(path.read_bytes())
    report = tmp_path / "report"
    data = optimize(fp32_model, frames_dir, shared / "datasets" / "coco8",
                    detect_target().target, report,
                    ["ptq", "prune", "prune+ptq", "qat", "prune+qat"],
                    steps=2, qat_steps=2, rounds=2)  # fmt: skip
    names = [m["name"].split(" ")[0] for m in data["models"]]
    assert names == ["source", "ptq", "prune", "prune+ptq", "qat", "prune+qat"]
    assert data["macs"][2] < 0.75 * data["macs"][0]  # 30 % of the channels: about 0.6x MACs
    assert abs(data["macs"][1] / data["macs"][0] - 1) < 0.01  # PTQ: the same convolutions
    for made in ("report.md", "report.json", "comparison.png", "accuracy_vs_latency.png",
                 "recovery.png", "models/pruned-ptq.onnx", "models/qat.onnx",
                 "models/pruned-qat.onnx"):  # fmt: skip
        assert (report / made).is_file(), made
    assert len(data["records"]["prune"]["curve"]) == 2
    assert data["records"]["prune+qat"]["teacher"] == fp32_model.name
    for ptq in ("ptq.onnx", "pruned-ptq.onnx"):  # picked as `quantize --frames` picks, not all
        metadata = {p.key: p.value for p in onnx.load(str(report / "models" / ptq)).metadata_props}
        assert json.loads(metadata["quantization"])["calibration_images"] == 1, ptq
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    assert not list((tmp_path / "checkpoints").iterdir())  # the stash goes once the report is made
