"""The probation verdict on recorded per-model counters: each reason to send a model back."""

from __future__ import annotations

from agent.config import ProbationConfig
from agent.updates.probation import PairedEvidence, agreement, judge
from agent.vision import Detection, PairedFrame
from agent.vision.stats import ModelStats

LIMITS = ProbationConfig(frames=50, seconds=30, min_frames=10)


def stats(frames: int, inference_ms: float, empty: int = 0, failures: int = 0, late: int = 0):
    record = ModelStats()
    for _ in range(frames):
        record.inference.add(inference_ms)
    record.frames, record.empty, record.failures, record.late = frames, empty, failures, late
    return record


def test_pending_until_enough_frames_or_time_with_a_minimum():
    old = stats(100, 60)
    assert judge(stats(20, 60), old, 5.0, LIMITS).state == "pending"
    assert judge(stats(50, 60), old, 5.0, LIMITS).state == "pass"
    assert judge(stats(12, 60), old, 31.0, LIMITS).state == "pass"  # time is up, 12 >= 10
    assert judge(stats(5, 60), old, 31.0, LIMITS).state == "pending"  # too few to judge


def test_a_model_that_keeps_failing_is_sent_back_early():
    verdict = judge(stats(0, 60, failures=10), stats(100, 60), 1.0, LIMITS)
    assert verdict.state == "fail" and "10 of 10 inferences failed" in verdict.reasons[0]


def test_slower_blinder_or_later_than_the_previous_model_fails():
    old = stats(100, 60, empty=5, late=0)
    slow = judge(stats(50, 120), old, 10, LIMITS)
    assert slow.state == "fail" and "2.00x the previous model's" in slow.reasons[0]
    blind = judge(stats(50, 60, empty=50), old, 10, LIMITS)
    assert blind.state == "fail" and "looks blind" in blind.reasons[0]
    late = judge(stats(50, 60, late=20), old, 10, LIMITS)
    assert late.state == "fail" and "late" in late.reasons[0]
    quiet_scene = judge(stats(50, 60, empty=45), stats(100, 60, empty=90), 10, LIMITS)
    assert quiet_scene.state == "pass"  # the old model saw nothing there either


def test_without_a_baseline_only_failures_are_judged():
    assert judge(stats(50, 500, empty=50), stats(3, 60), 10, LIMITS).state == "pass"
    assert judge(stats(50, 60, failures=10), None, 10, LIMITS).state == "fail"


def timed(values: list[float], frames: int | None = None) -> ModelStats:
    record = ModelStats()
    for value in values:
        record.inference.add(value)
    record.frames = len(values) if frames is None else frames
    return record


def test_the_first_inferences_of_a_new_model_are_warm_up_not_evidence():
    """The first frame of a fresh session (allocations, cold caches) once decided probation."""
    old = timed([60.0] * 100)
    fresh = timed([900.0, 300.0, 150.0] + [61.0] * 47)  # 50 frames, the first three warming up
    verdict = judge(fresh, old, 10.0, LIMITS)
    assert verdict.state == "pass" and verdict.figures["p50_ratio"] < 1.1, verdict


def test_a_few_slow_frames_among_fifteen_do_not_fail_a_model_of_the_same_speed():
    """Over 15 frames the p95 is the slowest frame: one load burst failed a good model."""
    limits = ProbationConfig(frames=15, seconds=30, min_frames=5)
    old = timed([60.0] * 200)
    bursty = timed([60.0] * 3 + [58.0, 62.0, 240.0, 61.0, 59.0, 60.0, 63.0, 180.0] + [60.0] * 4)
    verdict = judge(bursty, old, 5.0, limits)
    assert verdict.state == "pass", verdict
    slower = judge(timed([95.0] * 18), old, 5.0, limits)  # really 1.6x slower: still caught
    assert slower.state == "fail" and not slower.hard and "p50" in slower.reasons[0]


def test_the_baseline_is_the_previous_models_latest_frames_not_its_whole_history():
    limits = ProbationConfig(frames=50, seconds=30, min_frames=10)
    old = timed([30.0] * 800 + [60.0] * 200)  # it ran alone at first; the scene got busier
    verdict = judge(timed([62.0] * 50), old, 10.0, limits)
    assert verdict.state == "pass", verdict


def test_failed_inferences_are_a_hard_failure():
    verdict = judge(stats(0, 60, failures=10), stats(100, 60), 1.0, LIMITS)
    assert verdict.state == "fail" and verdict.hard


