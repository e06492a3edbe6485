"""One camera's scene: its tracker, zones and counting lines, and the object events they make.

A subscriber who wants "a person entered the loading bay" should not have to track boxes from a
flood of per-frame ``detections``: this turns tracks into a few ``objects`` events. ``new`` when a
track is confirmed; ``update`` only on a change that matters (a zone entered or left, a line
crossed, the class the track settled on changed, the best score rose by ``score_step``); ``end``
when the track is lost for good or the camera stops. Zones and lines are in fractions of the
frame (0..1), so a config is checked before any frame arrives and survives a resolution change;
an object's position is its box's bottom centre (where it stands).
"""

from __future__ import annotations

import base64
import dataclasses
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from agent.config import Camera
from agent.vision.postprocess import Detection
from agent.vision.sources import Frame
from agent.vision.tracking import Track, Tracker, TrackerSettings

OBJECT = "edge-agent/object/v1"  # schema id of an ``objects`` message
SNAPSHOT_SIDE = 320  # px: an object's snapshot is at most this on its longer side

Point = tuple[float, float]


@dataclass(frozen=True)
class Zone:
    name: str
    polygon: tuple[Point, ...]  # fractions of width and height, at least three corners

    def contains(self, point: Point) -> bool:
        """Even-odd ray casting: is ``point`` inside the polygon?"""
        x, y = point
        inside = False
        corners = self.polygon
        for (x1, y1), (x2, y2) in zip(corners, corners[1:] + corners[:1], strict=True):
            if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
        return inside


@dataclass(frozen=True)
class Line:
    """A counting line from ``a`` to ``b``. ``in`` counts crossings to the side on the right of
    a -> b as drawn on the image (y down): for a line drawn left to right, moving down the image."""

    name: str
    a: Point
    b: Point

    def side(self, point: Point) -> float:
        (ax, ay), (bx, by), (px, py) = self.a, self.b, point
        return (bx - ax) * (py - ay) - (by - ay) * (px - ax)

    def crossing(self, before: Point, after: Point) -> str | None:
        """``in``, ``out`` or None for a move from ``before`` to ``after``: the move must cut the
        segment itself, not the line's extension."""
        s1, s2 = self.side(before), self.side(after)
        if (s1 > 0) == (s2 > 0) or s1 == s2:
            return None
        mover = Line("", before, after)
        if (mover.side(self.a) > 0) == (mover.side(self.b) > 0):
            return None
        return "in" if s2 > 0 else "out"


@dataclass
class _Followed:
    """What the scene has told subscribers about one track so far."""

    zones: frozenset[str] = frozenset()
    streaks: Counter[str] = field(default_factory=Counter)  # frames a zone's membership disagreed
    position: Point | None = None
    class_id: int | None = None
    best_score: float = 0.0
    crop: np.ndarray | None = None  # the best-scoring box's pixels (snapshots on)
    crop_score: float = -1.0


@dataclass
class SceneStep:
    """One frame: its detections (with track ids where confirmed) and the object events."""

    detections: list[Detection]
    events: list[dict[str, Any]] = field(default_factory=list)


