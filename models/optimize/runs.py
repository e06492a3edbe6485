"""``edge-models prune`` and ``distill``: the steps as the factory runs them, with their records.

Prune: sensitivity per block, then ``stages`` rounds of DepGraph pruning towards the target, each
followed by its share of distillation from the unpruned model; the result is exported as ONNX with
the source's metadata and a ``pruning`` record (ratio, per-block ratios and sensitivities, MACs
and parameters before and after, steps, losses, frames). Distill: the recovery step alone, from a
teacher into a student with the same head. Both learn from unlabelled frames only, refuse frames
that are evaluation images, show progress with an ETA, and write nothing unless they finish.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import FactoryError
from models.optimize.checkpoint import Checkpoint
from models.optimize.checks import check_ratio, check_schedule
from models.optimize.distill import Recovery, distil, evaluate_loss
from models.optimize.frames import FrameSet, content_hash, frame_paths, refuse_overlap
from models.optimize.seen import classes_seen
from models.optimize.torch_model import (
    Detector,
    count,
    export,
    load_detector,
    training_device,
)
from models.outputs import refuse_existing


@dataclass
class Frames:
    paths: list[Path]
    images: FrameSet  # read from disk as the steps need them


def recovery_frames(folder: Path, data: Path | None, size: int) -> Frames:
    """The frames to learn from, letterboxed at ``size`` when read; none an evaluation image."""
    paths = frame_paths(folder)
    if data is not None:
        from models.datasets import load_dataset

        refuse_overlap(paths, [sample.image for sample in load_dataset(data).samples])
    return Frames(paths, FrameSet(paths, size))


@dataclass
class Learning:
    """What a training run learns from and where it trains: the frames, none an evaluation
    image, and the device. Each command prepares its own; the optimize chain
    prepares one for all its runs (pass it as ``frames``)."""

    frames: Frames
    size: int
    device: Any  # torch.device

    @classmethod
    def prepare(cls, folder: Path, data: Path | None, size: int, device: str = "auto") -> Learning:
        """Raises FactoryError: a device torch does not see, no frames, evaluation images."""
        where = training_device(device)  # refused before the frames are read
        return cls(recovery_frames(folder, data, size), size, where)


def _learning(frames: Path | Learning, data: Path | None, size: int, device: str,
              out: Path, overwrite: bool) -> Learning:  # fmt: skip
    """The run's ``Learning``: the one handed in, else prepared here; an existing output is
    refused before any frame is read."""
    if isinstance(frames, Learning):
        refuse_existing(out, overwrite)
        return frames
    where = training_device(device)
    refuse_existing(out, overwrite)
    return Learning(recovery_frames(frames, data, size), size, where)


def _curve(losses: list[float], points: int = 200) -> list[float]:
    """The loss over the run, at most ``points`` of it (means of equal stretches)."""
    if len(losses) <= points:
        return [round(v, 5) for v in losses]
    chunks = [losses[i * len(losses) // points : (i + 1) * len(losses) // points]
              for i in range(points)]  # fmt: skip
    return [round(sum(c) / len(c), 5) for c in chunks]


def _trained(student: Detector, teacher: Detector, learn: Frames, steps: int, what: str,
             size: int, lr: float, checkpoint: Checkpoint, device: Any,
             before_measuring: Any = None) -> dict[str, Any]:  # fmt: skip
    """``steps`` of distillation into ``student``, measured before and after on the same frames,
    resumed from and kept in ``checkpoint``; ``before_measuring(student)`` runs between the
    training and the last measurement."""
    before = evaluate_loss(student, teacher, learn.images[:4])
    saved = checkpoint.resume() or {}

    def keep(state: Any, step: int) -> None:
        checkpoint.keep(lambda: {"recovery": state()}, f"step {step} of {steps}")

    with checkpoint.stoppable():
        done = _recover(student, teacher, learn, steps, what, lr=lr, device=device,
                        resume=saved.get("recovery"), keep=keep)  # fmt: skip
    if before_measuring is not None:
        before_measuring(student)
    after = evaluate_loss(student, teacher, learn.images[:4])
    return {"steps": steps, "loss": [round(before, 5), round(after, 5)],
            "seconds": round(done.seconds, 1), "curve": _curve(done.losses),
            **_facts(learn, size, device)}  # fmt: skip


def _checkpoint(command: str, out: Path, sources: list[Path], learn: Frames, every_s: float,
                **settings: Any) -> Checkpoint:  # fmt: skip
    """The checkpoint of this run: the same command, output, inputs (by content) and settings
    find it again; anything else starts afresh."""
    return Checkpoint({
        "command": command, "out": str(out.resolve()),
        "sources": [content_hash(p) for p in sources],
        "frames": [content_hash(p) for p in learn.paths], "settings": settings,
        "torch": torch.__version__,
    }, every_s)  # fmt: skip


def _facts(learn: Frames, size: int, device: Any) -> dict[str, Any]:
    """What every record says about how it learnt."""
    return {"frames": len(learn.paths), "train_size": size, "torch": torch.__version__,
            "device": str(device)}  # fmt: skip


def _bar(total: int, what: str, initial: int = 0, unit: str = "step") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=what, unit=unit, file=sys.stderr,
                leave=False, disable=total == 0)  # fmt: skip


def _recover(student: Detector, teacher: Detector, frames: Frames, steps: int, what: str,
             resume: dict[str, Any] | None = None, **options: Any) -> Recovery:  # fmt: skip
    bar = _bar(steps, what, resume["step"] if resume else 0)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        return distil(student, teacher, frames.images, steps, progress=progress, resume=resume,
                      **options)  # fmt: skip
    finally:
        bar.close()


def prune_model(
    model: Path,
    out: Path,
    ratio: float,
    frames: Path | Learning,
    steps: int,
    round_to: int = 8,
    stages: int = 3,
    size: int = 640,
    data: Path | None = None,
    overwrite: bool = False,
    lr: float = 1e-4,
    checkpoint_s: float = 60.0,
    device: str = "auto",
) -> dict[str, Any]:
    """Prune ``model`` by ``ratio`` and recover it (the distillation on ``device``, see
    ``training_device``); write ``out``; returns the pruning record.
    An interrupted run resumes from its checkpoint when called again the same way.

    Raises:
        FactoryError: bad ratio, stages or steps, an existing output, no frames, frames that are
            evaluation images, a model that is not a float YOLOv8 detector.
    """
    from models.optimize.prune import block_ratios, pruner_for, sensitivity

    check_ratio(ratio)
    check_schedule(steps, stages, round_to)
    learning = _learning(frames, data, size, device, out, overwrite)
    learn, where, size = learning.frames, learning.device, learning.size
    checkpoint = _checkpoint("prune", out, [model], learn, checkpoint_s, ratio=ratio, steps=steps,
                             round_to=round_to, stages=stages, size=size, lr=lr)  # fmt: skip
    saved = checkpoint.resume() or {}
    teacher = load_detector(model)
    student = copy.deepcopy(teacher)
    probe = learn.images[: min(4, len(learn.images))]  # the loss is measured on these
    statistics = learn.images[:: max(1, len(learn.images) // 32)][:32]  # importance, reconstruction
    sensed = saved.get("sensitivity")
    if sensed is None:
        print(f"- sensitivity of each block at {ratio:.0%} on {len(probe)} frame(s)",
              file=sys.stderr)  # fmt: skip
        sensed = sensitivity(student, teacher, probe, ratio, round_to, statistics)
    ratios = block_ratios(ratio, sensed)
    macs0, params0 = count(student)
    pruner = pruner_for(student, ratios, ratio, round_to, stages)
    run = _PruneRun(student, teacher, pruner, checkpoint, saved, sensed, where)
    with checkpoint.stoppable():
        for stage in range(len(run.records), stages):
            share = steps // stages + (1 if stage < steps % stages else 0)
            run.stage(stage, stages, share, macs0, learn, probe, statistics, lr)
    macs1, params1 = count(student)
    record = {
        "ratio": ratio,
        "round_to": round_to,
        "stages": run.records,
        "params": [params0, params1],
        "macs": [macs0, macs1],
        "macs_ratio": round(macs1 / macs0, 4),
        "block_ratios": {k: round(v, 3) for k, v in ratios.items()},
        "sensitivity": {k: round(v, 5) for k, v in sensed.items()},
        "importance": "activation spread",
        "reconstruction": "least squares",
        "steps": steps,
        "loss": [round(run.losses[0], 5), round(run.losses[-1], 5)] if run.losses else None,
        "curve": _curve(run.losses),
        "source_sha256": teacher.source_sha256,
        **_facts(learn, size, where),
        "frame_classes": classes_seen(teacher, learn.images),
    }
    export(student, out, {"pruning": record})
    checkpoint.clear()
    return record


class _PruneRun:
    """The stages of one pruning run and what its checkpoint needs to replay them: the channels
    each stage removed (by the root convolution's name), the stage records and losses so far."""

    def __init__(self, student: Detector, teacher: Detector, pruner: Any,
                 checkpoint: Checkpoint, saved: dict[str, Any], sensed: dict,
                 device: Any) -> None:  # fmt: skip
        from models.optimize.prune import replay

        self.student, self.teacher, self.pruner = student, teacher, pruner
        self.checkpoint, self.sensed, self.device = checkpoint, sensed, device
        self.removed: list[list[tuple[str, bool, list[int]]]] = saved.get("removed", [])
        self.records: list[dict[str, Any]] = saved.get("stages", [])
        self.losses: list[float] = saved.get("losses", [])
        self.pruned_loss: float | None = saved.get("pruned_loss")
        self.recovery: dict[str, Any] | None = saved.get("recovery")
        replay(pruner, self.removed)
        if "weights" in saved:
            student.module.load_state_dict(saved["weights"])

    def state(self, recovery: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"sensitivity": self.sensed, "removed": self.removed, "stages": self.records,
                "losses": self.losses, "pruned_loss": self.pruned_loss,
                "weights": self.student.module.state_dict(), "recovery": recovery}  # fmt: skip

    def stage(self, stage: int, stages: int, share: int, macs0: int, learn: Frames,
              probe: Any, statistics: Any, lr: float) -> None:  # fmt: skip
        """Prune this stage's channels (unless the checkpoint already did), then recover."""
        from models.optimize.prune import prune_groups, root_of

        student, teacher = self.student, self.teacher
        if len(self.removed) <= stage:
            names = {id(m): n for n, m in student.module.named_modules()}
            self.removed.append([
                root_of(group, names, self.pruner.DG)
                for group, _ in prune_groups(self.pruner, student, statistics)
            ])  # fmt: skip
            self.pruned_loss = evaluate_loss(student, teacher, probe)
            self.recovery = None
            self.checkpoint.save(self.state(), f"stage {stage + 1}/{stages} pruned")
        macs, params = count(student)

        def keep(state: Any, step: int) -> None:
            self.checkpoint.keep(lambda: self.state(state()),
                                 f"stage {stage + 1}/{stages}, step {step} of {share}")  # fmt: skip

        done = _recover(student, teacher, learn, share, f"stage {stage + 1}/{stages}", lr=lr,
                        device=self.device, resume=self.recovery, keep=keep)  # fmt: skip
        self.recovery = None
        self.losses += done.losses
        self.records.append({
            "stage": stage + 1, "groups": len(self.removed[stage]), "params": params,
            "macs_ratio": round(macs / macs0, 4),
            "loss_after_pruning": round(self.pruned_loss, 5), "steps": share,
            "loss_after_recovery": round(evaluate_loss(student, teacher, probe), 5),
        })  # fmt: skip
        self.checkpoint.save(self.state(), f"stage {stage + 1}/{stages} recovered")
        print(
            f"- stage {stage + 1}/{stages}: {params / 1e6:.2f} M parameters, MACs "
            f"{macs / macs0:.1%}; loss {self.pruned_loss:.4f} after pruning, "
            f"{self.records[-1]['loss_after_recovery']:.4f} after {share} step(s)",
            file=sys.stderr,
        )


def refuse_other_heads(student: Detector, teacher: Detector) -> None:
    """Distillation compares head maps: both models need the same classes and map layout.

    Raises:
        FactoryError: the heads differ (named, with both layouts).
    """
    probe = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        theirs = [tuple(m.shape[1:]) for m in teacher.module.eval()(probe)]
        ours = [tuple(m.shape[1:]) for m in student.module.eval()(probe)]
    if theirs != ours:
        raise FactoryError(
            f"{student.source.name} and {teacher.source.name} have different heads "
            f"({ours} vs {theirs}): distillation needs the same classes and map layout"
        )


def distill_model(
    teacher_path: Path,
    student_path: Path,
    out: Path,
    frames: Path | Learning,
    steps: int,
    size: int = 640,
    data: Path | None = None,
    overwrite: bool = False,
    lr: float = 1e-4,
    checkpoint_s: float = 60.0,
    device: str = "auto",
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (the same head: classes and map layout); write ``out``.
    An interrupted run resumes from its checkpoint when called again the same way.

    Raises:
        FactoryError: bad steps, an existing output, no frames, evaluation images among them,
            models that are not float YOLOv8 detectors or whose heads differ.
    """
    if steps < 1:
        raise FactoryError("--steps must be >= 1")
    learning = _learning(frames, data, size, device, out, overwrite)
    learn, where, size = learning.frames, learning.device, learning.size
    teacher, student = load_detector(teacher_path), load_detector(student_path)
    refuse_other_heads(student, teacher)
    checkpoint = _checkpoint("distill", out, [teacher_path, student_path], learn, checkpoint_s,
                             steps=steps, size=size, lr=lr)  # fmt: skip
    record = {
        "teacher": teacher_path.name,
        "teacher_sha256": teacher.source_sha256,
        **_trained(student, teacher, learn, steps, "distillation", size, lr, checkpoint, where),
        "frame_classes": classes_seen(teacher, learn.images),
    }
    export(student, out, {"distillation": record})
    checkpoint.clear()
    return record


def qat_model(
    model: Path,
    out: Path,
    frames: Path | Learning,
    steps: int,
    target: str,
    size: int = 640,
    data: Path | None = None,
    overwrite: bool = False,
    lr: float = 1e-4,
    checkpoint_s: float = 60.0,
    device: str = "auto",
    teacher_path: Path | None = None,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of ``model`` (float, pruned or not) for ``target``, with
    distillation from ``teacher_path`` (default: ``model`` itself; for a pruned model, the
    unpruned one, so the training recovers what pruning lost as well as what rounding does);
    writes a QDQ ONNX like ``quantize``'s; returns its record.
    An interrupted run resumes from its checkpoint when called again the same way.

    Raises:
        FactoryError: bad steps, an existing output, no frames, evaluation images among them, a
            model that is not a float YOLOv8 detector, a teacher with another head, a target
            this recipe does not cover.
    """
    from models.calibration import CALIBRATION_FRAMES
    from models.optimize.qat import fold_weight_quantizers, freeze, prepare
    from models.quantize import fast_dfl_layout
    from models.recipes import recipe

    check_schedule(steps)
    recipe(target)  # raises for a target the quantizer does not make (rk3588)
    learning = _learning(frames, data, size, device, out, overwrite)
    learn, where, size = learning.frames, learning.device, learning.size
    base = load_detector(model, merge_c2f=True)
    teacher = base
    if teacher_path is not None:  # a model is its own teacher without the check's two forwards
        teacher = load_detector(teacher_path)
        refuse_other_heads(base, teacher)
    with _bar(min(len(learn.images), CALIBRATION_FRAMES), "activation ranges", unit="frame") as bar:
        student, record = prepare(base, target, learn.images, bar.update)
    sources = [model] if teacher_path is None else [model, teacher_path]
    checkpoint = _checkpoint("qat", out, sources, learn, checkpoint_s, steps=steps, size=size,
                             lr=lr, target=target)  # fmt: skip
    record.update(_trained(student, teacher, learn, steps, "quantization-aware training", size,
                           lr, checkpoint, where, before_measuring=freeze))  # fmt: skip
    record["source_sha256"] = base.source_sha256
    if teacher_path is not None:
        record["teacher"], record["teacher_sha256"] = teacher_path.name, teacher.source_sha256
    folded: list[int] = []
    export(student, out, {"quantization": record}, {"precision": "int8", "target": target},
           body_pass=lambda body: folded.append(fold_weight_quantizers(body)),
           model_pass=fast_dfl_layout)  # fmt: skip
    record["weights_folded"] = folded[0] if folded else 0
    checkpoint.clear()
    return record
