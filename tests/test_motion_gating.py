"""Motion gating on a real indoor clip where people walk through one at a time, with long still
stretches between them: the detector is skipped where nothing moves, and no object is lost."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import pytest

from agent.config import DetectionConfig, PipelineConfig, SourceConfig, load_config
from agent.contract.errors import ConfigError
from agent.vision import (
    ActiveModel,
    MotionGate,
    MotionSettings,
    Pipeline,
    Scene,
    TrackerSettings,
    open_source,
)

CLIP = "one-by-one-person-detection.mp4"  # 10 fps; still for its first 6 s, then a person walks


@pytest.fixture(scope="module")
def clip(shared: Path) -> Path:
    path = shared / "videos" / CLIP
    if not path.is_file():
        pytest.fail(f"this test needs the real clip {path} (see DATA.md)", pytrace=False)
    return path


def first_frames(path: Path, count: int) -> list:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < count:
        ok, image = capture.read()
        assert ok, f"{path} ended before frame {count}"
        frames.append(image)
    return frames


def test_still_frames_are_skipped_but_for_the_keepalive_and_walking_ones_go_through(clip):
    gate = MotionGate()
    admitted = [
        gate.admit(image, index / 10.0) for index, image in enumerate(first_frames(clip, 110))
    ]
    still, walking = admitted[1:58], admitted[62:110]
    assert sum(still) <= 7, gate.reasons  # one per keep-alive second: 5 or 6
    assert sum(walking) >= 0.9 * len(walking), gate.reasons
    assert gate.reasons["keepalive"] >= 4


def run(path: Path, model, gate: MotionGate | None, frames: int) -> tuple[Pipeline, list[dict]]:
    """The pipeline on the clip's first frames, as fast as it goes, tracking on."""
    source = open_source(SourceConfig(uri=str(path), pace="fast"))
    events: list[dict] = []

    class Objects:
        def emit(self, result):
            pass

        def emit_objects(self, batch):
            events.extend(batch)

        def close(self):
            pass

    scene = Scene(CLIP, TrackerSettings(max_lost_s=5.0))  # outlives the keep-alive below
    pipeline = Pipeline(source, ActiveModel(model), [Objects()], DetectionConfig(),
                        PipelineConfig(), max_frames=frames, scene=scene, gate=gate)  # fmt: skip
    pipeline.run()
    source.close()
    return pipeline, events


def test_gating_skips_the_detector_on_still_stretches_and_loses_no_object(clip, fp32_backend):
    """The file runs as fast as this machine goes, so the keep-alive (on the pipeline's clock) is
    4 s: at 1 frame a second or faster it still skips most of the ~120 still frames among the
    first 260. Objects are compared by class and count (a gated track may split, never vanish)."""
    full, full_events = run(clip, fp32_backend, None, 260)
    gated, gated_events = run(clip, fp32_backend, MotionGate(MotionSettings(keepalive_s=4.0)), 260)
    assert gated.stats.frames_in == full.stats.frames_in == 260
    assert gated.stats.skipped > 0.2 * 260, gated.gate.reasons
    assert gated.stats.frames_out + gated.stats.skipped == 260
    found = Counter(e["label"] for e in full_events if e["event"] == "new")
    assert found["person"] >= 1, found
    kept = Counter(e["label"] for e in gated_events if e["event"] == "new")
    assert all(kept[label] >= count for label, count in found.items()), (found, kept)


def test_a_keepalive_longer_than_objects_live_unseen_is_rejected(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "model: {path: m.onnx}\n"
        "tracking: {enabled: true, max_lost_s: 1.0}\n"
        "motion: {enabled: true, keepalive_s: 2.0}\n"
    )
    with pytest.raises(ConfigError, match=r"keepalive_s \(2\) must be below tracking\.max_lost_s"):
        load_config(path, {})
    path.write_text("model: {path: m.onnx}\nmotion: {enabled: true, keepalive_s: 9}\n")
    with pytest.raises(ConfigError, match=r"below the watchdog's stall time \(5 s\)"):
        load_config(path, {})
