import threading
import time
from itertools import islice

import cv2
import numpy as np
import pytest

from agent.config import SourceConfig
from agent.contract.errors import SourceError
from agent.vision.sources import LiveSource, backoff_delays, detect_kind, open_source
from tests.conftest import write_video


def frames_of(source, limit=1000):
    out = []
    while len(out) < limit and (frame := source.read(timeout=5)) is not None:
        out.append(frame)
    return out


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("0", "v4l2"),
        ("/dev/video2", "v4l2"),
        ("rtsp://cam/stream", "stream"),
        ("http://cam/mjpg", "stream"),
        ("nvarguscamerasrc ! video/x-raw ! appsink", "gstreamer"),
    ],
)
def test_source_kind_is_detected_from_the_uri(uri, kind):
    assert detect_kind(uri) == kind


def test_files_and_folders_are_detected(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    assert detect_kind(str(tmp_path)) == "folder"
    assert detect_kind(str(tmp_path / "v.mp4")) == "file"


def test_a_source_that_names_nothing_is_refused():
    with pytest.raises(SourceError, match="not found: not a file, folder"):
        open_source(SourceConfig(uri="/no/such/thing.mp4"))


def test_image_folder_reads_in_order_and_skips_unreadable_files(tmp_path, shared):
    for name in ("a.jpg", "c.jpg"):
        (tmp_path / name).write_bytes((shared / "images" / "bus.jpg").read_bytes())
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_source(SourceConfig(uri=str(tmp_path), pace="fast"))
    frames = frames_of(source)
    assert [f.frame_id for f in frames] == [0, 1]
    assert frames[0].image.shape == (1080, 810, 3)
    assert source.stats.read_errors == 1 and "b.jpg" in source.stats.last_error


def test_empty_image_folder_is_refused(tmp_path):
    with pytest.raises(SourceError, match="holds no images"):
        open_source(SourceConfig(uri=str(tmp_path)))


def test_video_file_gives_every_frame_then_ends(bus_video):
    source = open_source(SourceConfig(uri=str(bus_video), pace="fast"))
    frames = frames_of(source)
    assert len(frames) == 24
    assert [f.frame_id for f in frames] == list(range(24))
    assert source.live is False and source.nominal_fps == pytest.approx(25)


def test_looping_video_starts_again(bus_video):
    source = open_source(SourceConfig(uri=str(bus_video), pace="fast", loop=True))
    assert len(frames_of(source, limit=60)) == 60


def test_realtime_pacing_holds_to_the_frame_rate(tmp_path):
    video = write_video(tmp_path / "fast.mp4", [np.zeros((32, 32, 3), np.uint8)] * 10, fps=50)
    source = open_source(SourceConfig(uri=str(video), pace="realtime"))
    started = time.monotonic()
    assert len(frames_of(source)) == 10
    assert time.monotonic() - started >= 9 / 50 * 0.95  # never faster than real time


def test_corrupt_video_file_is_refused(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 2048)
    with pytest.raises(SourceError, match="cannot open video file"):
        open_source(SourceConfig(uri=str(bad)))


def test_backoff_doubles_up_to_the_cap():
    delays = list(islice(backoff_delays(0.5, 4.0, jitter=0.0), 6))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_jitter_stays_within_bounds():
    for delay in islice(backoff_delays(1.0, 1.0, jitter=0.1), 200):
        assert 0.9 <= delay <= 1.1


class ScriptedCapture:
    """Stands in for cv2.VideoCapture: gives ``frames`` frames, then fails, or blocks (stalls)."""

    def __init__(self, frames: int, opened: bool = True, then: str = "fail", interval: float = 0.0):
        self.frames, self.opened, self.then, self.interval = frames, opened, then, interval
        self.released = threading.Event()

    def isOpened(self):
        return self.opened

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if self.frames > 0:
            self.frames -= 1
            time.sleep(self.interval)
            return True, np.zeros((8, 8, 3), np.uint8)
        if self.then == "stall":
            self.released.wait(30)
        return False, None

    def release(self):
        self.released.set()


def live(script, **config):
    captures = iter(script)
    settings = {
        "uri": "rtsp://camera/stream",
        "reconnect_initial_s": 0.01,
        "reconnect_max_s": 0.05,
        "stall_timeout_s": 1.0,
        **config,
    }
    return LiveSource(SourceConfig(**settings), lambda: next(captures))


def test_live_source_reconnects_after_the_stream_drops():
    source = live(
        [
            ScriptedCapture(3),
            ScriptedCapture(0, opened=False),
            ScriptedCapture(1000, interval=0.005),
        ]
    )
    try:
        ids = [source.read(timeout=5).frame_id for _ in range(8)]
        assert ids == sorted(ids) and len(set(ids)) == 8
        assert source.stats.reconnects >= 2
        assert source.stats.connects == 2
    finally:
        source.close()


def test_live_source_keeps_only_the_newest_frame():
    source = live([ScriptedCapture(1000, interval=0.001)] + [ScriptedCapture(0, opened=False)] * 50)
    try:
        first = source.read(timeout=5)
        time.sleep(0.2)  # the reader runs on; nobody takes frames
        second = source.read(timeout=5)
        assert second.frame_id > first.frame_id + 10
        assert source.stats.dropped >= second.frame_id - first.frame_id - 2
    finally:
        source.close()


def test_a_silent_stream_is_declared_stalled_and_replaced():
    stalled = ScriptedCapture(2, then="stall")
    source = live([stalled, ScriptedCapture(1000, interval=0.005)], stall_timeout_s=0.3)
    try:
        ids = [source.read(timeout=5).frame_id for _ in range(5)]
        assert ids == sorted(ids)
        assert source.stats.stalls == 1
        assert "no frame for 0.3 s" in source.stats.last_error
    finally:
        source.close()
        stalled.released.set()


def test_a_source_that_never_opens_gives_up_after_max_reconnects():
    source = live([ScriptedCapture(0, opened=False)] * 10, max_reconnects=2)
    with pytest.raises(SourceError, match=r"failed 3 time\(s\) in a row, giving up: cannot open"):
        while True:
            source.read(timeout=5)
    source.close()
