"""The staged detection loop: capture -> preprocess -> infer -> postprocess -> sinks.

Each stage runs on its own thread and hands work on through a small bounded queue, so decoding
frame N+2 and letterboxing frame N+1 overlap with inference on frame N (OpenCV and ONNX Runtime
release the GIL). Each camera has its own capture thread and lane; preprocess takes from the
lanes in turn (``cameras.FairQueue``), so one model serves every camera. Live sources keep only
the newest frame; file sources apply back-pressure and never drop. The active model is asked
for once per frame, at preprocess, and that frame keeps it through inference and postprocess,
so a model swap falls cleanly between two frames. With several cameras, a few inference workers
run the one model at once (``inference_workers``) and frames leave them in the order they came.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from agent.config import DetectionConfig, PipelineConfig
from agent.contract.errors import SourceError
from agent.vision.backends.base import Backend
from agent.vision.cameras import CameraFeed, FairQueue
from agent.vision.inference_workers import InOrder, Worker, inference_workers
from agent.vision.motion import MotionGate
from agent.vision.postprocess import Detection, DetectionParams, decode
from agent.vision.preprocess import Letterbox, Preprocessor
from agent.vision.result import FrameResult
from agent.vision.scene import Scene
from agent.vision.sinks import Sink
from agent.vision.sources import Frame, FrameSource
from agent.vision.stats import PipelineStats

log = logging.getLogger(__name__)

_END = object()  # flows down the queues once the source is exhausted or stopped


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's niceness (Linux schedules threads individually); best effort."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:
        log.debug("cannot lower thread priority: %s", exc)


@dataclass(frozen=True)
class Shadow:
    """A second model run on the same frames as the active one, at the same moment: how a new
    model on probation is compared with the one it replaced, under the same load."""

    backend: Backend
    record: Callable[[PairedFrame], None]  # called on the postprocess thread
    every: int = 2  # pair every Nth frame (a pair costs a second inference)


@dataclass(frozen=True)
class PairedFrame:
    """One frame run through both models: their inference times and their detections."""

    new_ms: float
    old_ms: float
    new: list[Detection]
    old: list[Detection]


class ActiveModel:
    """The one reference the loop reads per frame; swapping it replaces the model between frames."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.previous: Backend | None = None
        self.shadow: Shadow | None = None  # set while a new model is on probation
        self._lock = threading.Lock()

    def __call__(self) -> Backend:
        return self._backend

    def swap(self, backend: Backend) -> Backend:
        with self._lock:
            previous, self._backend = self._backend, backend
            self.previous = previous
        return previous


class StageQueue:
    """A bounded queue whose blocking calls give up only when a stage has crashed.

    A plain stop keeps them blocking: frames already in flight must still reach the sinks (a
    stop used to drop a frame here silently when the next queue was full).
    """

    def __init__(self, maxsize: int, aborted: threading.Event) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._aborted = aborted

    def put(self, item: Any) -> None:
        """Block while full (back-pressure); the end marker always gets through."""
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._aborted.is_set() and item is not _END:
                    return

    def put_latest(self, item: Any) -> Any | None:
        """Never block: when full, push out the oldest item and return it (it was dropped)."""
        dropped = None
        while True:
            try:
                self._queue.put_nowait(item)
                return dropped
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    dropped = self._queue.get_nowait()

    def get(self) -> Any:
        return self._queue.get()


@dataclass(slots=True)
class Job:
    frame: Frame
    model: Backend
    preprocessor: Preprocessor
    tensor: np.ndarray
    letterbox: Letterbox
    latency_ms: dict[str, float] = field(default_factory=dict)
    output: np.ndarray | None = None
    shadow: tuple[Shadow, np.ndarray, float] | None = None  # its output and time, when paired
    camera: CameraFeed = None  # type: ignore[assignment]  # set by preprocess


