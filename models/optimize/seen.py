"""Which classes the recovery frames show: what distillation can teach a pruned student.

A user's frames carry only the classes their cameras see. Distillation copies the teacher's
answers on those frames, so a class that never appears in them is not recovered, and a student
judged on it is judged on what it was never shown. The float teacher says what the frames hold
(no labels needed): per class, in how many frames of an even sample it scores at least
``threshold`` somewhere. The record keeps the counts; ``models.evaluate`` warns when a student is
evaluated on classes its frames lack (``unseen_classes`` there: no torch on that side).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agent.vision import parse_names
from models.optimize.torch_model import Detector, head_maps

SAMPLE = 128
THRESHOLD = 0.5


def classes_seen(
    teacher: Detector, frames: Any, sample: int = SAMPLE, threshold: float = THRESHOLD
) -> dict[str, Any]:
    """``{"sampled": n, "threshold": t, "frames_with": {class name: frames}}`` over ``sample``
    frames spread evenly over ``frames`` (a FrameSet or ``[N, 3, H, W]`` array)."""
    names = parse_names(teacher.metadata.get("names")) or {}
    picks = sorted({int(i) for i in np.linspace(0, len(frames) - 1, min(sample, len(frames)))})
    counts = torch.zeros(len(names) or 1, dtype=torch.long)
    teacher.module.eval()
    with torch.no_grad():
        for start in range(0, len(picks), 8):
            batch = torch.from_numpy(np.asarray(frames[picks[start : start + 8]]))
            maps = head_maps(teacher.module(batch))
            best = torch.stack([torch.sigmoid(maps[i]).amax(dim=(2, 3)) for i in (1, 3, 5)])
            present = best.amax(dim=0) >= threshold  # [N, classes]
            counts = counts + present.sum(dim=0)[: len(counts)]
    return {
        "sampled": len(picks),
        "threshold": threshold,
        "frames_with": {names[i]: int(counts[i]) for i in sorted(names)},
    }
