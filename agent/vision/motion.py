"""Motion gating: whether a camera's frame needs the detector at all.

Most cameras watch a scene where nothing happens most of the time; running the detector on
every such frame costs the device power and heat and takes the accelerator from cameras where
something does happen. A frame goes to the detector when (1) something moves in it, judged on a
small grey copy against a slowly adapting background (a fraction of a millisecond), (2) the
camera's scene is busy (an object not yet confirmed, one lost for now, or one moving), or (3) the
keep-alive period has passed since the last detection, so an object that arrived without
motion (a light switched on, a motion below the threshold) is found within that period and
objects standing still keep their tracks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from agent.config import MotionConfig


@dataclass(frozen=True)
class MotionSettings:
    width: int = 160  # the grey copy's width; its height keeps the frame's aspect
    threshold: int = 25  # a pixel moved when it differs from the background by this much (0-255)
    min_area: float = 0.002  # a frame moves when this fraction of its pixels moved
    keepalive_s: float = 1.0  # the detector runs at least this often
    adapt: float = 0.05  # how fast the background takes in a change (per frame)


class MotionGate:
    """One camera's gate. Not thread-safe: its camera's preprocess thread only."""

    @classmethod
    def from_config(cls, motion: MotionConfig) -> MotionGate | None:
        """From the config's ``motion`` section; None when gating is off."""
        if not motion.enabled:
            return None
        return cls(MotionSettings(motion.width, motion.threshold, motion.min_area,
                                  motion.keepalive_s, motion.adapt))  # fmt: skip

    def __init__(self, settings: MotionSettings | None = None) -> None:
        self.settings = settings or MotionSettings()
        self._background: np.ndarray | None = None
        self._last_admitted: float | None = None
        self.reasons: Counter[str] = Counter()  # why frames went through; "skipped" for the rest

    def moved(self, image: np.ndarray) -> bool:
        """Does this frame differ from the background? Updates the background either way."""
        s = self.settings
        height, width = image.shape[:2]
        small = cv2.resize(image, (s.width, max(1, round(height * s.width / width))),
                           interpolation=cv2.INTER_AREA)  # fmt: skip
        grey = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), (5, 5), 0)
        if self._background is None or self._background.shape != grey.shape:
            self._background = grey.astype(np.float32)
            return True  # the first frame (or a new resolution): nothing to compare with
        difference = cv2.absdiff(grey, cv2.convertScaleAbs(self._background))
        moving = np.count_nonzero(difference > s.threshold) / difference.size
        cv2.accumulateWeighted(grey, self._background, s.adapt)
        return moving >= s.min_area

    def admit(self, image: np.ndarray, now: float, scene_busy: bool = False) -> bool:
        """Should this frame (captured at ``now``, monotonic seconds) go to the detector?"""
        moved = self.moved(image)
        due = self._last_admitted is None or now - self._last_admitted >= self.settings.keepalive_s
        reason = "motion" if moved else "scene" if scene_busy else "keepalive" if due else None
        self.reasons[reason or "skipped"] += 1
        if reason is not None:
            self._last_admitted = now
        return reason is not None