class Pipeline:
    def __init__(
        self,
        source: FrameSource | None,
        model: Callable[[], Backend],
        sinks: Sequence[Sink],
        detection: DetectionConfig,
        config: PipelineConfig,
        emit_empty: bool = False,
        max_frames: int | None = None,
        scene: Scene | None = None,
        gate: MotionGate | None = None,
        cameras: Sequence[CameraFeed] = (),
    ) -> None:
        """One camera (``source``), or several (``cameras``, source None) sharing the model.

        ``scene``: the camera's tracker, zones and lines; with one, boxes are decoded down
        to its low score (they extend tracks) and only those at ``detection.confidence`` or
        more reach the sinks, with their track ids, next to the object events. ``gate``: motion
        gating, which lets a frame on to the detector only when it needs it. ``max_frames``
        counts frames of all cameras together."""
        if source is not None:
            cameras = [CameraFeed(source.name, source, detection, scene, gate)]
        if not cameras:
            raise ValueError("a pipeline needs a source or at least one camera")
        self.cameras = list(cameras)
        self._by_name = {camera.name: camera for camera in self.cameras}
        for camera in self.cameras:
            camera.stats = PipelineStats(config.latency_window)
        self.model = model
        self.sinks = list(sinks)
        self.config = config
        self.emit_empty = emit_empty
        self.max_frames = max_frames
        self.stats = PipelineStats(config.latency_window)  # all cameras together
        self.error: SourceError | None = None
        self._paired_frames = 0
        self.crashed: str | None = None  # "stage: exception" when a stage died of a bug
        self.last_result: FrameResult | None = None
        self._params_cache: dict[tuple, DetectionParams] = {}
        self._preprocessors: dict[tuple, Preprocessor] = {}
        self._stop = threading.Event()
        self._aborted = threading.Event()  # a stage crashed: nothing downstream will drain
        self._done = threading.Event()
        lanes = {c.name: self._lane_size(c.source) for c in self.cameras}
        self._waiting = FairQueue(lanes, self._aborted)
        # one live camera may drop a waiting tensor for a newer frame; with several cameras
        # the newest-frame choice is made per camera in its lane, never across cameras, and
        # two tensors wait for inference so that it never waits for the (niced) preprocess
        self._newest_first = len(self.cameras) == 1 and self.cameras[0].source.live
        ahead = config.live_queue_size if self._newest_first else config.queue_size
        self._to_infer = StageQueue(ahead, self._aborted)
        self._to_postprocess = StageQueue(config.queue_size, self._aborted)
        self._threads: list[threading.Thread] = []
        # watchdog view: when each stage started its current item (None: waiting for work);
        # for inference, the oldest run in progress
        self.busy_since: dict[str, float | None] = dict.fromkeys(
            ("capture", "preprocess", "inference", "postprocess"), None
        )
        self.workers = inference_workers(config.inference_workers, len(self.cameras))
        if not getattr(model(), "concurrent", False):
            self.workers = 1  # its runtime takes one run at a time: more would only queue
        self._workers: list[Worker] = []  # the inference threads not given up on
        self._workers_lock = threading.Lock()
        self._workers_started = 0
        self._in_order = InOrder(self._to_postprocess.put)
        self._exclusive: dict[int, threading.Lock] = {}  # per backend that runs one at a time
        self.abandoned_workers = 0
        self._taken = 0  # frames taken from all cameras (max_frames)
        self._taking = threading.Lock()

    def _lane_size(self, source: FrameSource) -> int:
        return self.config.live_queue_size if source.live else self.config.queue_size

    # -- the cameras (the first one stands for all where one is asked for) -----------------
    @property
    def source(self) -> FrameSource:
        return self.cameras[0].source

    @property
    def scene(self) -> Scene | None:
        return self.cameras[0].scene

    @property
    def gate(self) -> MotionGate | None:
        return self.cameras[0].gate

    @property
    def live(self) -> bool:
        """Is any camera live? (With none, frames ending is the end of the files, not a fault.)"""
        return any(c.source.live for c in self.cameras)

    def live_nominal_fps(self) -> float | None:
        """What the cameras should deliver together, when every one is live and says its
        rate (the watchdog's rate check); None otherwise."""
        rates = [c.source.nominal_fps if c.source.live else None for c in self.cameras]
        return sum(rates) if all(rates) else None  # type: ignore[arg-type]

    def camera(self, name: str | None) -> CameraFeed:
        """The named camera (None: the first); KeyError names the cameras there are."""
        if name is None:
            return self.cameras[0]
        if name not in self._by_name:
            raise KeyError(f"no camera {name!r}; cameras: {', '.join(self._by_name)}")
        return self._by_name[name]

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.opencv_threads:
            cv2.setNumThreads(self.config.opencv_threads)
        single = len(self.cameras) == 1
        loops: list[tuple[str, Callable[[], None]]] = [
            ("capture" if single else f"capture-{camera.name}", self._capture_for(camera))
            for camera in self.cameras
        ]
        loops += [("preprocess", self._preprocess_loop), ("postprocess", self._postprocess_loop)]
        for name, target in loops:
            thread = threading.Thread(target=self._guard(name, target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        for _ in range(self.workers):
            with self._workers_lock:
                worker = self._new_worker()
            self._start_inference_worker(worker)

    def _new_worker(self) -> Worker:
        """A worker counted among the running ones (call with ``_workers_lock`` held)."""
        worker = Worker(f"inference-{self._workers_started}")
        self._workers_started += 1
        self._workers.append(worker)
        return worker

    def _start_inference_worker(self, worker: Worker) -> None:
        thread = threading.Thread(
            target=self._guard("inference", lambda: self._inference_loop(worker)),
            name=worker.name,
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def replace_inference_worker(self) -> None:
        """Abandon the inference thread stuck longest (in a call that cannot be interrupted):
        its frame is dropped, so the frames behind it go on, and a fresh thread takes its place
        on the same queue. The stuck one exits whenever its call returns."""
        with self._workers_lock:
            busy = [w for w in self._workers if w.busy_since is not None]
            if not busy:
                return
            stuck = min(busy, key=lambda w: w.busy_since or 0.0)
            stuck.abandoned = True
            self._workers.remove(stuck)
            self.abandoned_workers += 1
            replacement = self._new_worker()  # in the same step: the count never reads 0
        if stuck.ticket is not None:
            self._in_order.finish(stuck.ticket, None)
        self._mark_busy(stuck, None)
        self._start_inference_worker(replacement)

    def _mark_busy(self, worker: Worker, since: float | None) -> None:
        """Record when ``worker``'s run started (None: it ended); the watchdog sees the oldest."""
        with self._workers_lock:
            worker.busy_since = since
            starts = [w.busy_since for w in self._workers if w.busy_since is not None]
            self.busy_since["inference"] = min(starts) if starts else None

    def _end_inference_worker(self, worker: Worker) -> None:
        """A worker saw the end: the others must see it too, and the last one passes it on."""
        with self._workers_lock:
            if worker in self._workers:
                self._workers.remove(worker)
            last = not self._workers
        if last:
            self._to_postprocess.put(_END)
        else:
            self._to_infer.put(_END)

    def replace_source(self, source: FrameSource, camera: str | None = None) -> FrameSource:
        """Swap in a reopened source; the capture loop reads from it from its next frame on."""
        feed = self.camera(camera)
        previous, feed.source = feed.source, source
        self.busy_since["capture"] = None
        return previous

    def stop(self) -> None:
        """Stop capturing; frames already in flight still finish."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the pipeline to drain; logs a summary line every ``summary_interval_s``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        next_summary = time.monotonic() + self.config.summary_interval_s
        while not self._done.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._done.wait(0.2 if remaining is None else min(0.2, remaining))
            if time.monotonic() >= next_summary:
                log.info("%s", self.summary_line())
                next_summary += self.config.summary_interval_s
        for thread in self._threads:
            thread.join(timeout=1.0)
        return True

    def run(self) -> None:
        self.start()
        self.wait()

    def set_thresholds(self, camera: str | None = None, **changes: Any) -> DetectionConfig:
        """Change confidence/iou/max_detections/classes live, for one camera or (None) all;
        validated like the config file, and all cameras' checked before any is changed."""
        feeds = [self.camera(camera)] if camera is not None else self.cameras
        updated = [f.detection.model_validate({**f.detection.model_dump(), **changes})
                   for f in feeds]  # fmt: skip
        for feed, detection in zip(feeds, updated, strict=True):
            feed.detection = detection
        self._params_cache = {}
        return updated[0]

    @property
    def detection(self) -> DetectionConfig:
        return self.cameras[0].detection

    def summary_line(self) -> str:
        snap = self.stats.snapshot()
        lat = snap["latency_ms"]
        fps = snap["fps_out"]
        return (f"fps {fps:.1f} " if fps else "fps - ") + (
            f"in {snap['frames_in']} out {snap['frames_out']} dropped {snap['dropped']} "
            f"late {snap['late']} errors {snap['errors']} skipped {snap['skipped']} | p50 ms: "
            + " ".join(f"{k} {v['p50']}" for k, v in lat.items())
        )

    # -- stages ----------------------------------------------------------------------------
    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if name.startswith(("capture", "preprocess")) and self.config.helper_nice:
                lower_thread_priority(self.config.helper_nice)
            try:
                target()
            except Exception as exc:
                log.exception("pipeline stage %s crashed", name)
                self.crashed = f"{name}: {exc!r:.300}"
                self.stats.count("errors")
                self._aborted.set()
                self._stop.set()
                self._done.set()

        return run

    def _capture_for(self, camera: CameraFeed) -> Callable[[], None]:
        return lambda: self._capture_loop(camera)

    def _capture_loop(self, camera: CameraFeed) -> None:
        try:
            while not self._stop.is_set():
                if self.max_frames is not None and self._taken >= self.max_frames:
                    break
                source = camera.source  # the watchdog may have replaced it
                started = time.perf_counter()
                try:
                    frame = source.read(timeout=0.5)
                except TimeoutError:
                    continue
                if source is not camera.source:
                    continue  # a frame from the source that was just replaced
                if frame is None:
                    break
                with self._taking:
                    if self.max_frames is not None and self._taken >= self.max_frames:
                        break
                    self._taken += 1
                frame = camera.numbered(source, frame)
                now = time.monotonic()
                self.stats.mark_in(now)
                camera.stats.mark_in(now)
                if not source.live:
                    # a file frame's capture cost is its decode; a live frame's is its age
                    capture_ms = (time.perf_counter() - started) * 1000
                else:
                    capture_ms = (time.monotonic() - frame.captured) * 1000
                self.stats.latency["capture"].add(capture_ms)
                if source.live:
                    if self._waiting.put_latest(camera.name, frame) is not None:
                        self._count(camera, "dropped")
                else:
                    self._waiting.put(camera.name, frame)
        except SourceError as exc:
            self.error = exc
            log.error("camera %s: %s", camera.name, exc)
        finally:
            self._waiting.end(camera.name)

    def _count(self, camera: CameraFeed, name: str) -> None:
        self.stats.count(name)
        camera.stats.count(name)

    def _preprocessor_for(self, model: Backend) -> Preprocessor:
        key = (model.info.imgsz, model.info.input_dtype)
        pre = self._preprocessors.get(key)
        if pre is None:
            # every queue slot, plus the tensor being filled and one per inference worker
            pool = self.config.queue_size * 2 + 1 + self.workers
            pre = Preprocessor(model.info.imgsz, np.dtype(model.info.input_dtype), pool)
            self._preprocessors[key] = pre
        return pre

    def _preprocess_loop(self) -> None:
        while (waiting := self._waiting.get()) is not None:
            camera, frame = self._by_name[waiting[0]], waiting[1]
            if camera.gate is not None and not self._needs_detector(camera, frame):
                now = time.monotonic()
                self.stats.mark_skipped(now)
                camera.stats.mark_skipped(now)
                continue
            model = self.model()
            pre = self._preprocessor_for(model)
            started = time.perf_counter()
            self.busy_since["preprocess"] = time.monotonic()
            try:
                tensor, box = pre(frame.image)
            except ValueError as exc:
                log.warning("camera %s: frame %d skipped: %s", camera.name, frame.frame_id, exc)
                self._count(camera, "errors")
                continue
            finally:
                self.busy_since["preprocess"] = None
            elapsed = (time.perf_counter() - started) * 1000
            self.stats.latency["preprocess"].add(elapsed)
            job = Job(frame, model, pre, tensor, box, {"preprocess": elapsed}, camera=camera)
            if not self._newest_first:
                self._to_infer.put(job)
            elif (dropped := self._to_infer.put_latest(job)) is not None:
                dropped.preprocessor.pool.release(dropped.tensor)
                self._count(camera, "dropped")  # a newer frame is ready: latency beats backlog
        self._to_infer.put(_END)

    @staticmethod
    def _needs_detector(camera: CameraFeed, frame: Frame) -> bool:
        assert camera.gate is not None
        busy = camera.scene is not None and camera.scene.busy()
        return camera.gate.admit(frame.image, frame.captured, busy)

    def _inference_loop(self, worker: Worker) -> None:
        while not worker.abandoned:  # given up on: its replacement carries on
            job, ticket = self._in_order.take(self._to_infer.get, _END)
            if ticket is None:
                self._end_inference_worker(worker)
                return
            worker.ticket = ticket
            passed_on = self._infer(job, worker)
            if worker.abandoned:
                self.stats.count("dropped")  # finished after it was given up on: discard
                return
            worker.ticket = None
            self._in_order.finish(ticket, job if passed_on else None)

    def _infer(self, job: Job, worker: Worker) -> bool:
        """Run the model on one frame; False when the frame goes no further (late, failed)."""
        try:
            age_ms = (time.monotonic() - job.frame.captured) * 1000
            live = job.camera.source.live
            if live and self.config.drop_late and age_ms > self.config.deadline_ms:
                self._count(job.camera, "late")
                self._count(job.camera, "dropped")
                return False
            started = time.perf_counter()
            self._mark_busy(worker, time.monotonic())
            try:
                job.output = self._run(job.model, job.tensor)
            except Exception as exc:
                if worker.abandoned:
                    return False  # abandoned (cancelled) worker: its successor carries on
                log.warning("inference failed on frame %d: %s", job.frame.frame_id, exc)
                self.stats.count("errors")
                self.stats.count("inference_failures")
                self.stats.for_model(job.model).failures += 1
                return False
            finally:
                if not worker.abandoned:
                    self._mark_busy(worker, None)
            elapsed = (time.perf_counter() - started) * 1000
            job.shadow = self._run_shadow(job)
        finally:
            job.preprocessor.pool.release(job.tensor)
        if worker.abandoned:
            return False
        self.stats.inference_failures = 0  # a success ends a failure streak
        self.stats.latency["inference"].add(elapsed)
        job.latency_ms["inference"] = elapsed
        device_ms = getattr(job.model, "last_device_ms", None)  # CUDA events (tensorrt)
        if device_ms is not None:
            self.stats.add_device_time(device_ms)
        return True

    def _run(self, model: Backend, tensor: np.ndarray) -> np.ndarray:
        """``model.infer``; a backend that cannot run twice at once (no ``concurrent``) is
        taken by one worker at a time."""
        if getattr(model, "concurrent", False):
            return model.infer(tensor)
        lock = self._exclusive.get(id(model))
        if lock is None:  # once per backend, not a new Lock per frame
            lock = self._exclusive.setdefault(id(model), threading.Lock())
        with lock:
            return model.infer(tensor)

    def _run_shadow(self, job: Job) -> tuple[Shadow, np.ndarray, float] | None:
        """The shadow model on this frame's tensor, when one is set, this frame is due and its
        input is the same; None otherwise, or when it fails (not the new model's fault)."""
        shadow = getattr(self.model, "shadow", None)
        if shadow is None or shadow.backend is job.model:
            return None
        self._paired_frames += 1
        if self._paired_frames % shadow.every:
            return None
        mine, theirs = job.model.info, shadow.backend.info
        if (mine.imgsz, mine.input_dtype) != (theirs.imgsz, theirs.input_dtype):
            return None
        started = time.perf_counter()
        try:
            output = self._run(shadow.backend, job.tensor)
        except Exception as exc:
            log.debug("shadow inference failed: %r", exc)
            return None
        return shadow, output, (time.perf_counter() - started) * 1000

    def _record_pair(self, job: Job, detections: list[Detection]) -> None:
        assert job.shadow is not None
        shadow, output, old_ms = job.shadow
        backend = shadow.backend
        try:
            theirs = decode(output, job.letterbox, self._params_for(backend, job.camera),
                            backend.info.class_names)  # fmt: skip
            shadow.record(PairedFrame(job.latency_ms["inference"], old_ms, detections, theirs))
        except Exception as exc:  # the comparison must never cost the frame
            log.warning("probation pair dropped: %r", exc)

    def _params_for(self, model: Backend, camera: CameraFeed | None = None,
                    tracking: bool = False) -> DetectionParams:  # fmt: skip
        """A camera's decode thresholds for the model; ``tracking``: down to the tracker's low
        score."""
        camera = camera or self.cameras[0]
        key = (id(model.info), camera.name, tracking)
        params = self._params_cache.get(key)
        if params is None:
            params = DetectionParams.from_config(camera.detection, model.info.class_names)
            if tracking and camera.scene is not None:
                low = camera.scene.tracker.settings.low_score
                params = dataclasses.replace(params, confidence=min(params.confidence, low))
            self._params_cache[key] = params
        return params

    def _postprocess_loop(self) -> None:
        try:
            while (job := self._to_postprocess.get()) is not _END:
                self._finish(job)
            for camera in self.cameras:  # they end: every object still followed ends with them
                last = camera.last_result
                if camera.scene is not None and last is not None:
                    ended = FrameResult(last.frame, last.model, [], {}, camera.scene.close(),
                                        camera.name)  # fmt: skip
                    self._emit(ended, detections=False)
        finally:
            self._done.set()

    def _emit(self, result: FrameResult, detections: bool = True) -> None:
        """Detections to every sink (empty frames only when asked), then object events to the
        sinks that take them; a failing sink is counted and never stops the others."""
        for sink in self.sinks:
            try:
                if detections and (result.detections or self.emit_empty):
                    sink.emit(result)
                emit_objects = getattr(sink, "emit_objects", None)
                if result.objects and emit_objects is not None:
                    emit_objects(result.objects)
            except Exception as exc:
                log.warning("sink %s failed: %s", type(sink).__name__, exc)
                self.stats.count("errors")

    def _finish(self, job: Job) -> None:
        self.busy_since["postprocess"] = time.monotonic()
        try:
            self._finish_job(job)
        finally:
            self.busy_since["postprocess"] = None

    def _finish_job(self, job: Job) -> None:
        started = time.perf_counter()
        camera = job.camera
        try:
            params = self._params_for(job.model, camera, tracking=camera.scene is not None)
            detections = decode(job.output, job.letterbox, params, job.model.info.class_names)
            objects: list[dict[str, Any]] = []
            if camera.scene is not None:
                seen = camera.scene.observe(job.frame, detections, camera.detection.confidence)
                detections, objects = seen.detections, seen.events
        except Exception as exc:  # a model whose outputs cannot be decoded: counted per frame,
            # and the watchdog's output check escalates (reload, previous model) if it persists
            log.warning("camera %s: postprocess failed on frame %d: %r", camera.name,
                        job.frame.frame_id, exc)  # fmt: skip
            self._count(camera, "errors")
            return
        post_ms = (time.perf_counter() - started) * 1000
        if job.shadow is not None:
            self._record_pair(job, detections)
        self.stats.latency["postprocess"].add(post_ms)
        job.latency_ms["postprocess"] = post_ms
        total_ms = (time.monotonic() - job.frame.captured) * 1000
        job.latency_ms["total"] = total_ms
        result = FrameResult(job.frame, job.model.info, detections, job.latency_ms, objects,
                             camera.name)  # fmt: skip
        self.last_result = camera.last_result = result
        sink_started = time.perf_counter()
        self._emit(result)
        self.stats.latency["sink"].add((time.perf_counter() - sink_started) * 1000)
        self.stats.latency["total"].add(total_ms)
        camera.stats.latency["total"].add(total_ms)
        camera.stats.latency["inference"].add(job.latency_ms["inference"])
        late = total_ms > self.config.deadline_ms
        if late:
            self._count(camera, "late")
        per_model = self.stats.for_model(job.model)
        per_model.inference.add(job.latency_ms["inference"])
        per_model.frames += 1
        per_model.empty += not detections
        per_model.late += late
        now = time.monotonic()
        self.stats.mark_out(now)
        camera.stats.mark_out(now)
