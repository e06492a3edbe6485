"""Our resamplable mAP gives pycocotools' figures, and its paired bootstrap interval means what
it says: zero for the same model, clearly below zero for a worse one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.vision import Detection
from models.datasets import Dataset, Sample
from models.metrics import match, paired_difference, scores
from tests.reference import coco_map


def synthetic(seed: int, images: int = 60, classes: int = 4):
    """Ground truth and noisy detections of it: jittered boxes, misses, false alarms, class
    mix-ups, tied scores; some images without objects."""
    rng = np.random.default_rng(seed)
    samples, found = [], []
    for i in range(images):
        boxes = []
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 400, 2)
            boxes.append((int(rng.integers(classes)), (x, y, *rng.uniform(5, 150, 2))))
        samples.append(Sample(Path(f"{i}.jpg"), 640, 480, boxes))
        detections = []
        for cls, (x, y, w, h) in boxes:
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 0.1 * max(w, h), 4)
                x1, y1 = x + jitter[0], y + jitter[1]
                guess = cls if rng.random() < 0.9 else int(rng.integers(classes))
                score = round(float(rng.uniform(0.05, 1)), 2)  # ties happen
                box = (x1, y1, x1 + max(2.0, w + jitter[2]), y1 + max(2.0, h + jitter[3]))
                detections.append(Detection(guess, str(guess), score, box))
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 500, 2)
            cls, score = int(rng.integers(classes + 1)), float(rng.uniform(0, 0.6))
            detections.append(Detection(cls, "x", score, (x, y, x + 40, y + 40)))
        found.append(detections)
    return Dataset("synthetic", samples), found


def as_tuples(dataset: Dataset, found: list[list[Detection]]):
    truths = [s.boxes for s in dataset.samples]
    detections = [
        [(d.class_id, d.score, (d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]))
         for d in image] for image in found
    ]  # fmt: skip
    return truths, detections


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map_equals_pycocotools_on_noisy_detections(seed):
    dataset, found = synthetic(seed)
    ours = scores(match(*as_tuples(dataset, found)))
    theirs = coco_map(dataset, found, {c: c for c in range(5)})
    assert ours.map50_95 == pytest.approx(theirs[0], abs=1e-9)
    assert ours.map50 == pytest.approx(theirs[1], abs=1e-9)


@pytest.mark.parametrize("name", ["coco8", "voc_val"])
def test_map_equals_pycocotools_for_the_real_model_on_real_photos(name, fp32_backend, request):
    from dataclasses import replace

    from models.evaluate import detect

    dataset = request.getfixturevalue(name)
    dataset = replace(dataset, samples=dataset.samples[:48])
    found = detect(fp32_backend, dataset)
    ours = scores(match(*as_tuples(dataset, found)))
    theirs = coco_map(dataset, found, {c: c for c in range(80)})
    assert ours.map50_95 == pytest.approx(theirs[0], abs=1e-9)
    assert ours.map50 == pytest.approx(theirs[1], abs=1e-9)
    assert set(ours.per_class) == {c for s in dataset.samples for c, _ in s.boxes}


def test_the_same_model_differs_by_nothing_and_a_worse_one_by_a_clear_interval():
    dataset, found = synthetic(7, images=200)
    truths, detections = as_tuples(dataset, found)
    reference = match(truths, detections)
    same = paired_difference(reference, match(truths, detections), resamples=200)
    assert same.points == same.low == same.high == 0.0
    rng = np.random.default_rng(0)
    shifted = [[(c, s, (x + rng.normal(0, 6), y + rng.normal(0, 6), w, h))
                for c, s, (x, y, w, h) in image] for image in detections]  # fmt: skip
    worse = paired_difference(reference, match(truths, shifted), resamples=200)
    assert worse.low <= worse.points <= worse.high < 0, worse
    assert "pt (" in worse.describe()


def test_a_bootstrap_interval_narrows_as_the_set_grows():
    widths = []
    for images in (50, 400):
        dataset, found = synthetic(11, images=images)
        truths, detections = as_tuples(dataset, found)
        rng = np.random.default_rng(1)
        noisier = [[(c, s * rng.uniform(0.5, 1.0), b) for c, s, b in image]
                   for image in detections]  # fmt: skip
        interval = paired_difference(match(truths, detections), match(truths, noisier), 200)
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0]


def test_mismatched_image_sets_are_refused():
    dataset, found = synthetic(3, images=10)
    truths, detections = as_tuples(dataset, found)
    with pytest.raises(ValueError, match="10 images of ground truth, 9"):
        match(truths, detections[:9])