# -- the paired test --------------------------------------------------------------------------
def detection(x: float, y: float, w: float = 100, h: float = 200, cls: int = 0) -> Detection:
    return Detection(cls, "person", 0.9, (x, y, x + w, y + h))


def pairs(count: int, ratio: float, rng, shift: float = 0.0, bursts: float = 0.1):
    """Frames run through both models under the same load: now and then a burst slows one of
    the two (each hit independently), as another process on a shared machine does."""
    evidence = PairedEvidence(warmup=3)
    for _ in range(count):
        old_ms = 100.0 * rng.uniform(0.9, 1.1)
        new_ms = old_ms * ratio * rng.uniform(0.95, 1.05)
        if rng.random() < bursts:
            new_ms *= rng.uniform(2, 4)
        if rng.random() < bursts:
            old_ms *= rng.uniform(2, 4)
        x = rng.uniform(0, 500)
        old = [detection(x, 100), detection(x + 150, 120, 60, 120)]
        new = [detection(d.box[0] + shift, d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1])
               for d in old]  # fmt: skip
        evidence.add(PairedFrame(new_ms, old_ms, new, old))
    return evidence


def test_agreement_is_one_for_the_same_boxes_and_falls_with_shifts_and_blindness():
    boxes = [detection(10, 10), detection(300, 50, 60, 120)]
    assert agreement(boxes, boxes) == 1.0 and agreement([], []) == 1.0
    assert agreement([], boxes) == 0.0  # blind where the old model saw people
    shifted = [detection(40, 10), detection(330, 50, 60, 120)]
    assert 0.2 < agreement(shifted, boxes) < 0.6
    assert agreement([detection(10, 10, cls=2)], [detection(10, 10)]) == 0.0  # another class


def test_the_paired_test_passes_a_twin_and_catches_slow_and_shifted_models_early():
    import numpy as np

    rng = np.random.default_rng(0)
    limits = ProbationConfig(frames=100, seconds=60, min_frames=10)
    ok = stats(50, 100)
    twin = judge(ok, stats(200, 100), 5.0, limits, pairs(25, 1.0, rng))
    assert twin.state == "pass" and twin.figures["pairs"] == 22, twin
    slow = judge(ok, stats(200, 100), 5.0, limits, pairs(25, 1.5, rng))
    assert slow.state == "fail" and not slow.hard and "same frames" in slow.reasons[0], slow
    shifted = judge(ok, stats(200, 100), 5.0, limits, pairs(25, 1.0, rng, shift=30))
    assert shifted.state == "fail" and "disagrees" in shifted.reasons[0], shifted
    early = judge(stats(5, 100), stats(200, 100), 1.0, limits, pairs(6, 1.5, rng))
    assert early.state == "pending"  # too few pairs to say anything yet


def test_a_borderline_model_is_inconclusive_at_the_end_never_failed():
    import numpy as np

    rng = np.random.default_rng(1)
    limits = ProbationConfig(frames=30, seconds=60, min_frames=10, max_latency_ratio=1.3)
    evidence = pairs(12, 1.38, rng)
    assert judge(stats(30, 100), stats(200, 100), 5.0, limits, evidence).state == "pending"
    verdict = judge(stats(120, 100), stats(200, 100), 25.0, limits, evidence)  # 4x the budget
    assert verdict.state == "inconclusive" and not verdict.hard, verdict


def test_frames_made_late_by_the_shadow_never_count_against_the_new_model():
    """CI once sent a new build of the same model back for "60% of frames late against 0%
    before": the old model's shadow inference made the paired frames late. With pairs under
    way only the pairs judge; too few pairs by the end is inconclusive, never a failure."""
    import numpy as np

    limits = ProbationConfig(frames=15, seconds=30, min_frames=5)
    late_and_few = judge(stats(15, 100, late=9), stats(200, 100), 5.0, limits,
                         pairs(7, 1.0, np.random.default_rng(2)))  # fmt: skip
    assert late_and_few.state == "pending", late_and_few
    twin = judge(stats(15, 100, late=9), stats(200, 100), 5.0, limits,
                 pairs(25, 1.0, np.random.default_rng(3)))  # fmt: skip
    assert twin.state == "pass", twin
    overdue = judge(stats(60, 100, late=40), stats(200, 100), 121.0, limits, PairedEvidence())
    assert overdue.state == "inconclusive" and not overdue.hard, overdue
    broken = judge(stats(0, 100, failures=15), stats(200, 100), 5.0, limits, PairedEvidence())
    assert broken.state == "fail" and broken.hard, broken