class Scene:
    """Tracker, zones and lines of one camera, fed by its postprocess thread; ``summary()`` may
    be read from another (telemetry)."""

    def __init__(
        self,
        camera: str,
        tracker: TrackerSettings | None = None,
        zones: Sequence[Zone] = (),
        lines: Sequence[Line] = (),
        score_step: float = 0.1,
        zone_frames: int = 3,
        snapshots: bool = False,
    ) -> None:
        """``zone_frames``: frames in a row an object must be in (or out of) a zone before it
        counts as entered (or left), so a box jittering on the border does not flap.
        ``snapshots``: ``new`` and ``end`` carry a JPEG of the object's best-scoring box."""
        self.snapshots = snapshots
        self.camera = camera
        self.tracker = Tracker(tracker)
        self.zones, self.lines = tuple(zones), tuple(lines)
        self._zone_names = frozenset(zone.name for zone in self.zones)
        self.score_step, self.zone_frames = score_step, zone_frames
        self._followed: dict[int, _Followed] = {}
        self.crossings: dict[str, Counter[str]] = {line.name: Counter() for line in self.lines}
        self.events_sent: Counter[str] = Counter(new=0, update=0, end=0)
        self._lock = threading.Lock()
        self._wall_offset = 0.0  # wall clock minus monotonic clock, at the latest frame

    @classmethod
    def from_config(cls, camera: Camera) -> Scene | None:
        """A configured camera's scene; None when tracking is off for it."""
        tracking = camera.tracking
        if not tracking.enabled:
            return None
        settings = TrackerSettings(
            high_score=tracking.high_score,
            low_score=tracking.low_score,
            new_track_score=tracking.new_track_score,
            match_iou=tracking.match_iou,
            low_match_iou=tracking.low_match_iou,
            confirm_hits=tracking.confirm_hits,
            max_lost_s=tracking.max_lost_s,
        )
        zones = [Zone(z.name, tuple(z.polygon)) for z in camera.zones]
        lines = [Line(line.name, *line.points) for line in camera.lines]
        return cls(camera.name, settings, zones, lines, tracking.score_step,
                   tracking.zone_frames, tracking.snapshots)  # fmt: skip

    def observe(self, frame: Frame, detections: Sequence[Detection], min_score: float) -> SceneStep:
        """Track one frame's boxes (down to the tracker's low score); the detections returned
        are those scoring ``min_score`` or more, with their track ids.

        The tracker keeps time on the monotonic clock (a device's wall clock may jump when NTP
        first syncs); events report wall-clock times."""
        with self._lock:
            return self._observe(frame, detections, min_score)

    def _observe(
        self, frame: Frame, detections: Sequence[Detection], min_score: float
    ) -> SceneStep:
        self._wall_offset = frame.timestamp - frame.captured
        height, width = frame.image.shape[:2]
        size = (width, height)
        step = self.tracker.update(detections, frame.captured)
        ids = {id(t.detection): t.track_id for t in step.matched}
        shown = [
            dataclasses.replace(d, track_id=ids.get(id(d)))
            for d in detections
            if d.score >= min_score
        ]
        events = []
        for track in step.confirmed:
            state = self._followed[track.track_id] = _Followed()
            self._keep_crop(track, state, frame)
            self._place(track, state, size, [])
            state.class_id, state.best_score = track.class_id, track.best.score
            events.append(self._event("new", track, state, []))
        confirmed_now = {id(t) for t in step.confirmed}
        for track in step.matched:
            if id(track) in confirmed_now:
                continue
            state = self._followed[track.track_id]
            self._keep_crop(track, state, frame)
            changes: list[str] = []
            self._place(track, state, size, changes)
            if track.class_id != state.class_id:
                state.class_id = track.class_id
                changes.append("class")
            if track.best.score >= state.best_score + self.score_step:
                state.best_score = track.best.score
                changes.append("score")
            if changes:
                events.append(self._event("update", track, state, changes))
        events += [self._end(track) for track in step.ended]
        return SceneStep(shown, events)

    def close(self) -> list[dict[str, Any]]:
        """The camera stops: every object still followed ends."""
        with self._lock:
            return [self._end(track) for track in self.tracker.end_all()]

    def busy(self) -> bool:
        """Does the detector need every frame now? While an object awaits confirmation, is
        lost for now (it may come back) or moves; not for objects standing still."""
        with self._lock:
            return any(not t.confirmed or t.hits == 0 or t.moving for t in self.tracker.tracks)

    def summary(self) -> dict[str, Any]:
        """For telemetry: objects followed now, events sent, zone occupancy, line counts."""
        with self._lock:
            return {
                "camera": self.camera,
                "objects": sum(1 for t in self.tracker.tracks if t.confirmed),
                "events": dict(self.events_sent),
                "occupancy": self.occupancy(),
                "lines": self.counts(),
            }

    def occupancy(self) -> dict[str, dict[str, int]]:
        """Per zone, how many followed objects of each class stand in it now."""
        counts: dict[str, Counter[str]] = {zone.name: Counter() for zone in self.zones}
        for track in self.tracker.tracks:
            state = self._followed.get(track.track_id) if track.confirmed else None
            for name in state.zones if state else ():
                counts[name][track.label] += 1
        return {name: dict(counter) for name, counter in counts.items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per line, crossings ``in`` and ``out`` since start."""
        return {name: {"in": c["in"], "out": c["out"]} for name, c in self.crossings.items()}

    def _place(self, track: Track, state: _Followed, size: tuple[int, int],
               changes: list[str]) -> None:  # fmt: skip
        width, height = size
        x1, _, x2, y2 = track.box
        position = ((x1 + x2) / 2 / width, y2 / height)
        inside = {z.name for z in self.zones if z.contains(position)}
        first = state.position is None  # a new object is where it is first seen, no waiting
        for name in inside ^ state.zones:
            state.streaks[name] += 1
        for name in self._zone_names - (inside ^ state.zones):
            state.streaks.pop(name, None)
        flipped = {n for n, run in state.streaks.items() if first or run >= self.zone_frames}
        for name in flipped:
            del state.streaks[name]
        zones = state.zones ^ frozenset(flipped)
        entered, left = sorted(zones - state.zones), sorted(state.zones - zones)
        changes += [f"entered:{name}" for name in entered] + [f"left:{name}" for name in left]
        if state.position is not None:
            for line in self.lines:
                direction = line.crossing(state.position, position)
                if direction:
                    self.crossings[line.name][direction] += 1
                    changes.append(f"crossed:{line.name}:{direction}")
        state.zones, state.position = zones, position

    def _keep_crop(self, track: Track, state: _Followed, frame: Frame) -> None:
        """Snapshots on: keep the pixels of the object's best box seen so far (at most
        ``SNAPSHOT_SIDE`` px on its longer side)."""
        if not self.snapshots or track.detection.score <= state.crop_score:
            return
        height, width = frame.image.shape[:2]
        x1, y1, x2, y2 = (round(v) for v in track.detection.box)
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        if x2 <= x1 or y2 <= y1:
            return
        crop = frame.image[y1:y2, x1:x2]
        scale = SNAPSHOT_SIDE / max(crop.shape[:2])
        if scale < 1:
            size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        state.crop, state.crop_score = crop.copy(), track.detection.score

    def _end(self, track: Track) -> dict[str, Any]:
        state = self._followed.pop(track.track_id, None) or _Followed()
        return self._event("end", track, state, [])

    def _event(self, kind: str, track: Track, state: _Followed,
               changes: list[str]) -> dict[str, Any]:  # fmt: skip
        self.events_sent[kind] += 1
        best = track.best or track.detection
        snapshot = {}
        if kind != "update" and state.crop is not None:
            ok, jpeg = cv2.imencode(".jpg", state.crop, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if ok:
                snapshot["snapshot_jpeg"] = base64.b64encode(jpeg.tobytes()).decode("ascii")
        return {
            "schema": OBJECT,
            "event": kind,
            "camera": self.camera,
            "track_id": track.track_id,
            "label": track.label,
            "class_id": track.class_id,
            "first_seen": round(track.first_seen + self._wall_offset, 6),
            "last_seen": round(track.last_seen + self._wall_offset, 6),
            "score": round(track.detection.score, 4),
            "box": [round(v, 1) for v in track.box],
            "best_score": round(best.score, 4),
            "best_box": [round(v, 1) for v in best.box],
            "zones": sorted(state.zones),
            "changes": changes,
            **snapshot,
        }
