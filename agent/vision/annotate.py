"""Draw a frame's detections on a copy of its image (snapshots, annotated clips)."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import cv2

from agent.contract.errors import ConfigError
from agent.vision.result import FrameResult

log = logging.getLogger(__name__)


def annotate(result: FrameResult) -> Any:
    """A BGR copy of the frame with each detection's box, label and score.

    Lines and text scale with the image, so they stay legible on a 1080p frame scaled down.
    """
    image = result.frame.image.copy()
    scale = max(1.0, image.shape[1] / 800)
    thickness = max(2, round(2 * scale))
    for d in result.detections:
        x1, y1, x2, y2 = (round(v) for v in d.box)
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 200, 255), thickness)
        cv2.putText(
            image,
            f"{d.label} {d.score:.2f}",
            (x1, max(round(14 * scale), y1 - thickness * 2)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5 * scale,
            (0, 200, 255),
            max(1, thickness // 2),
            cv2.LINE_AA,
        )
    return image


class VideoSink:
    """Every emitted frame, detections drawn, into an MP4 a person can open.

    Drawing, scaling and encoding run on the sink's own thread behind a small queue, so the
    loop never waits on the encoder; when the encoder falls behind, the video skips frames
    (counted in ``skipped``) and the detections elsewhere do not.
    """

    def __init__(self, path: Path, width: int = 960, fps: float = 10.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.width, self.fps = path, width, fps
        self.written = self.skipped = 0
        self._writer: cv2.VideoWriter | None = None
        self._queue: queue.Queue[FrameResult | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="video-sink", daemon=True)
        self._thread.start()

    def emit(self, result: FrameResult) -> None:
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self.skipped += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10.0)
        if self._writer is not None:
            self._writer.release()
        log.info("video %s: %d frames written, %d skipped", self.path, self.written, self.skipped)

    def _open(self, size: tuple[int, int]) -> cv2.VideoWriter:
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, size)
        if not writer.isOpened():
            raise ConfigError(f"sinks.video: OpenCV cannot write an MP4 to {self.path}")
        return writer

    def _run(self) -> None:
        while (result := self._queue.get()) is not None:
            image = annotate(result)
            height = round(image.shape[0] * self.width / image.shape[1]) // 2 * 2
            image = cv2.resize(image, (self.width, height), interpolation=cv2.INTER_AREA)
            try:
                if self._writer is None:
                    self._writer = self._open((self.width, height))
                self._writer.write(image)
                self.written += 1
            except (ConfigError, cv2.error) as exc:
                log.error("%s; the video sink stops", exc)
                return
