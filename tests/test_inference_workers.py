"""Several inferences at once on one model: how many, their threads, frames leaving in the order
they came, and a stuck worker given up on without holding up the frames behind it."""

from __future__ import annotations

import threading

from agent.config import DetectionConfig, PipelineConfig, SourceConfig, load_config
from agent.loading import ModelLoader
from agent.vision import ActiveModel, CameraFeed, Pipeline, open_source
from agent.vision.inference_workers import InOrder, inference_workers, threads_per_run
from tests.conftest import wait_until
from tests.test_cameras import Results

CLIPS = ("person-bicycle-car-detection.mp4", "one-by-one-person-detection.mp4",
         "bottle-detection.mp4")  # fmt: skip


def cameras(shared, count: int) -> list[CameraFeed]:
    videos = shared / "videos"
    return [CameraFeed(f"cam{i}", open_source(SourceConfig(uri=str(videos / clip), pace="fast")),
                       DetectionConfig())
            for i, clip in enumerate(CLIPS[:count])]  # fmt: skip


def test_one_camera_runs_one_inference_at_a_time_and_several_share_the_cores():
    assert inference_workers(0, cameras=1, cores=16) == 1  # latency first
    assert inference_workers(0, cameras=3, cores=2) == 2  # no more runs than cores
    assert inference_workers(0, cameras=8, cores=16) == 4  # nor more than four
    assert inference_workers(3, cameras=1, cores=2) == 3  # as configured
    assert threads_per_run(2, cores=2) == 1
    assert threads_per_run(3, cores=8) == 2
    assert threads_per_run(4, cores=2) == 1


def test_the_loader_gives_each_run_its_share_of_the_cores(tmp_path, fp32_model, shared):
    clip = shared / "videos" / CLIPS[0]
    path = tmp_path / "agent.yaml"
    cams = f"cameras:\n  - {{name: a, uri: {clip}}}\n  - {{name: b, uri: {clip}}}\n"
    path.write_text(f"model: {{path: {fp32_model}}}\nstate_dir: {tmp_path / 'state'}\n"
                    f"pipeline: {{inference_workers: 2}}\n{cams}")  # fmt: skip
    assert ModelLoader(load_config(path)).options.threads == threads_per_run(2)
    path.write_text(path.read_text().replace("inference_workers: 2", "inference_workers: 1"))
    assert ModelLoader(load_config(path)).options.threads == 0  # the runtime decides


def test_frames_leave_in_the_order_they_were_taken_whatever_order_they_finish_in():
    out: list[str] = []
    order = InOrder(out.append)
    end = object()
    items = iter(["a", "b", "c", "d"])
    tickets = {}
    for _ in range(4):
        item, ticket = order.take(lambda: next(items), end)
        tickets[item] = ticket
    order.finish(tickets["c"], "c")
    order.finish(tickets["b"], None)  # dropped (late, failed or abandoned)
    assert out == []  # "a" has not finished: nothing behind it leaves
    order.finish(tickets["a"], "a")
    assert out == ["a", "c"]
    order.finish(tickets["d"], "d")
    assert out == ["a", "c", "d"] and order.in_flight == 0
    assert order.take(lambda: end, end) == (end, None)


class Overlapping:
    """The real model, made to prove that two runs overlap: the first run waits (bounded) until
    a second one has started."""

    concurrent = True

    def __init__(self, inner) -> None:
        self.inner, self.info = inner, inner.info
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()
        self.second_started = threading.Event()
        self.first = True

    def infer(self, tensor):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            first, self.first = self.first, False
            if self.running >= 2:
                self.second_started.set()
        try:
            if first:
                self.second_started.wait(60)
            return self.inner.infer(tensor)
        finally:
            with self._lock:
                self.running -= 1

    def close(self) -> None:
        pass


def test_two_workers_run_the_model_at_once_and_every_camera_keeps_its_order(shared, fp32_backend):
    feeds = cameras(shared, 3)
    model = Overlapping(fp32_backend)
    results = Results()
    pipeline = Pipeline(None, ActiveModel(model), [results], DetectionConfig(),
                        PipelineConfig(inference_workers=2), emit_empty=True, max_frames=60,
                        cameras=feeds)  # fmt: skip
    pipeline.run()
    for feed in feeds:
        feed.source.close()
    assert pipeline.crashed is None and pipeline.workers == 2
    assert model.second_started.is_set() and model.most == 2  # two runs at once, never more
    for feed in feeds:
        ids = [r.frame.frame_id for r in results.by_camera[feed.name]]
        assert ids == list(range(feed.stats.frames_in)), feed.name  # in order, none missing
    assert sum(len(v) for v in results.by_camera.values()) == 60


