"""The quality gate: may this candidate model replace the reference?

Used by ``edge-models gate``, by the publisher before anything reaches a channel, and (through
the golden set) by devices after an update. Each failed check gives a reason a person can act on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import FactoryError
from models.kernels import KernelRunner


@dataclass(frozen=True)
class GateLimits:
    max_map_drop_points: float = 1.0  # mAP50-95, in points (0.01 = 1 point)
    min_top_score_ratio: float = 0.5  # the candidate's mean best score vs the reference's
    min_detection_ratio: float = 0.5  # detections per image at the operating thresholds
    max_latency_ratio: float | None = 1.10  # None: do not judge latency (stored reference)


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # the verdict stands, but read these

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(
    candidate: dict[str, Any], reference: dict[str, Any], limits: GateLimits = GateLimits()
) -> GateResult:
    """Compare two evaluation results (``ModelResult.to_dict()`` or a stored report entry)."""
    reasons: list[str] = []
    drop = (reference["map50_95"] - candidate["map50_95"]) * 100
    checks: dict[str, Any] = {"map50_95_drop_points": round(drop, 3)}
    if drop > limits.max_map_drop_points:
        reasons.append(
            f"mAP50-95 fell {drop:.2f} points "
            f"({reference['map50_95']:.4f} -> {candidate['map50_95']:.4f}); "
            f"the limit is {limits.max_map_drop_points:g}"
        )
    ref_score = reference["mean_top_score"] or 1e-9
    score_ratio = candidate["mean_top_score"] / ref_score
    checks["top_score_ratio"] = round(score_ratio, 4)
    ref_dets = reference["detections_per_image"]
    det_ratio = candidate["detections_per_image"] / ref_dets if ref_dets else 1.0
    checks["detection_ratio"] = round(det_ratio, 4)
    if score_ratio < limits.min_top_score_ratio or det_ratio < limits.min_detection_ratio:
        reasons.append(
            "detections vanished: scores collapsed towards 0 "
            f"(mean best score {candidate['mean_top_score']:.3f} "
            f"vs {reference['mean_top_score']:.3f}; {candidate['detections_per_image']:.2f} vs "
            f"{ref_dets:.2f} detections per image at conf 0.25)"
        )
    if limits.max_latency_ratio is not None:
        latency_ratio = candidate["latency_p50_ms"] / reference["latency_p50_ms"]
        checks["latency_ratio"] = round(latency_ratio, 4)
        if latency_ratio > limits.max_latency_ratio:
            reasons.append(
                f"latency regressed: p50 {candidate['latency_p50_ms']:.1f} ms "
                f"vs {reference['latency_p50_ms']:.1f} ms "
                f"({latency_ratio:.2f}x; the limit is {limits.max_latency_ratio:g}x)"
            )
    return GateResult(passed=not reasons, reasons=reasons, checks=checks)


def stored_reference(path: Path) -> dict[str, Any]:
    """A stored result: report.json (its first model) or a single ModelResult json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FactoryError(f"cannot read the stored reference {path}: {exc}") from None
    entry = data["models"][0] if isinstance(data, dict) and "models" in data else data
    needed = {"map50_95", "mean_top_score", "detections_per_image"}
    if not isinstance(entry, dict) or not needed <= set(entry):
        raise FactoryError(
            f"{path} is not an evaluation result (needs {', '.join(sorted(needed))})"
        )
    return entry


def too_small(interval: dict[str, float], limit: float, images: int) -> list[str]:
    """A warning when the set cannot tell a drop of ``limit`` points from no drop: the 95 %
    interval of the difference is wider than the limit itself."""
    half = (interval["high"] - interval["low"]) / 2
    if half <= limit:
        return []
    return [
        f"the evaluation set ({images} images) is too small for a {limit:g}-point limit: the "
        f"95 % interval of the mAP50-95 difference is ±{half:.2f} points wide; judge on a "
        "larger set (../shared/datasets/voc2007-val)"
    ]


def gate_model(
    candidate: Path,
    reference: Path,
    data: Path,
    rounds: int = 20,
    max_map_drop: float = 1.0,
    max_latency_ratio: float | None = 1.10,
    runner: KernelRunner | None = None,
    resamples: int = 200,
) -> GateResult:
    """Evaluate ``candidate`` (and ``reference``, unless it is a stored .json result) on
    ``data`` and judge it. The candidate runs on ``runner`` (its target's kernels; default this
    machine's); the float reference runs here, where float kernels compute what they do anywhere.
    Latency is only judged when both were timed in the same run on this machine's kernels. A
    runner with a runtime of its own (OpenVINO) runs both there: its float kernels are its own."""
    from models.datasets import load_dataset
    from models.evaluate import evaluate

    dataset = load_dataset(data)
    stored = reference.suffix == ".json"
    models = [candidate] if stored else [reference, candidate]
    runners = [runner] if stored else [None, runner]
    runtime = getattr(runner, "runtime", "onnxruntime")
    own_runtime = runtime != "onnxruntime"
    if own_runtime:  # a runtime of its own: both run there, natively, both timed
        runners = [None] * len(models)
    results = evaluate(models, dataset, latency_rounds=rounds, runners=runners, resamples=resamples,
                       runtimes=[runtime] * len(models))  # fmt: skip
    reference_result = stored_reference(reference) if stored else results[0].to_dict()
    timed = not stored and (runner is None or runner.measures_speed)
    limits = GateLimits(
        max_map_drop_points=max_map_drop,
        max_latency_ratio=max_latency_ratio if timed else None,
    )
    result = check(results[-1].to_dict(), reference_result, limits)
    result.checks["kernels"] = runner.describe() if own_runtime else results[-1].kernels
    result.checks["images"] = len(dataset.samples)
    interval = results[-1].map_difference
    if interval is not None:
        result.checks["map50_95_difference_interval"] = [interval["low"], interval["high"]]
        result.warnings += too_small(interval, max_map_drop, len(dataset.samples))
    if runner is not None:
        result.checks["target"] = runner.target
    return result
