"""Many cameras, one model: the fair queue, a stalled camera among live ones, a model swap while
several run, per-camera topics and commands over a real broker, and bad camera configs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import pytest

from agent.config import DetectionConfig, PipelineConfig, SourceConfig, load_config
from agent.contract.errors import ConfigError
from agent.vision import ActiveModel, CameraFeed, FairQueue, Frame, Pipeline, open_source
from agent.vision.sources import LiveSource, PacedCapture
from tests.brokers import Subscriber
from tests.conftest import AgentProcess, agent_config, run_cli, wait_until
from tests.schemas import validate

CLIPS = {
    "carpark": "person-bicycle-car-detection.mp4",
    "room": "one-by-one-person-detection.mp4",
    "table": "bottle-detection.mp4",
}


def frame(camera: str, index: int) -> Frame:
    return Frame(None, index, 0.0, 0.0, camera)  # type: ignore[arg-type]


# -- the fair queue --------------------------------------------------------------------------


def test_the_fair_queue_serves_cameras_in_turn_whatever_their_backlog():
    lanes = FairQueue({"a": 4, "b": 4, "c": 4}, threading.Event())
    for index in range(4):
        lanes.put("a", frame("a", index))
    lanes.put("b", frame("b", 0))
    lanes.put("c", frame("c", 0))
    served = [lanes.get()[0] for _ in range(6)]
    assert served == ["a", "b", "c", "a", "a", "a"]


def test_a_live_lane_keeps_only_the_newest_frame_and_says_what_it_dropped():
    lanes = FairQueue({"a": 1, "b": 1}, threading.Event())
    assert lanes.put_latest("a", frame("a", 0)) is None
    dropped = lanes.put_latest("a", frame("a", 1))
    assert dropped is not None and dropped.frame_id == 0
    assert lanes.get()[1].frame_id == 1


def test_the_fair_queue_ends_only_when_every_camera_has_ended_and_drained():
    lanes = FairQueue({"a": 2, "b": 2}, threading.Event())
    lanes.put("a", frame("a", 0))
    lanes.end("a")
    assert lanes.get()[0] == "a"
    threading.Timer(0.2, lambda: (lanes.put("b", frame("b", 0)), lanes.end("b"))).start()
    assert lanes.get()[0] == "b"  # waits for the camera still running
    assert lanes.get() is None


def test_a_full_file_lane_makes_only_its_own_reader_wait():
    lanes = FairQueue({"a": 1, "b": 1}, threading.Event())
    lanes.put("a", frame("a", 0))
    blocked = threading.Thread(target=lambda: lanes.put("a", frame("a", 1)), daemon=True)
    blocked.start()
    lanes.put("b", frame("b", 0))  # the other camera is not held up
    assert blocked.is_alive()
    assert lanes.get()[0] == "a"
    blocked.join(timeout=5)
    assert not blocked.is_alive()


# -- the loop with several cameras -----------------------------------------------------------


class StallingCapture:
    """A real clip played as a camera that hangs (as an RTSP stream does) after ``after``
    frames, until ``release`` is set."""

    def __init__(self, clip: Path, after: int, release: threading.Event) -> None:
        self._inner = PacedCapture(cv2.VideoCapture(str(clip)), True, None)
        self._left, self._release = after, release
        self.hung = threading.Event()

    def isOpened(self) -> bool:
        return self._inner.isOpened()

    def get(self, prop: int) -> float:
        return self._inner.get(prop)

    def read(self):
        if self._left <= 0 and not self._release.is_set():
            self.hung.set()
            self._release.wait()
        self._left -= 1
        return self._inner.read()

    def release(self) -> None:
        self._release.set()
        self._inner.release()


class Results:
    def __init__(self):
        self.by_camera: dict[str, list] = {}

    def emit(self, result):
        self.by_camera.setdefault(result.camera, []).append(result)

    def close(self):
        pass


def test_a_stalled_camera_does_not_hold_up_the_others_and_comes_back(shared, fp32_backend):
    videos = shared / "videos"
    release = threading.Event()
    captures: list[StallingCapture] = []

    def stalling():
        captures.append(StallingCapture(videos / CLIPS["carpark"], 10, release))
        return captures[-1]

    # the hang lasts until the test ends it (its own stall timeout would reconnect sooner)
    settings = SourceConfig(uri=str(videos / CLIPS["carpark"]), pace="live", loop=True,
                            stall_timeout_s=600)  # fmt: skip
    cameras = [CameraFeed("stalls", LiveSource(settings, stalling), DetectionConfig())]
    for name in ("room", "table"):
        source = open_source(SourceConfig(uri=str(videos / CLIPS[name]), pace="live", loop=True))
        cameras.append(CameraFeed(name, source, DetectionConfig()))
    pipeline = Pipeline(None, ActiveModel(fp32_backend), [Results()], DetectionConfig(),
                        PipelineConfig(), emit_empty=True, cameras=cameras)  # fmt: skip
    out = {c.name: c.stats for c in cameras}
    pipeline.start()
    try:
        wait_until(lambda: captures and captures[0].hung.is_set(), 60, "the camera to hang")
        read = cameras[0].source.stats  # its last frame may still wait in the source's slot
        wait_until(lambda: out["stalls"].frames_in + read.dropped == read.frames, 60,
                   "the frames read before the hang to be taken")  # fmt: skip
        taken_before_hang = out["stalls"].frames_in
        others = {n: out[n].frames_out for n in ("room", "table")}
        wait_until(lambda: all(out[n].frames_out >= others[n] + 10 for n in others), 120,
                   "the other cameras to go on while one hangs")  # fmt: skip
        assert out["stalls"].frames_in == taken_before_hang  # it was really hung throughout
        assert out["stalls"].frames_out <= taken_before_hang
        release.set()  # the stream answers again
        wait_until(lambda: out["stalls"].frames_out >= taken_before_hang + 5, 120,
                   "the camera to come back")  # fmt: skip
    finally:
        release.set()
        pipeline.stop()
        assert pipeline.wait(timeout=30)
        for camera in cameras:
            camera.source.close()
    assert pipeline.crashed is None


def test_a_model_swap_while_three_cameras_run_loses_no_frame(shared, fp32_backend,
                                                             dynamic_backend):  # fmt: skip
    videos = shared / "videos"
    sources = {n: SourceConfig(uri=str(videos / clip), pace="fast") for n, clip in CLIPS.items()}
    cameras = [CameraFeed(name, open_source(c), DetectionConfig()) for name, c in sources.items()]
    model = ActiveModel(fp32_backend)
    results = Results()
    swapped = threading.Event()

    class SwapAfterTen(Results):
        count = 0

        def emit(self, result):
            self.count += 1
            if self.count == 10:
                model.swap(dynamic_backend)
                swapped.set()

    pipeline = Pipeline(None, model, [results, SwapAfterTen()], DetectionConfig(),
                        PipelineConfig(), emit_empty=True, max_frames=90,
                        cameras=cameras)  # fmt: skip
    pipeline.run()
    for camera in cameras:
        camera.source.close()
    assert swapped.is_set() and pipeline.crashed is None
    for camera in cameras:
        got = results.by_camera[camera.name]
        assert camera.stats.frames_in == camera.stats.frames_out == len(got), camera.name
        ids = [r.frame.frame_id for r in got]
        assert ids == list(range(len(got))), camera.name  # in order, none missing
    counts = [len(results.by_camera[name]) for name in CLIPS]
    assert sum(counts) == 90 and max(counts) - min(counts) <= 4  # served in turn (lanes of 2)
    names = {r.model.model_name for got in results.by_camera.values() for r in got}
    assert len(names) == 2  # both models ran, the swap fell between two frames


# -- the agent: config, topics, commands -----------------------------------------------------


def test_bad_camera_configs_are_rejected_naming_every_bad_field(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "model: {path: m.onnx}\n"
        "tracking: {enabled: true}\n"
        "cameras:\n"
        "  - {name: front, uri: a.mp4, zones: [{name: bay, polygon: [[0, 0], [1.5, 0], [1, 1]]}]}\n"
        "  - {name: front, uri: b.mp4}\n"
        "  - {name: status, uri: c.mp4, detection: {confidence: 2}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    message = str(err.value)
    assert "cameras.0.zones.0.polygon" in message and "[[1.5, 0.0]]" in message
    assert "cameras.2.detection.confidence" in message
    assert "repeated: front" in message and "['status'] would shadow" in message


def test_source_and_cameras_together_are_refused(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "model: {path: m.onnx}\nsource: {uri: x.mp4}\ncameras: [{name: a, uri: y.mp4}]\n"
    )
    with pytest.raises(ConfigError, match=r"either source \(one camera\) or cameras"):
        load_config(path, {})


def test_unknown_classes_of_every_camera_are_named_at_start(tmp_path, fp32_model, shared):
    clip = str(shared / "videos" / CLIPS["table"])
    config = agent_config(
        tmp_path, fp32_model, None,
        cameras=[{"name": "a", "uri": clip, "detection": {"classes": ["person", "unicorn"]}},
                 {"name": "b", "uri": clip, "detection": {"classes": ["dragon"]}}],
    )  # fmt: skip
    text = config.read_text().replace("source: null\n", "")
    config.write_text(text)
    result = run_cli("run", "--config", str(config))
    assert result.returncode != 0
    assert "cameras.0.detection.classes" in result.stderr and "unicorn" in result.stderr
    assert "cameras.1.detection.classes" in result.stderr and "dragon" in result.stderr


def test_two_cameras_publish_under_their_own_topics(tmp_path, broker, fp32_model, shared):
    videos = shared / "videos"
    sub = Subscriber(broker.port, ["edge/#"]).start()
    config = agent_config(
        tmp_path, fp32_model, None, {"port": broker.port},
        tracking={"enabled": True},
        pipeline={"summary_interval_s": 1.0, "inference_workers": 2},
        cameras=[{"name": "carpark", "uri": str(videos / CLIPS["carpark"]), "pace": "live",
                  "loop": True},
                 {"name": "table", "uri": str(videos / CLIPS["table"]), "pace": "live",
                  "loop": True, "detection": {"classes": ["bottle"]}}],
    )  # fmt: skip
    config.write_text(config.read_text().replace("source: null\n", ""))
    agent = AgentProcess(config)
    try:
        for name in ("carpark", "table"):
            sub.wait_topic(f"edge/dev1/{name}/detections", timeout=120)
            sub.wait_topic(f"edge/dev1/{name}/objects", timeout=120)
        telemetry = sub.wait_topic(
            "edge/dev1/telemetry", where=lambda m: len(m.json()["cameras"]) == 2
        ).json()
        assert set(telemetry["cameras"]) == {"carpark", "table"}
        assert telemetry["inference_workers"] == 2
        sub.publish("edge/dev1/cmd/snapshot", json.dumps({"camera": "table"}))
        snapshot = sub.wait_topic("edge/dev1/cmd/snapshot/result").json()
        assert snapshot["ok"] and snapshot["result"]["camera"] == "table"
        assert snapshot["result"]["width"] == 640  # the bottle clip's frames
        sub.publish("edge/dev1/cmd/snapshot", json.dumps({"id": "x", "camera": "garage"}))
        refused = sub.wait_topic(
            "edge/dev1/cmd/snapshot/result", where=lambda m: m.json().get("id") == "x"
        ).json()
        assert not refused["ok"] and "garage" in refused["error"] and "carpark" in refused["error"]
        sub.publish("edge/dev1/carpark/cmd/snapshot", json.dumps({"id": "c", "max_width": 64}))
        own = sub.wait_topic("edge/dev1/carpark/cmd/snapshot/result").json()
        assert own["ok"] and own["result"]["camera"] == "carpark" and own["id"] == "c"
        sub.publish("edge/dev1/carpark/cmd/ping", "{}")
        device_wide = sub.wait_topic("edge/dev1/carpark/cmd/ping/result").json()
        assert not device_wide["ok"] and "publish it on cmd/ping" in device_wide["error"]
        sub.publish("edge/dev1/cmd/config/thresholds", json.dumps({"camera": "table",
                                                                  "confidence": 0.7}))  # fmt: skip
        changed = sub.wait_topic("edge/dev1/cmd/config/thresholds/result").json()
        assert changed["ok"] and changed["result"]["confidence"] == 0.7
    finally:
        assert agent.stop() == 0, agent.log()
    sub.stop()
    table = [m.json() for m in sub.messages if m.topic == "edge/dev1/table/detections"]
    assert table and all(d["label"] == "bottle" for m in table for d in m["detections"])
    assert not [m for m in sub.messages if m.topic == "edge/dev1/detections"]
    for message in sub.messages:
        if message.topic.startswith("edge/dev1") and "/cmd/" not in message.topic:
            validate(message.topic, message.json())