def test_a_backend_that_runs_one_at_a_time_gets_one_worker(shared, fp32_backend):
    class OneAtATime:
        def __init__(self, inner):
            self.inner, self.info = inner, inner.info

        def infer(self, tensor):
            return self.inner.infer(tensor)

    feeds = cameras(shared, 2)
    model = ActiveModel(OneAtATime(fp32_backend))
    settings = PipelineConfig(inference_workers=2)
    pipeline = Pipeline(None, model, [Results()], DetectionConfig(), settings, cameras=feeds)
    for feed in feeds:
        feed.source.close()
    assert pipeline.workers == 1


class StuckOnce:
    """The real model, stuck on its ``stuck_on``-th run until released (a hung driver call)."""

    concurrent = True

    def __init__(self, inner, stuck_on: int) -> None:
        self.inner, self.info, self.stuck_on = inner, inner.info, stuck_on
        self.calls = 0
        self._lock = threading.Lock()
        self.stuck = threading.Event()
        self.release = threading.Event()

    def infer(self, tensor):
        with self._lock:
            self.calls += 1
            mine = self.calls
        if mine == self.stuck_on:
            self.stuck.set()
            self.release.wait()
        return self.inner.infer(tensor)

    def close(self) -> None:
        self.release.set()


def test_a_stuck_worker_is_given_up_on_and_the_frames_behind_it_go_on(shared, fp32_backend):
    feeds = cameras(shared, 2)
    model = StuckOnce(fp32_backend, stuck_on=5)
    results = Results()
    pipeline = Pipeline(None, ActiveModel(model), [results], DetectionConfig(),
                        PipelineConfig(inference_workers=2), emit_empty=True, max_frames=40,
                        cameras=feeds)  # fmt: skip
    pipeline.start()
    try:
        wait_until(model.stuck.is_set, 60, "the fifth run to hang")
        # frames taken after the stuck one finish, but wait behind it: only the (at most
        # five) frames taken before it can have left
        wait_until(lambda: model.calls >= 8, 60, "the other worker to run frames behind it")
        assert pipeline.stats.frames_out <= model.stuck_on
        assert pipeline.busy_since["inference"] is not None  # the watchdog sees the hang
        pipeline.replace_inference_worker()
        assert pipeline.wait(timeout=120), "the loop did not drain after the stuck worker went"
    finally:
        model.release.set()
        pipeline.stop()
        for feed in feeds:
            feed.source.close()
    assert pipeline.crashed is None and pipeline.abandoned_workers == 1
    delivered = sum(len(v) for v in results.by_camera.values())
    assert delivered == 39  # every frame but the stuck one
    for feed in feeds:
        ids = [r.frame.frame_id for r in results.by_camera[feed.name]]
        assert ids == sorted(ids), feed.name


def test_openvino_gets_a_stream_per_worker_unless_configured(tmp_path, fp32_model, shared):
    clip = shared / "videos" / CLIPS[0]
    path = tmp_path / "agent.yaml"
    cams = f"cameras:\n  - {{name: a, uri: {clip}}}\n  - {{name: b, uri: {clip}}}\n"
    state = tmp_path / "state"
    path.write_text(f"model: {{path: {fp32_model}, backend: openvino}}\n"
                    f"state_dir: {state}\npipeline: {{inference_workers: 2}}\n{cams}")  # fmt: skip
    options = ModelLoader(load_config(path)).options
    assert options.openvino.streams == 2 and options.threads == 0  # threads: OpenVINO's total
    path.write_text(path.read_text().replace("backend: openvino", "backend: openvino, "
                                             "openvino: {streams: 1}"))  # fmt: skip
    assert ModelLoader(load_config(path)).options.openvino.streams == 1


def test_the_rk3588_gets_a_context_per_worker_up_to_its_three_cores(tmp_path, shared):
    clip = shared / "videos" / CLIPS[0]
    path = tmp_path / "agent.yaml"
    cams = "".join(f"  - {{name: c{i}, uri: {clip}}}\n" for i in range(4))
    state = tmp_path / "state"
    path.write_text(f"model: {{path: m.rknn, backend: rknn}}\nstate_dir: {state}\n"
                    f"pipeline: {{inference_workers: 4}}\ncameras:\n{cams}")  # fmt: skip
    assert ModelLoader(load_config(path)).options.rknn.contexts == 3
