"""The probation verdict on recorded per-model counters: each reason to send a model back."""

from __future__ import annotations

from agent.config import ProbationConfig
from agent.updates.probation import judge
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
