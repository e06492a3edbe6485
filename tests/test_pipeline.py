import threading
import time

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import DetectionConfig, ModelConfig, PipelineConfig, SourceConfig
from agent.vision.backends import load_backend
from agent.vision.pipeline import ActiveModel, Pipeline
from agent.vision.sources import open_source
from tests import models_for_tests
from tests.conftest import wait_until
from tests.test_sources import ScriptedCapture, live


class Recorder:
    def __init__(self, on_emit=None):
        self.results = []
        self.on_emit = on_emit

    def emit(self, result):
        self.results.append(result)
        if self.on_emit:
            self.on_emit(result)

    def close(self):
        pass


class FailingSink:
    def emit(self, result):
        raise RuntimeError("disk on fire")

    def close(self):
        pass


class SlowBackend:
    """Wraps a real backend; waits ``delay`` s or on ``gate(call_index)`` before each inference."""

    def __init__(self, inner, delay=0.0, gate=None, fail_on=()):
        self.inner, self.delay, self.gate, self.fail_on = inner, delay, gate, set(fail_on)
        self.info = inner.info
        self.calls = 0

    def infer(self, tensor):
        index, self.calls = self.calls, self.calls + 1
        if self.gate is not None:
            self.gate(index)
        time.sleep(self.delay)
        if index in self.fail_on:
            raise RuntimeError("backend exploded")
        return self.inner.infer(tensor)

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory):
    path = models_for_tests.tiny_detector(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return load_backend("onnxruntime", path, ModelConfig(path=path))


def file_pipeline(video, model, sinks, **kwargs):
    source = open_source(SourceConfig(uri=str(video), pace="fast"))
    config = PipelineConfig(**kwargs.pop("config", {}))
    return Pipeline(
        source,
        model if callable(model) else (lambda: model),
        sinks,
        DetectionConfig(),
        config,
        emit_empty=True,
        **kwargs,
    )


def test_every_frame_of_a_file_comes_out_once_and_in_order(bus_video, fp32_backend):
    sink = Recorder()
    pipeline = file_pipeline(bus_video, fp32_backend, [sink])
    pipeline.run()
    assert [r.frame.frame_id for r in sink.results] == list(range(24))
    snap = pipeline.stats.snapshot()
    assert (snap["frames_in"], snap["frames_out"], snap["dropped"], snap["errors"]) == (
        24,
        24,
        0,
        0,
    )
    labels = {d.label for r in sink.results for d in r.detections}
    assert {"bus", "person"} <= labels
    for stage in ("capture", "preprocess", "inference", "postprocess", "total"):
        assert snap["latency_ms"][stage]["p50"] is not None
    record = sink.results[0].to_dict()
    assert record["schema"] == "edge-agent/detections/v1"
    assert record["image"] == {"width": 640, "height": 480}


def test_stages_overlap(bus_video, tiny_backend):
    """Inference of frame k waits until capture and preprocess have handled frame k+1.
    A loop that ran the stages one after another would never get there and time out."""
    holder = {}

    def gate(index):
        stats = holder["pipeline"].stats
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if index == 23 or stats.latency["preprocess"].count >= index + 2:
                return
            time.sleep(0.001)
        holder["sequential"] = index

    pipeline = file_pipeline(bus_video, SlowBackend(tiny_backend, gate=gate), [Recorder()])
    holder["pipeline"] = pipeline
    pipeline.run()
    assert "sequential" not in holder
    assert pipeline.stats.frames_out == 24


def test_live_source_keeps_no_backlog_when_inference_is_slow(tiny_backend):
    source = live([ScriptedCapture(100_000, interval=0.001)])
    sink = Recorder()
    pipeline = Pipeline(
        source,
        lambda: SlowBackend(tiny_backend, delay=0.03),
        [sink],
        DetectionConfig(),
        PipelineConfig(queue_size=2),
        emit_empty=True,
    )
    pipeline.start()
    time.sleep(1.0)
    pipeline.stop()
    assert pipeline.wait(timeout=10)
    source.close()
    stats = pipeline.stats
    assert source.stats.dropped + stats.dropped > 100  # old frames were let go ...
    assert stats.frames_in - stats.frames_out - stats.dropped <= 2  # ... nothing left queued
    ages = [r.latency_ms["total"] for r in sink.results]
    assert max(ages) < 500  # results stay fresh: no queue of stale frames builds up


def test_a_frame_dropped_for_a_newer_one_gives_its_tensor_back(tiny_backend):
    """Each newer frame that pushes a waiting one out before inference must return that one's
    input tensor to the pool: they were lost, and after a few drops the loop ran with one
    tensor in flight instead of its overlap (a slow device got slower, unseen)."""
    source = live([ScriptedCapture(100_000, interval=0.001)])
    pipeline = Pipeline(
        source,
        lambda: SlowBackend(tiny_backend, delay=0.03),
        [Recorder()],
        DetectionConfig(),
        PipelineConfig(queue_size=2),
        emit_empty=True,
    )
    pipeline.start()
    wait_until(lambda: pipeline.stats.frames_out >= 20, 60, "20 frames out")
    pipeline.stop()
    assert pipeline.wait(timeout=10)
    source.close()
    (pre,) = pipeline._preprocessors.values()
    assert pipeline.stats.dropped > 20
    assert pre.pool._free.qsize() == pre.pool.size  # every tensor came back


def test_thresholds_change_live_and_bad_values_change_nothing(bus_video, fp32_backend):
    sink = Recorder()
    pipeline = file_pipeline(bus_video, fp32_backend, [sink])
    pipeline.set_thresholds(confidence=0.8)
    with pytest.raises(ValidationError):
        pipeline.set_thresholds(confidence=2.0)
    assert pipeline.detection.confidence == 0.8
    pipeline.run()
    scores = [d.score for r in sink.results for d in r.detections]
    assert scores and min(scores) > 0.8


def test_failing_sink_and_inference_errors_do_not_stop_the_loop(bus_video, tiny_backend):
    good = Recorder()
    pipeline = file_pipeline(
        bus_video, SlowBackend(tiny_backend, fail_on={3, 7}), [FailingSink(), good]
    )
    pipeline.run()
    assert len(good.results) == 22
    assert pipeline.stats.errors == 2 + 22


def test_model_swap_falls_between_two_frames(bus_video, fp32_backend, dynamic_backend):
    active = ActiveModel(fp32_backend)

    def swap_at_frame_8(result):
        if result.frame.frame_id == 8:
            active.swap(dynamic_backend)

    sink = Recorder(on_emit=swap_at_frame_8)
    pipeline = file_pipeline(bus_video, active, [sink])
    pipeline.run()
    versions = [r.model.model_version for r in sink.results]
    assert [r.frame.frame_id for r in sink.results] == list(range(24))
    switch = versions.index(dynamic_backend.info.model_version)
    assert set(versions[:switch]) == {fp32_backend.info.model_version}
    assert set(versions[switch:]) == {dynamic_backend.info.model_version}


def test_frames_over_the_deadline_are_counted_late(bus_video, tiny_backend):
    pipeline = file_pipeline(
        bus_video, SlowBackend(tiny_backend, delay=0.01), [Recorder()], config={"deadline_ms": 1}
    )
    pipeline.run()
    assert pipeline.stats.late == 24 and pipeline.stats.frames_out == 24  # files never drop


def test_device_time_from_an_accelerator_is_kept_beside_the_wall_time(bus_video, tiny_backend):
    class TimedBackend(SlowBackend):
        last_device_ms = 1.25  # what a backend timing its run with CUDA events reports

    pipeline = file_pipeline(bus_video, TimedBackend(tiny_backend, delay=0.0), [Recorder()])
    pipeline.run()
    latency = pipeline.stats.snapshot()["latency_ms"]
    assert latency["inference_device"]["p50"] == 1.25 and latency["inference"]["p50"] > 0
    plain = file_pipeline(bus_video, tiny_backend, [Recorder()])
    plain.run()
    assert "inference_device" not in plain.stats.snapshot()["latency_ms"]


def test_stop_drains_frames_in_flight(bus_video, tiny_backend):
    source = open_source(SourceConfig(uri=str(bus_video), pace="fast", loop=True))
    pipeline = Pipeline(
        source,
        lambda: SlowBackend(tiny_backend, delay=0.005),
        [Recorder()],
        DetectionConfig(),
        PipelineConfig(),
        emit_empty=True,
    )
    earlier = set(threading.enumerate())  # e.g. workers other tests abandoned on purpose
    pipeline.start()
    time.sleep(0.5)
    pipeline.stop()
    assert pipeline.wait(timeout=60)
    assert pipeline.stats.frames_in == pipeline.stats.frames_out
    stages = [t for t in threading.enumerate()
              if t.name in ("capture", "inference") and t not in earlier]  # fmt: skip
    for thread in stages:  # wait() joins for a second each; a loaded machine may need longer
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in stages)


