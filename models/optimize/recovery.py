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
from models.optimize.checks import check_ratio, check_schedule
from models.optimize.distill import Recovery, distil, evaluate_loss
from models.optimize.frames import frame_paths, load_frames, refuse_overlap
from models.optimize.torch_model import Detector, count, export, load_detector
from models.outputs import refuse_existing


@dataclass
class Frames:
    paths: list[Path]
    batch: Any  # [N, 3, S, S] float32


def recovery_frames(folder: Path, data: Path | None, size: int) -> Frames:
    """The frames to learn from, letterboxed at ``size``; none of them an evaluation image."""
    paths = frame_paths(folder)
    if data is not None:
        from models.datasets import load_dataset

        refuse_overlap(paths, [sample.image for sample in load_dataset(data).samples])
    return Frames(paths, load_frames(paths, (size, size)))


def _curve(losses: list[float], points: int = 200) -> list[float]:
    """The loss over the run, at most ``points`` of it (means of equal stretches)."""
    if len(losses) <= points:
        return [round(v, 5) for v in losses]
    chunks = [losses[i * len(losses) // points : (i + 1) * len(losses) // points]
              for i in range(points)]  # fmt: skip
    return [round(sum(c) / len(c), 5) for c in chunks]


def _trained(student: Detector, teacher: Detector, learn: Frames, steps: int, what: str,
             size: int, lr: float, before_measuring: Any = None) -> dict[str, Any]:  # fmt: skip
    """``steps`` of distillation into ``student``, measured before and after on the same frames;
    ``before_measuring(student)`` runs between the training and the last measurement."""
    before = evaluate_loss(student, teacher, learn.batch[:4])
    done = _recover(student, teacher, learn, steps, what, lr=lr)
    if before_measuring is not None:
        before_measuring(student)
    after = evaluate_loss(student, teacher, learn.batch[:4])
    return {"steps": steps, "loss": [round(before, 5), round(after, 5)],
            "seconds": round(done.seconds, 1), "curve": _curve(done.losses),
            **_facts(learn, size)}  # fmt: skip


def _facts(learn: Frames, size: int) -> dict[str, Any]:
    """What every record says about how it learnt."""
    return {"frames": len(learn.paths), "train_size": size, "torch": torch.__version__}


def _bar(total: int, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="step", file=sys.stderr, leave=False,
                disable=total == 0)  # fmt: skip


def _recover(student: Detector, teacher: Detector, frames: Frames, steps: int, what: str,
             **options: Any) -> Recovery:  # fmt: skip
    bar = _bar(steps, what)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        return distil(student, teacher, frames.batch, steps, progress=progress, **options)
    finally:
        bar.close()


def prune_model(
    model: Path,
    out: Path,
    ratio: float,
    frames: Path,
    steps: int,
    round_to: int = 8,
    stages: int = 3,
    size: int = 320,
    data: Path | None = None,
    overwrite: bool = False,
    lr: float = 1e-4,
) -> dict[str, Any]:
    """Prune ``model`` by ``ratio`` and recover it; write ``out``; returns the pruning record.

    Raises:
        FactoryError: bad ratio, stages or steps, an existing output, no frames, frames that are
            evaluation images, a model that is not a float YOLOv8 detector.
    """
    from models.optimize.prune import block_ratios, prune_groups, pruner_for, sensitivity

    check_ratio(ratio)
    check_schedule(steps, stages, round_to)
    refuse_existing(out, overwrite)
    learn = recovery_frames(frames, data, size)
    teacher = load_detector(model)
    student = copy.deepcopy(teacher)
    probe = learn.batch[: min(4, len(learn.batch))]
    print(f"- sensitivity of each block at {ratio:.0%} on {len(probe)} frame(s)", file=sys.stderr)
    sensed = sensitivity(student, teacher, probe, ratio, round_to)
    ratios = block_ratios(ratio, sensed)
    macs0, params0 = count(student)
    pruner = pruner_for(student, ratios, ratio, round_to, stages)
    stage_records, losses = [], []
    for stage in range(stages):
        groups = sum(1 for _ in prune_groups(pruner))
        macs, params = count(student)
        pruned_loss = evaluate_loss(student, teacher, probe)
        share = steps // stages + (1 if stage < steps % stages else 0)
        done = _recover(student, teacher, learn, share, f"stage {stage + 1}/{stages}", lr=lr)
        losses += done.losses
        stage_records.append({
            "stage": stage + 1, "groups": groups, "params": params,
            "macs_ratio": round(macs / macs0, 4), "loss_after_pruning": round(pruned_loss, 5),
            "steps": share, "loss_after_recovery": round(evaluate_loss(student, teacher, probe), 5),
        })  # fmt: skip
        print(
            f"- stage {stage + 1}/{stages}: {params / 1e6:.2f} M parameters, MACs "
            f"{macs / macs0:.1%}; loss {pruned_loss:.4f} after pruning, "
            f"{stage_records[-1]['loss_after_recovery']:.4f} after {share} step(s)",
            file=sys.stderr,
        )
    macs1, params1 = count(student)
    record = {
        "ratio": ratio,
        "round_to": round_to,
        "stages": stage_records,
        "params": [params0, params1],
        "macs": [macs0, macs1],
        "macs_ratio": round(macs1 / macs0, 4),
        "block_ratios": {k: round(v, 3) for k, v in ratios.items()},
        "sensitivity": {k: round(v, 5) for k, v in sensed.items()},
        "steps": steps,
        "loss": [round(losses[0], 5), round(losses[-1], 5)] if losses else None,
        "curve": _curve(losses),
        "source_sha256": teacher.source_sha256,
        **_facts(learn, size),
    }
    export(student, out, {"pruning": record})
    return record


def distill_model(
    teacher_path: Path,
    student_path: Path,
    out: Path,
    frames: Path,
    steps: int,
    size: int = 320,
    data: Path | None = None,
    overwrite: bool = False,
    lr: float = 1e-4,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (the same head: classes and map layout); write ``out``.

    Raises:
        FactoryError: bad steps, an existing output, no frames, evaluation images among them,
            models that are not float YOLOv8 detectors or whose heads differ.
    """
    if steps < 1:
        raise FactoryError("--steps must be >= 1")
    refuse_existing(out, overwrite)
    learn = recovery_frames(frames, data, size)
    teacher, student = load_detector(teacher_path), load_detector(student_path)
    probe = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        theirs = [tuple(m.shape[1:]) for m in teacher.module.eval()(probe)]
        ours = [tuple(m.shape[1:]) for m in student.module.eval()(probe)]
    if theirs != ours:
        raise FactoryError(
            f"{student_path.name} and {teacher_path.name} have different heads "
            f"({ours} vs {theirs}): distillation needs the same classes and map layout"
        )
    record = {
        "teacher": teacher_path.name,
        "teacher_sha256": teacher.source_sha256,
        **_trained(student, teacher, learn, steps, "distillation", size, lr),
    }
    export(student, out, {"distillation": record})
    return record


def qat_model(
    model: Path,
    out: Path,
    frames: Path,
    steps: int,
    target: str,
    size: int = 320,
    data: Path | None = None,
    overwrite: bool = False,
    lr: float = 1e-5,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of ``model`` (float, pruned or not) for ``target``, with
    distillation from ``model`` itself; writes a QDQ ONNX like ``quantize``'s; returns its record.

    Raises:
        FactoryError: bad steps, an existing output, no frames, evaluation images among them, a
            model that is not a float YOLOv8 detector, a target this recipe does not cover.
    """
    from models.optimize.qat import fold_weight_quantizers, freeze, prepare
    from models.recipes import recipe

    check_schedule(steps)
    recipe(target)  # raises for a target the quantizer does not make (rk3588)
    refuse_existing(out, overwrite)
    learn = recovery_frames(frames, data, size)
    teacher = load_detector(model)
    student, record = prepare(teacher, target, learn.batch[:32])
    record.update(_trained(student, teacher, learn, steps, "quantization-aware training", size,
                           lr, before_measuring=freeze))  # fmt: skip
    record["source_sha256"] = teacher.source_sha256
    folded: list[int] = []
    export(student, out, {"quantization": record}, {"precision": "int8", "target": target},
           body_pass=lambda body: folded.append(fold_weight_quantizers(body)))  # fmt: skip
    record["weights_folded"] = folded[0] if folded else 0
    return record
