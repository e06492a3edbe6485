"""Multi-object tracking for one camera: ByteTrack's two-stage association over a Kalman filter.

Why our own and not a library: the kept permissive trackers each break the device install
(Roboflow's ``trackers`` requires the GUI build ``opencv-python``, which fights our headless OpenCV
and needs libGL; ``supervision`` dropped its ByteTrack and pulls PyAV; norfair pins numpy < 2).
The algorithm is ByteTrack (Zhang et al., ECCV 2022): match confident boxes to tracks first, then
let the weak boxes (0.1 .. high) keep tracks alive through occlusion, so one person half hidden
behind another keeps the same id. Boxes are matched greedily by IoU, best pair first (at a few
dozen objects per camera it finds the same pairs as an optimal assignment, without scipy).

A track gets its id when it is confirmed (``confirm_hits`` matched frames in a row), so ids
count up without gaps a subscriber would wonder about; it ends ``max_lost_s`` after its last
match. Time, not frames: a camera's rate varies and motion gating skips frames.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.vision.postprocess import Detection, box_iou

_STD_POSITION = 1.0 / 20  # Kalman noise, relative to the box height (DeepSORT's weights)
_STD_VELOCITY = 1.0 / 160


@dataclass(frozen=True)
class TrackerSettings:
    """ByteTrack's thresholds (the config's ``tracking`` section has the same defaults): a
    little under ByteTrack's own 0.5 / 0.6, for a small YOLOv8's lower scores."""

    high_score: float = 0.4  # first association
    low_score: float = 0.1  # weaker boxes only extend tracks that already exist
    new_track_score: float = 0.5  # a box that matches nothing starts a track from here
    match_iou: float = 0.2  # confident boxes to tracks (predicted box vs detection)
    low_match_iou: float = 0.5  # weak boxes must overlap more
    confirm_hits: int = 2  # matched frames in a row before a track gets its id
    max_lost_s: float = 1.5  # a track unmatched this long has ended
    class_mismatch: float = 0.5  # IoU factor when a box's class differs from the track's

    def __post_init__(self) -> None:
        if not 0 <= self.low_score <= self.high_score <= self.new_track_score <= 1:
            raise ValueError("tracking needs 0 <= low_score <= high_score <= new_track_score <= 1")


class _Kalman:
    """Constant-velocity filter on (centre x, centre y, aspect, height), one step per frame."""

    _motion = np.eye(8) + np.eye(8, k=4)
    _observe = np.eye(4, 8)

    def __init__(self, box: Sequence[float]) -> None:
        z = _measure(box)
        self.mean = np.concatenate([z, np.zeros(4)])
        h = z[3]
        p, v = 2 * _STD_POSITION * h, 10 * _STD_VELOCITY * h
        std = [p, p, 1e-2, p, v, v, 1e-5, v]
        self.covariance = np.diag(np.square(std))

    def predict(self) -> None:
        h = self.mean[3]
        std = [_STD_POSITION * h, _STD_POSITION * h, 1e-2, _STD_POSITION * h,
               _STD_VELOCITY * h, _STD_VELOCITY * h, 1e-5, _STD_VELOCITY * h]  # fmt: skip
        self.mean = self._motion @ self.mean
        self.covariance = self._motion @ self.covariance @ self._motion.T + np.diag(np.square(std))

    def correct(self, box: Sequence[float]) -> None:
        h = self.mean[3]
        noise = np.diag(np.square([_STD_POSITION * h, _STD_POSITION * h, 1e-1, _STD_POSITION * h]))
        projected = self._observe @ self.covariance @ self._observe.T + noise
        gain = np.linalg.solve(projected, self._observe @ self.covariance).T
        self.mean = self.mean + gain @ (_measure(box) - self._observe @ self.mean)
        self.covariance = self.covariance - gain @ projected @ gain.T

    def box(self) -> tuple[float, float, float, float]:
        cx, cy, aspect, h = self.mean[:4]
        h = max(float(h), 1e-3)
        w = float(aspect) * h
        return (float(cx) - w / 2, float(cy) - h / 2, float(cx) + w / 2, float(cy) + h / 2)


def _measure(box: Sequence[float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    h = max(y2 - y1, 1e-3)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / h, h], dtype=np.float64)


@dataclass(eq=False)
class Track:
    """One object followed across frames; ``track_id`` is None until it is confirmed."""

    detection: Detection  # the box matched last
    first_seen: float
    last_seen: float
    kalman: _Kalman
    track_id: int | None = None
    hits: int = 1  # matched frames in a row
    best: Detection | None = None  # the highest scoring box so far
    class_votes: dict[int, float] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    matched: bool = True  # matched in the latest frame

    def __post_init__(self) -> None:
        self.best = self.detection
        self._vote(self.detection)

    @property
    def confirmed(self) -> bool:
        return self.track_id is not None

    @property
    def class_id(self) -> int:
        """The class its boxes voted for, weighted by score (one flicker does not flip it)."""
        return max(self.class_votes, key=lambda c: self.class_votes[c])

    @property
    def label(self) -> str:
        return self.labels[self.class_id]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.detection.box

    @property
    def moving(self) -> bool:
        """Its filtered speed is over 1 % of its height per frame (a parked car is not)."""
        vx, vy = self.kalman.mean[4:6]
        return bool(np.hypot(vx, vy) > 0.01 * max(self.kalman.mean[3], 1e-3))

    def _vote(self, detection: Detection) -> None:
        self.class_votes[detection.class_id] = (
            self.class_votes.get(detection.class_id, 0.0) + detection.score
        )
        self.labels[detection.class_id] = detection.label

    def update(self, detection: Detection, timestamp: float) -> None:
        self.kalman.correct(detection.box)
        self.detection, self.last_seen = detection, timestamp
        self.hits += 1
        self.matched = True
        self._vote(detection)
        if self.best is None or detection.score > self.best.score:
            self.best = detection


@dataclass
class TrackerStep:
    """What one frame did: the confirmed tracks matched in it (with their boxes), the tracks
    confirmed by it, and the tracks that ended with it."""

    matched: list[Track]
    confirmed: list[Track]
    ended: list[Track]


class Tracker:
    """ByteTrack for one camera. Not thread-safe: one caller (the camera's postprocess)."""

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self.settings = settings or TrackerSettings()
        self._ids = itertools.count(1)
        self.tracks: list[Track] = []  # tentative, confirmed and lost

    def update(self, detections: Sequence[Detection], timestamp: float) -> TrackerStep:
        """Match one frame's boxes (scores down to ``low_score``) to the tracks."""
        s = self.settings
        for track in self.tracks:
            track.kalman.predict()
            track.matched = False
        high = [d for d in detections if d.score >= s.high_score]
        low = [d for d in detections if s.low_score <= d.score < s.high_score]
        established = [t for t in self.tracks if t.confirmed]
        tentative = [t for t in self.tracks if not t.confirmed]

        pairs, established, high = self._associate(established, high, s.match_iou)
        # weak boxes only extend tracks matched in the previous frame (hits > 0), not lost ones
        in_view = [t for t in established if t.hits > 0]
        weak_pairs, _, _ = self._associate(in_view, low, s.low_match_iou)
        new_pairs, unmatched_tentative, high = self._associate(tentative, high, s.match_iou)
        confirmed: list[Track] = []
        for track, detection in pairs + weak_pairs + new_pairs:
            track.update(detection, timestamp)
            if not track.confirmed and track.hits >= s.confirm_hits:
                track.track_id = next(self._ids)
                confirmed.append(track)
        for track in self.tracks:
            if not track.matched:
                track.hits = 0  # lost for now; a tentative one goes
        ended = [t for t in established if timestamp - t.last_seen > s.max_lost_s]
        gone = {id(t) for t in ended} | {id(t) for t in unmatched_tentative}
        self.tracks = [t for t in self.tracks if id(t) not in gone]
        for detection in high:
            if detection.score >= s.new_track_score:
                track = Track(detection, timestamp, timestamp, _Kalman(detection.box))
                if s.confirm_hits <= 1:
                    track.track_id = next(self._ids)
                    confirmed.append(track)
                self.tracks.append(track)
        matched = [t for t in self.tracks if t.confirmed and t.matched]
        return TrackerStep(matched, confirmed, ended)

    def end_all(self) -> list[Track]:
        """The camera stops: every confirmed track ends now."""
        ended = [t for t in self.tracks if t.confirmed]
        self.tracks = []
        return ended

    def _associate(
        self, tracks: list[Track], detections: list[Detection], min_iou: float
    ) -> tuple[list[tuple[Track, Detection]], list[Track], list[Detection]]:
        """Greedy best-IoU-first matching of predicted track boxes to boxes, at ``min_iou`` or
        more; returns the pairs and what is left of each side."""
        if not tracks or not detections:
            return [], tracks, detections
        predicted = [t.kalman.box() for t in tracks]
        candidates = []
        for i, track in enumerate(tracks):
            for j, detection in enumerate(detections):
                iou = box_iou(predicted[i], detection.box)
                if detection.class_id != track.class_id:
                    iou *= self.settings.class_mismatch
                if iou >= min_iou:
                    candidates.append((iou, i, j))
        candidates.sort(reverse=True)
        used_tracks: set[int] = set()
        used_detections: set[int] = set()
        pairs = []
        for _, i, j in candidates:
            if i in used_tracks or j in used_detections:
                continue
            used_tracks.add(i)
            used_detections.add(j)
            pairs.append((tracks[i], detections[j]))
        rest_tracks = [t for i, t in enumerate(tracks) if i not in used_tracks]
        rest = [d for j, d in enumerate(detections) if j not in used_detections]
        return pairs, rest_tracks, rest
