"""Frame sources: video files, image folders, V4L2 cameras, RTSP/HTTP streams, GStreamer pipelines.

Files and folders are read on demand (paced to their frame rate, or flat out) and never drop a
frame. Live sources are read by a background thread that keeps only the newest frame, reconnects
with exponential backoff, and treats a silent stream (no frame within the stall timeout) as lost.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from agent.config import SourceConfig
from agent.contract.errors import SourceError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_URL = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", re.IGNORECASE)


@dataclass(slots=True)
class Frame:
    image: np.ndarray  # HxWx3 BGR
    frame_id: int
    timestamp: float  # wall clock (time.time) at capture, for messages
    captured: float  # time.monotonic at capture, for latencies
    source: str


@dataclass
class SourceStats:
    frames: int = 0
    dropped: int = 0  # overwritten before the pipeline took them (live sources)
    connects: int = 0
    reconnects: int = 0
    stalls: int = 0
    read_errors: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        return {
            "frames": self.frames,
            "dropped": self.dropped,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "stalls": self.stalls,
            "read_errors": self.read_errors,
            "last_error": self.last_error,
        }


class FrameSource(Protocol):
    name: str
    live: bool
    nominal_fps: float | None
    stats: SourceStats

    def read(self, timeout: float) -> Frame | None:
        """The next frame; None at the end of a file source.

        Raises:
            TimeoutError: no frame within ``timeout`` (live sources keep trying).
            SourceError: the source failed for good.
        """

    def close(self) -> None: ...


def detect_kind(uri: str) -> str:
    """Guess a source kind from its URI, or raise SourceError if it names nothing usable."""
    text = uri.strip()
    if text.isdigit() or text.startswith("/dev/video"):
        return "v4l2"
    if _URL.match(text):
        return "stream"
    if "appsink" in text and "!" in text:
        return "gstreamer"
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    raise SourceError(
        f"source {uri!r} not found: not a file, folder, camera index, /dev/video device, "
        "stream URL or GStreamer pipeline"
    )


def backoff_delays(initial: float, maximum: float, jitter: float = 0.1) -> Iterator[float]:
    """initial, 2x, 4x ... capped at maximum, each with +-jitter (a fleet must not reconnect in
    step)."""
    delay = initial
    while True:
        yield delay * (1 + random.uniform(-jitter, jitter))
        delay = min(maximum, delay * 2)


class ImageFolderSource:
    """Images in a folder, in name order; unreadable files are skipped and counted."""

    live = False

    def __init__(self, config: SourceConfig) -> None:
        self.name = config.uri
        root = Path(config.uri).expanduser()
        self._paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise SourceError(
                f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.nominal_fps = config.fps
        self._pace = config.pace == "realtime" and config.fps is not None
        self._loop = config.loop
        self._index = 0
        self._next_id = 0
        self._started: float | None = None
        self.stats = SourceStats()

    def read(self, timeout: float) -> Frame | None:
        while True:
            if self._index >= len(self._paths):
                if not self._loop:
                    return None
                self._index = 0
            path = self._paths[self._index]
            self._index += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                self.stats.read_errors += 1
                self.stats.last_error = f"cannot decode {path}"
                log.warning("skipping unreadable image %s", path)
                continue
            _pace(self, self._next_id)
            return _make_frame(self, image)

    def close(self) -> None:
        self._paths = []


def _pace(source: ImageFolderSource | VideoFileSource, frame_index: int) -> None:
    if not source._pace or not source.nominal_fps:
        return
    now = time.monotonic()
    if source._started is None:
        source._started = now
    delay = source._started + frame_index / source.nominal_fps - now
    if delay > 0:
        time.sleep(delay)


def _make_frame(source: ImageFolderSource | VideoFileSource, image: np.ndarray) -> Frame:
    frame = Frame(image, source._next_id, time.time(), time.monotonic(), source.name)
    source._next_id += 1
    source.stats.frames += 1
    return frame


class VideoFileSource:
    """A video file decoded frame by frame; paced to its own fps or as fast as possible."""

    live = False

    def __init__(self, config: SourceConfig, opener: Callable[[], cv2.VideoCapture]) -> None:
        self.name = config.uri
        self._opener = opener
        self._capture = opener()
        if not self._capture.isOpened():
            raise SourceError(f"cannot open video file {config.uri} (unsupported or corrupt)")
        file_fps = self._capture.get(cv2.CAP_PROP_FPS) or 0.0
        self.nominal_fps = config.fps or (file_fps if 0 < file_fps < 1000 else 30.0)
        self._pace = config.pace == "realtime"
        self._loop = config.loop
        self._next_id = 0
        self._started: float | None = None
        self.stats = SourceStats(connects=1)

    def read(self, timeout: float) -> Frame | None:
        ok, image = self._capture.read()
        if not ok and self._loop and self.stats.frames > 0:
            self._capture.release()
            self._capture = self._opener()
            ok, image = self._capture.read()
        if not ok:
            return None
        _pace(self, self._next_id)
        return _make_frame(self, image)

    def close(self) -> None:
        self._capture.release()


class LatestFrameSlot:
    """Holds only the newest frame; a frame overwritten before it is taken counts as dropped."""

    def __init__(self, stats: SourceStats) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._stats = stats
        self._failure: SourceError | None = None

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self._stats.dropped += 1
            self._frame = frame
            self._cond.notify_all()

    def fail(self, error: SourceError) -> None:
        with self._cond:
            self._failure = error
            self._cond.notify_all()

    def take(self, timeout: float) -> Frame:
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame is not None or self._failure, timeout):
                raise TimeoutError("no new frame")
            if self._frame is None:
                raise self._failure  # type: ignore[misc]
            frame, self._frame = self._frame, None
            return frame


class LiveSource:
    """Camera or stream read on its own thread, reconnected with backoff when lost or silent.

    A reader thread blocked inside OpenCV cannot be interrupted, so a stalled reader is abandoned
    (it exits when its read returns) and a fresh one is started: the supervisor never waits on it.
    """

    live = True

    def __init__(self, config: SourceConfig, opener: Callable[[], cv2.VideoCapture]) -> None:
        self.name = config.uri
        self.nominal_fps: float | None = config.fps
        self._config = config
        self._opener = opener
        self.stats = SourceStats()
        self._slot = LatestFrameSlot(self.stats)
        self._stop = threading.Event()
        self._generation = 0
        self._last_frame = time.monotonic()
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._supervisor = threading.Thread(
            target=self._supervise, name="source-supervisor", daemon=True
        )
        self._supervisor.start()

    def read(self, timeout: float) -> Frame | None:
        return self._slot.take(timeout)

    def close(self) -> None:
        """Stop, and give the current reader a moment to leave OpenCV: a thread still inside
        ``capture.read()`` when Python finalizes is killed on its way out of it, and OpenCV's
        catch-all turns that into abort() ("exception not rethrown", exit status -6)."""
        self._stop.set()
        self._supervisor.join(timeout=2.0)
        reader = self._reader
        if reader is not None:
            reader.join(timeout=2.0)

    def _supervise(self) -> None:
        delays = backoff_delays(self._config.reconnect_initial_s, self._config.reconnect_max_s)
        failures = 0
        while not self._stop.is_set():
            self._generation += 1
            ended = threading.Event()
            got_frames = threading.Event()
            reader = threading.Thread(
                target=self._read_loop,
                args=(self._generation, ended, got_frames),
                name=f"source-reader-{self._generation}",
                daemon=True,
            )
            self._last_frame = time.monotonic()
            self._reader = reader
            reader.start()
            while not self._stop.is_set() and not ended.wait(0.05):
                if time.monotonic() - self._last_frame > self._config.stall_timeout_s:
                    self.stats.stalls += 1
                    self.stats.last_error = f"no frame for {self._config.stall_timeout_s:g} s"
                    log.warning(
                        "source %s stalled: %s; reconnecting", self.name, self.stats.last_error
                    )
                    break
            self._generation += 1  # abandons the reader if it is still blocked
            if self._stop.is_set():
                return
            if got_frames.is_set():
                failures = 0
                delays = backoff_delays(
                    self._config.reconnect_initial_s, self._config.reconnect_max_s
                )
            else:
                failures += 1
            limit = self._config.max_reconnects
            if limit is not None and failures > limit:
                error = SourceError(
                    f"source {self.name} failed {failures} time(s) in a row, giving up: "
                    f"{self.stats.last_error}"
                )
                log.error("%s", error)
                self._slot.fail(error)
                return
            self.stats.reconnects += 1
            delay = next(delays)
            log.info("reconnecting to %s in %.2f s (attempt %d)", self.name, delay, failures + 1)
            self._stop.wait(delay)

    def _read_loop(
        self, generation: int, ended: threading.Event, got_frames: threading.Event
    ) -> None:
        capture = None
        try:
            capture = self._opener()
            if not capture.isOpened():
                self.stats.last_error = f"cannot open {self.name}"
                log.warning("%s", self.stats.last_error)
                return
            self.stats.connects += 1
            if self.nominal_fps is None:
                fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
                self.nominal_fps = fps if 0 < fps < 1000 else None
            while generation == self._generation and not self._stop.is_set():
                ok, image = capture.read()
                if generation != self._generation:
                    return
                if not ok or image is None:
                    self.stats.read_errors += 1
                    self.stats.last_error = f"read from {self.name} failed"
                    return
                now = time.monotonic()
                self._last_frame = now
                got_frames.set()
                with self._id_lock:
                    frame_id, self._next_id = self._next_id, self._next_id + 1
                self.stats.frames += 1
                self._slot.put(Frame(image, frame_id, time.time(), now, self.name))
        except cv2.error as exc:
            self.stats.last_error = f"OpenCV error on {self.name}: {exc}"
            log.warning("%s", self.stats.last_error)
        finally:
            if capture is not None:
                capture.release()
            ended.set()


def capture_opener(config: SourceConfig, kind: str) -> Callable[[], cv2.VideoCapture]:
    """A function that opens the OpenCV capture for ``config`` with the right API and timeouts."""
    timeout_ms = int(config.stall_timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms]
    params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    if config.decode_threads:
        params += [cv2.CAP_PROP_N_THREADS, config.decode_threads]

    def open_capture() -> cv2.VideoCapture:
        if kind == "v4l2":
            device: int | str = int(config.uri) if config.uri.isdigit() else config.uri
            capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
            if config.width:
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
            if config.height:
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            return capture
        if kind == "gstreamer":
            return cv2.VideoCapture(config.uri, cv2.CAP_GSTREAMER)
        return cv2.VideoCapture(config.uri, cv2.CAP_FFMPEG, params)

    return open_capture


class PacedCapture:
    """A video file that delivers frames at its own rate, like a camera (``pace: live``)."""

    def __init__(self, capture: cv2.VideoCapture, loop: bool, fps: float | None) -> None:
        self._capture, self._loop = capture, loop
        found = capture.get(cv2.CAP_PROP_FPS) or 0.0
        self._interval = 1.0 / (fps or (found if 0 < found < 1000 else 25.0))
        self._due = time.monotonic()

    def isOpened(self) -> bool:  # OpenCV's name
        return self._capture.isOpened()

    def get(self, prop: int) -> float:
        return self._capture.get(prop)

    def read(self) -> tuple[bool, Any]:
        delay = self._due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._due = max(self._due + self._interval, time.monotonic() - self._interval)
        ok, image = self._capture.read()
        if not ok and self._loop:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._capture.read()
        return ok, image

    def release(self) -> None:
        self._capture.release()


def open_source(config: SourceConfig) -> FrameSource:
    """Open the source described by ``config``.

    Raises:
        SourceError: the source does not exist or (for files) cannot be opened.
    """
    kind = detect_kind(config.uri) if config.kind == "auto" else config.kind
    if kind == "folder":
        return ImageFolderSource(config)
    if kind == "file":
        if not Path(config.uri).expanduser().is_file():
            raise SourceError(f"video file not found: {config.uri}")
        if config.pace == "live":  # a camera stand-in: the live source's newest-frame policy
            opener = capture_opener(config, kind)
            return LiveSource(config, lambda: PacedCapture(opener(), config.loop, config.fps))
        return VideoFileSource(config, capture_opener(config, kind))
    return LiveSource(config, capture_opener(config, kind))
