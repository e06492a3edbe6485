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
