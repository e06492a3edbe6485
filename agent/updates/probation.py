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
with the previous model's last frames before the swap, not its whole history; the decision rests
on the median (``max_latency_ratio``), which load bursts on a shared machine barely move, and the
p95 is judged only against a looser limit (``max_p95_ratio``) and only over enough frames to have
a tail (``P95_MIN_FRAMES``): the p95 of 15 frames is their slowest. ``benchmarks/probation.py``
measures how often this sends a good model back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import ProbationConfig
from agent.vision import Detection, ModelStats, PairedFrame, box_iou

MIN_BASELINE_FRAMES = 10  # fewer frames from the previous model: nothing to compare with
P95_MIN_FRAMES = 60  # below this many timed frames the p95 is the slowest one: not judged
BASELINE_FRAMES = 200  # the previous model's latest frames, measured nearest the swap


@dataclass
class Verdict:
    state: str  # "pending", "pass" or "fail"
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    hard: bool = False  # a failure no load can explain (failed inferences): rejected at once


def _timing(
    new: ModelStats, old: ModelStats, warmup: int, limits: ProbationConfig
) -> list[tuple[str, float, float, float]]:
    """The timing comparisons to make: (statistic, new, previous, limit). The median always
    (load bursts on a shared machine move it least); the p95 too, against its own looser limit,
    once both have enough timed frames to have a tail. Warm-up left out; empty: too few frames."""
    mine = new.inference.values()
    if new.inference.count <= len(mine):  # the window still holds the first frames
        mine = mine[warmup:]
    theirs = old.inference.values()[-BASELINE_FRAMES:]
    if mine.size == 0 or theirs.size < MIN_BASELINE_FRAMES:
        return []
    found = [("p50", float(np.median(mine)), float(np.median(theirs)), limits.max_latency_ratio)]
    if mine.size >= P95_MIN_FRAMES and theirs.size >= P95_MIN_FRAMES:
        p95 = float(np.percentile(mine, 95)), float(np.percentile(theirs, 95))
        found.append(("p95", *p95, limits.max_p95_ratio))
    return found


def _failed_inferences(new: ModelStats, limits: ProbationConfig, figures: dict) -> Verdict:
    """The hard failure: inferences that fail are the model's fault whatever the load."""
    reason = f"{new.failures} of {new.attempts} inferences failed"
    return Verdict("fail", [f"{reason} (limit {limits.max_error_rate:.0%})"], figures, hard=True)


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def judge(
    new: ModelStats,
    old: ModelStats | None,
    elapsed_s: float,
    limits: ProbationConfig,
    evidence: PairedEvidence | None = None,
) -> Verdict:
    """The verdict so far. With ``evidence`` (both models on the same frames) latency and
    agreement are judged on the pairs, as soon as they decide; without it (the models take
    different inputs) against the previous model's recent past. Past the budget with pairs
    that still do not decide: ``inconclusive`` (sent back, never rejected for it)."""
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
        return _failed_inferences(new, limits, figures)
    enough = attempts >= limits.frames or (
        elapsed_s >= limits.seconds and attempts >= limits.min_frames
    )
    if evidence is not None:
        figures["pairs"] = len(evidence)
    if evidence is not None:
        # Paired: judged on the pairs alone. The unpaired rules do not apply here: the previous
        # model's shadow inference delays every paired frame, so lateness (and the per-model
        # history) would blame the new model for the probation's own cost.
        overdue = attempts >= EXTEND * limits.frames or elapsed_s >= EXTEND * limits.seconds
        if len(evidence) >= MIN_PAIRS:
            return _paired_verdict(evidence, new, limits, figures, enough, overdue, error_rate)
        if error_rate > limits.max_error_rate and enough:
            return _failed_inferences(new, limits, figures)
        if not overdue:
            return Verdict("pending", [], figures)
        return Verdict(
            "inconclusive",
            [f"too few frames ran both models within the probation ({len(evidence)} pairs)"],
            figures,
        )
    if not enough:
        return Verdict("pending", [], figures)
    if error_rate > limits.max_error_rate:
        return _failed_inferences(new, limits, figures)
    reasons = []
    if old is not None and old.frames >= MIN_BASELINE_FRAMES and new.frames:
        for name, mine, theirs, limit in _timing(new, old, limits.warmup_frames, limits):
            if theirs <= 0:
                continue
            ratio = mine / theirs
            figures[f"{name}_ratio"] = round(ratio, 3)
            if ratio > limit:
                reasons.append(
                    f"inference {name} {mine:.1f} ms is {ratio:.2f}x the previous model's "
                    f"{theirs:.1f} ms (limit {limit:g}x)"
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


# -- the paired test: both models on the same frames, at the same moment ---------------------------
FAIL_ALPHA = 0.001  # a sign test checked after every pair: small, so repeated looks stay rare
PASS_ALPHA = 0.01
MIN_PAIRS = 8
EXTEND = 4  # an empty scene: the probation goes on up to 4x its budget for frames with objects


def agreement(new: list[Detection], old: list[Detection]) -> float:
    """How well two models' detections of one frame agree, 0..1: each box's best IoU with a box
    of the same class from the other model, averaged over both sides (1.0 when neither sees
    anything). A blind model scores 0 where the old one saw something. Measured on the shared
    videos (frames where either model saw something): the shared INT8 model against the fp32
    one, median 0.99 (5 % of frames under 0.8); the fp32 boxes shifted by 30 px, median 0.65
    (99 % under 0.8)."""
    if not new and not old:
        return 1.0

    def best(mine: Detection, others: list[Detection]) -> float:
        return max((box_iou(mine.box, o.box) for o in others if o.class_id == mine.class_id),
                   default=0.0)  # fmt: skip

    scores = [best(d, old) for d in new] + [best(d, new) for d in old]
    return sum(scores) / len(scores)


@dataclass
class PairedEvidence:
    """The pairs a probation has seen (the first ``warmup`` left out: a fresh session warms up)."""

    warmup: int = 3
    ratios: list[float] = field(default_factory=list)  # new / old inference time, per pair
    agreements: list[float] = field(default_factory=list)  # frames where either saw something
    seen: int = 0

    def add(self, pair: PairedFrame) -> None:
        self.seen += 1
        if self.seen <= self.warmup or pair.old_ms <= 0:
            return
        self.ratios.append(pair.new_ms / pair.old_ms)
        if pair.new or pair.old:  # an empty scene says nothing about boxes
            self.agreements.append(agreement(pair.new, pair.old))

    def __len__(self) -> int:
        return len(self.ratios)


def _tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): how surprising k of n is if it were a coin toss."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def sign_test(bad: int, n: int) -> str:
    """'fail' when most pairs are bad beyond doubt, 'pass' when most are good beyond doubt,
    else 'pending': the median pair decides, so bursts on a minority of frames cannot."""
    if n < MIN_PAIRS:
        return "pending"
    if _tail(bad, n) < FAIL_ALPHA:
        return "fail"
    if _tail(n - bad, n) < PASS_ALPHA:
        return "pass"
    return "pending"


