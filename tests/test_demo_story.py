"""The demo's story end to end on a short clip: real mosquitto, real channel, real swap."""

from __future__ import annotations

import json

import cv2

from agent_demo.story import DEVICE, PREFIX, VERSION, Recorder, StoryOptions, phase_figures, run
from tests.brokers import Subscriber


def test_the_demo_story_ships_int8_live_and_its_figures_are_what_a_subscriber_received(
    tmp_path, monkeypatch, broker, shared, u8s8_model
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    watcher = Subscriber(broker.port, [f"{PREFIX}/{DEVICE}/#"]).start()
    said: list[str] = []
    options = StoryOptions(
        shared=shared,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        int8=u8s8_model,
        broker=("127.0.0.1", broker.port),
        before_s=5,
        after_s=5,
        frames_per_image=6,
        measure_map=False,
        say=said.append,
    )
    try:
        assert run(options) == 0, "\n".join(said)
    finally:
        watcher.stop()
    summary = json.loads((tmp_path / "out" / "demo-summary.json").read_text())
    assert summary["outcome"]["result"] == "committed" and summary["outcome"]["version"] == VERSION
    before, after, swap = summary["before"], summary["after"], summary["swap"]
    assert before["precision"] == "fp32" and after["precision"] == "int8"
    assert before["detection_messages"] > 0 and after["detection_messages"] > 0

    # went live without a dropped frame: every frame id missing between the last float frame and
    # the first INT8 frame is one the newest-frame policy skipped (counted in telemetry)
    assert swap["frames_between"] <= swap["skipped_by_policy_around_swap"], swap
    assert swap["duplicate_frames"] == 0

    # the same figures from a separate subscriber's messages over the same windows
    mine = Recorder()
    for message in watcher.messages:
        mine.take(message.topic, message.payload, message.at)
    for phase in (before, after):
        again = phase_figures(mine, phase["version"], *phase["window"])
        for key in (
            "telemetry_messages",
            "detection_messages",
            "fps_out",
            "inference_ms_p50",
            "inference_ms_p95",
            "capture_to_mqtt_ms_p50",
            "capture_to_mqtt_ms_p95",
        ):
            assert again[key] == phase[key], (key, again, phase)

    video = cv2.VideoCapture(summary["video"])
    frames = 0
    while frames < 20 and video.read()[0]:
        frames += 1
    video.release()
    assert frames == 20, f"the annotated video {summary['video']} does not decode"
