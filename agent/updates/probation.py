"""Judging a freshly swapped-in model against the one it replaced, on live frames.

The golden self-test proves a model works on a few known images; probation proves it works here,
on this camera: no more failed inferences than allowed, p95 inference time not much worse than
the previous model's, not suddenly blind (the share of frames with no detection must not jump),
and not making frames late. A verdict is pending until enough frames were seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.config import ProbationConfig
from agent.vision import ModelStats

MIN_BASELINE_FRAMES = 10  # fewer frames from the previous model: nothing to compare with


@dataclass
class Verdict:
    state: str  # "pending", "pass" or "fail"
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


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
        )
    enough = attempts >= limits.frames or (
        elapsed_s >= limits.seconds and attempts >= limits.min_frames
    )
    if not enough:
        return Verdict("pending", [], figures)
    reasons = []
    if error_rate > limits.max_error_rate:
        reasons.append(
            f"{new.failures} of {attempts} inferences failed (limit {limits.max_error_rate:.0%})"
        )
    if old is not None and old.frames >= MIN_BASELINE_FRAMES and new.frames:
        new_p95 = new.inference.percentiles([95])["p95"]
        old_p95 = old.inference.percentiles([95])["p95"]
        if new_p95 is not None and old_p95:
            ratio = new_p95 / old_p95
            figures["p95_ratio"] = round(ratio, 3)
            if ratio > limits.max_p95_ratio:
                reasons.append(
                    f"inference p95 {new_p95:.1f} ms is {ratio:.2f}x the previous model's "
                    f"{old_p95:.1f} ms (limit {limits.max_p95_ratio:g}x)"
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