def _paired_verdict(
    evidence: PairedEvidence,
    new: ModelStats,
    limits: ProbationConfig,
    figures: dict[str, Any],
    enough: bool,
    overdue: bool,
    error_rate: float,
) -> Verdict:
    attempts = new.attempts
    paired = judge_pairs(evidence, limits)
    figures.update(paired.figures)
    if paired.state == "fail":
        return Verdict("fail", paired.reasons, figures)
    if error_rate > limits.max_error_rate and attempts >= limits.min_frames:
        return _failed_inferences(new, limits, figures)
    if paired.state == "pass" and attempts >= limits.min_frames:
        return Verdict("pass", [], figures)
    if not enough:
        return Verdict("pending", [], figures)
    if (figures["median_time_ratio"] <= limits.max_latency_ratio
            and figures["pairs_with_detections"] >= MIN_PAIRS
            and figures["median_agreement"] >= limits.min_agreement):  # fmt: skip
        return Verdict("pass", [], figures)  # undecided, but no worse on the point estimates
    if not overdue:  # an empty scene, or estimates that lean against it: the sign test decides
        return Verdict("pending", [], figures)
    return Verdict(
        "inconclusive",
        [f"the paired test did not decide within the probation ({len(evidence)} pairs)"],
        figures,
    )


def judge_pairs(evidence: PairedEvidence, limits: ProbationConfig) -> Verdict:
    """Latency and agreement from the pairs: each a sign test against its limit."""
    n, seen = len(evidence), len(evidence.agreements)
    slow = sum(r > limits.max_latency_ratio for r in evidence.ratios)
    apart = sum(a < limits.min_agreement for a in evidence.agreements)
    figures: dict[str, Any] = {"pairs": n, "pairs_with_detections": seen}
    if n:
        figures["median_time_ratio"] = round(float(np.median(evidence.ratios)), 3)
    # nothing seen by either model yet: no evidence against the boxes
    figures["median_agreement"] = round(float(np.median(evidence.agreements)), 3) if seen else 1.0
    reasons = []
    latency, agreeing = sign_test(slow, n), sign_test(apart, seen)
    if latency == "fail":
        reasons.append(
            f"slower than the previous model on the same frames: {slow} of {n} pairs over "
            f"{limits.max_latency_ratio:g}x (median {figures['median_time_ratio']:.2f}x)"
        )
    if agreeing == "fail":
        reasons.append(
            f"disagrees with the previous model on this camera: {apart} of {seen} frames agree "
            f"below {limits.min_agreement:g} (median agreement {figures['median_agreement']:.2f})"
        )
    if reasons:
        return Verdict("fail", reasons, figures)
    if latency == agreeing == "pass":
        return Verdict("pass", [], figures)
    return Verdict("pending", [], figures)