def test_stop_loses_no_frame_waiting_for_a_full_queue(bus_video, tiny_backend):
    """Inference slower than the queue's put timeout: at stop, preprocess waits on a full queue
    with a frame in hand; that frame must still come out (it used to vanish, counted nowhere)."""
    sink = Recorder()
    pipeline = file_pipeline(
        bus_video, SlowBackend(tiny_backend, delay=0.25), [sink], config={"queue_size": 1}
    )
    pipeline.start()
    time.sleep(0.8)
    pipeline.stop()
    assert pipeline.wait(timeout=20)
    ids = [r.frame.frame_id for r in sink.results]
    assert ids == list(range(pipeline.stats.frames_in))
    assert pipeline.stats.dropped == 0


def test_frame_limit_stops_the_source(bus_video, tiny_backend):
    pipeline = file_pipeline(bus_video, tiny_backend, [Recorder()], max_frames=5)
    pipeline.run()
    assert pipeline.stats.frames_out == 5


def test_tensors_return_to_the_pool(bus_video, tiny_backend):
    pipeline = file_pipeline(bus_video, SlowBackend(tiny_backend, fail_on={2}), [Recorder()])
    pipeline.run()
    (pre,) = pipeline._preprocessors.values()
    held = [pre.pool.acquire(timeout=1) for _ in range(pre.pool.size)]
    assert len(held) == pre.pool.size and all(isinstance(t, np.ndarray) for t in held)
