"""Distillation on raw head outputs: the student learns the teacher's DFL bins and class scores.

Labels are not needed: the teacher (the unpruned float model) says what each anchor should give.
Box branches: KL divergence between the teacher's and the student's 16-bin distance
distributions per side. Class branches: binary cross-entropy against the teacher's probabilities
less the teacher's own entropy (a Bernoulli KL divergence), so the loss is 0 when the student
computes what the teacher does. Both are weighted by the teacher's confidence at the anchor (its
best class score, with a small floor so the student still learns to stay quiet on background),
because almost all of 8400 anchors are background and would otherwise drown the few that carry
objects."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.optimize.frames import FrameSet
from models.optimize.torch_model import Detector, head_maps

BINS = 16
BACKGROUND_WEIGHT = 0.05


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The loss between two lists of six head maps (box, class per level)."""
    total = student[0].new_zeros(())
    for level in range(0, 6, 2):
        s_box, s_cls = student[level], student[level + 1]
        t_box, t_cls = teacher[level].detach(), teacher[level + 1].detach()
        n, _, h, w = t_box.shape
        t_prob = torch.sigmoid(t_cls)
        weight = t_prob.amax(dim=1).clamp(min=BACKGROUND_WEIGHT)  # [N, H, W]
        t_bins = F.softmax(t_box.view(n, 4, BINS, h, w), dim=2)
        s_log = F.log_softmax(s_box.view(n, 4, BINS, h, w), dim=2)
        kl = (t_bins * (torch.log(t_bins.clamp(min=1e-9)) - s_log)).sum(dim=2).mean(dim=1)
        bce = F.binary_cross_entropy_with_logits(s_cls, t_prob, reduction="none")
        entropy = F.binary_cross_entropy(t_prob, t_prob, reduction="none")
        # summed over the classes, as the box term is over the bins: averaged over 80 classes it
        # was a fortieth of the box term, and the students learnt where but not what
        bernoulli_kl = (bce - entropy).sum(dim=1)  # 0 when the student's scores are the teacher's
        total = total + ((kl + bernoulli_kl) * weight).sum() / weight.sum()
    return total / 3


@dataclass
class Recovery:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last(self) -> float | None:
        return float(np.mean(self.losses[-5:])) if self.losses else None


def distil(
    student: Detector,
    teacher: Detector,
    frames: FrameSet | np.ndarray,
    steps: int,
    batch: int = 4,
    lr: float = 1e-4,
    imgsz: int | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    resume: dict[str, Any] | None = None,
    keep: Callable[[Callable[[], dict[str, Any]], int], None] | None = None,
    device: torch.device | str = "cpu",
) -> Recovery:
    """``steps`` of distillation from ``teacher`` into ``student`` on ``frames`` (a FrameSet
    read as it goes, with random crops and flips; or letterboxed [N,3,H,W] in 0..1, flips only),
    at ``imgsz`` (default: the frames' own size; lower is faster on CPU, the raw maps work at any
    size, but the model learns best at the size it runs at). Adam with the learning rate
    warming up over the first steps and falling along a cosine; the student's parameters only.

    ``keep(state, step)`` is called at every step's end with a function that returns the whole
    training state; ``resume`` is such a state: the run continues from its step as if it had
    never stopped (weights, optimiser, random generators, losses). Both models train on
    ``device`` and are back on the CPU when it returns."""
    generator = random.Random(seed)
    torch.manual_seed(seed)

    def draw(size: int) -> torch.Tensor:
        picks = [generator.randrange(len(frames)) for _ in range(min(size, len(frames)))]
        if isinstance(frames, FrameSet):
            x = torch.from_numpy(frames.augmented(picks, generator))
        else:
            x = torch.from_numpy(frames[picks])
            if generator.random() < 0.5:
                x = torch.flip(x, dims=[3])
        if imgsz is not None and imgsz != x.shape[-1]:
            x = F.interpolate(x, size=(imgsz, imgsz), mode="bilinear", align_corners=False)
        return x

    student.module.to(device)
    teacher.module.to(device)
    try:
        return _train(student, teacher, draw, steps, batch, lr, generator, progress, resume,
                      keep, device)  # fmt: skip
    finally:
        student.module.to("cpu").eval()
        teacher.module.to("cpu")


def _train(student: Detector, teacher: Detector, draw: Callable[[int], torch.Tensor],
           steps: int, batch: int, lr: float, generator: random.Random, progress: Any,
           resume: Any, keep: Any, device: Any) -> Recovery:  # fmt: skip
    trainable = [p for p in student.module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_rate, steps=steps))
    record = Recovery(steps)
    first = 0
    if resume is not None:
        student.module.load_state_dict(resume["weights"])
        optimizer.load_state_dict(resume["optimizer"])
        if "schedule" in resume:  # absent from checkpoints of before the schedule
            schedule.load_state_dict(resume["schedule"])
        generator.setstate(resume["random"])
        torch.set_rng_state(resume["torch_random"])
        record.losses = list(resume["losses"])
        record.seconds = resume["seconds"]
        first = resume["step"]
    student.module.train()
    teacher.module.eval()
    started = time.monotonic() - record.seconds
    for step in range(first, steps):
        x = draw(batch).to(device)
        with torch.no_grad():
            target = head_maps(teacher.module(x))
        loss = distillation_loss(head_maps(student.module(x)), target)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the distillation loss is {value} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        record.losses.append(value)
        if progress is not None:
            progress(step + 1, value)
        if keep is not None:
            done = step + 1

            def state(done: int = done) -> dict[str, Any]:
                return {"step": done, "weights": student.module.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "random": generator.getstate(),
                        "torch_random": torch.get_rng_state(), "losses": list(record.losses),
                        "seconds": time.monotonic() - started}  # fmt: skip

            keep(state, done)
    record.seconds = time.monotonic() - started
    return record


def _rate(step: int, steps: int) -> float:
    """The learning rate's factor at ``step``: a linear warm-up over the first 3 % of the run (a
    pruned model's first gradients are large), then a cosine down to a tenth."""
    warm = max(1, steps // 33)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def evaluate_loss(student: Detector, teacher: Detector, frames: np.ndarray) -> float:
    """The distillation loss on ``frames`` without training: how far the student has strayed."""
    x = torch.from_numpy(frames)
    student.module.eval()
    teacher.module.eval()
    with torch.no_grad():
        return float(distillation_loss(head_maps(student.module(x)), head_maps(teacher.module(x))))
