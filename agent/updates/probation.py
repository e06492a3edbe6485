"""Judging a freshly swapped-in model against the one it replaced, on live frames.

The golden self-test proves a model works on a few known images; probation proves it works here,
on this camera: no more failed inferences than allowed, inference time not much worse than the
previous model's, not suddenly blind (the share of frames with no detection must not jump), and
not making frames late. A verdict is pending until enough frames were seen.

Failures are hard (inferences that fail: the model is broken) or soft (slower, blinder, later:
judged on measurements a busy machine can sway). A soft failure sends the model back without
rejecting it for good the first time (``probation.retries``): the device tries it again later.

The timing comparison is made fair where it can be without running both models: the new model's
first ``warmup_frames`` inferences (allocations, cache misses) are left out; its time is compared
with the previous model's last frames before the swap, not its whole history; and the statistic
is the p95 only over enough frames to have one (``P95_MIN_FRAMES``), the median below that, since
the p95 of 15 frames is their slowest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import ProbationConfig
from agent.vision import ModelStats

MIN_BASELINE_FRAMES = 10  # fewer frames from the previous model: nothing to compare with
P95_MIN_FRAMES = 60  # below this many timed frames the p95 is the slowest one: use the median
BASELINE_FRAMES = 200  # the previous model's latest frames, measured nearest the swap


@dataclass
class Verdict:
    state: str  # "pending", "pass" or "fail"
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    hard: bool = False  # a failure no load can explain (failed inferences): rejected at once


def _timing(new: ModelStats, old: ModelStats, warmup: int) -> tuple[str, float, float] | None:
    """The statistic both models are compared on, and its values: p95 when the new model has
    enough timed frames (warm-up left out), else the median; None when either has too few."""
    mine = new.inference.values()
    if new.inference.count <= len(mine):  # the window still holds the first frames
        mine = mine[warmup:]
    theirs = old.inference.values()[-BASELINE_FRAMES:]
    if mine.size == 0 or theirs.size < MIN_BASELINE_FRAMES:
        return None
    q = 95 if mine.size >= P95_MIN_FRAMES else 50
    return f"p{q}", float(np.percentile(mine, q)), float(np.percentile(theirs, q))


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def judge(
    new: ModelStats, old: ModelStats | None, elapsed_s: float, limits: ProbationConfig
) -> Verdict:
    attempts = new.attempts
    error_rate = _rate(new.failures, attempts)
    figures: dict[str, Any] = {
        "frames": new.frames,
        "failures": new.failures,
        "error_rate": round(error_rate, 4),
        "empty_rate": round(_rate(new.empty, new.frames), 4),
        "elapsed_s": round(elapsed_s, 1),
    }
    # a model that fails outright is sent back as soon as that is certain, not at the end
    if new.failures >= limits.min_frames and error_rate > limits.max_error_rate:
        return Verdict(
            "fail",
            [f"{new.failures} of {attempts} inferences failed (limit {limits.max_error_rate:.0%})"],
            figures,
            hard=True,
        )
    enough = attempts >= limits.frames or (
        elapsed_s >= limits.seconds and attempts >= limits.min_frames
    )
    if not enough:
        return Verdict("pending", [], figures)
    if error_rate > limits.max_error_rate:
        reason = (
            f"{new.failures} of {attempts} inferences failed (limit {limits.max_error_rate:.0%})"
        )
        return Verdict("fail", [reason], figures, hard=True)
    reasons = []
    if old is not None and old.frames >= MIN_BASELINE_FRAMES and new.frames:
        timing = _timing(new, old, limits.warmup_frames)
        if timing is not None and timing[2] > 0:
            name, mine, theirs = timing
            ratio = mine / theirs
            figures["p95_ratio" if name == "p95" else "p50_ratio"] = round(ratio, 3)
            if ratio > limits.max_p95_ratio:
                reasons.append(
                    f"inference {name} {mine:.1f} ms is {ratio:.2f}x the previous model's "
                    f"{theirs:.1f} ms (limit {limits.max_p95_ratio:g}x)"
                )
        old_empty, new_empty = _rate(old.empty, old.frames), _rate(new.empty, new.frames)
        figures["previous_empty_rate"] = round(old_empty, 4)
        if new_empty - old_empty > limits.max_empty_increase:
            reasons.append(
                f"no detection on {new_empty:.0%} of frames against {old_empty:.0%} with the "
                f"previous model: the new model looks blind"
            )
        old_late, new_late = _rate(old.late, old.frames), _rate(new.late, new.frames)
        if new_late - old_late > limits.max_late_increase:
            reasons.append(f"{new_late:.0%} of frames late against {old_late:.0%} before")
    return Verdict("fail" if reasons else "pass", reasons, figures)
