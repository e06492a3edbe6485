import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.vision.postprocess import DetectionParams, decode, resolve_classes
from agent.vision.preprocess import Letterbox
from tests.reference import brute_force_nms

NAMES = {i: f"class{i}" for i in range(5)}
IDENTITY = Letterbox.fit(640, 640, 640, 640)


def head_output(boxes_xyxy, scores, classes, nc=5):
    """A YOLOv8 head tensor [1, 4+nc, N] holding exactly these candidates."""
    n = len(scores)
    out = np.zeros((1, 4 + nc, n), np.float32)
    out[0, 0] = (boxes_xyxy[:, 0] + boxes_xyxy[:, 2]) / 2
    out[0, 1] = (boxes_xyxy[:, 1] + boxes_xyxy[:, 3]) / 2
    out[0, 2] = boxes_xyxy[:, 2] - boxes_xyxy[:, 0]
    out[0, 3] = boxes_xyxy[:, 3] - boxes_xyxy[:, 1]
    out[0, 4 + classes, np.arange(n)] = scores
    return out


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 120),
    iou_thr=st.floats(0.1, 0.9),
    conf=st.floats(0.05, 0.9),
    max_det=st.integers(1, 50),
)
def test_nms_agrees_with_brute_force_reference(seed, n, iou_thr, conf, max_det):
    rng = np.random.default_rng(seed)
    # clustered boxes so that plenty overlap
    centres = rng.uniform(50, 590, size=(max(1, n // 8), 2))
    pick = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 15, size=(n, 2))
    sizes = rng.uniform(10, 120, size=(n, 2))
    boxes = (
        np.concatenate([pick - sizes / 2, pick + sizes / 2], axis=1)
        .astype(np.float32)
        .astype(np.float64)
    )
    scores = rng.permutation(np.linspace(0.01, 0.99, n)).astype(np.float32)
    classes = rng.integers(0, 3, n)
    out = head_output(boxes, scores, classes)
    got = decode(out, IDENTITY, DetectionParams(conf, iou_thr, max_det), NAMES)
    # the float32 head tensor is what both sides see
    stored = np.stack(
        [
            out[0, 0] - out[0, 2] / 2,
            out[0, 1] - out[0, 3] / 2,
            out[0, 0] + out[0, 2] / 2,
            out[0, 1] + out[0, 3] / 2,
        ],
        axis=1,
    ).astype(np.float64)
    expected = brute_force_nms(
        stored, scores.astype(np.float64), classes, np.float32(conf), iou_thr, max_det
    )
    assert [round(d.score, 6) for d in got] == [round(float(scores[i]), 6) for i in expected]
    assert [d.class_id for d in got] == [int(classes[i]) for i in expected]


def test_boxes_are_mapped_back_to_source_pixels():
    box = Letterbox.fit(1280, 720, 640, 640)  # scale 0.5, 140 px of padding above
    out = head_output(
        np.array([[100.0, 190.0, 300.0, 290.0]]), np.array([0.9], np.float32), np.array([1])
    )
    (det,) = decode(out, box, DetectionParams(), NAMES)
    assert det.label == "class1"
    np.testing.assert_allclose(det.box, (200.0, 100.0, 600.0, 300.0), atol=1e-4)


def test_class_allow_list_keeps_only_those_classes():
    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210]], float)
    out = head_output(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 2]))
    params = DetectionParams(class_ids=resolve_classes(["class2", 1], NAMES))
    assert [d.class_id for d in decode(out, IDENTITY, params, NAMES)] == [1, 2]


def test_empty_and_below_threshold_outputs_give_no_detections():
    out = head_output(np.array([[0, 0, 10, 10]], float), np.array([0.2], np.float32), np.array([0]))
    assert decode(out, IDENTITY, DetectionParams(confidence=0.25), NAMES) == []


def test_unknown_classes_in_allow_list_are_named():
    with pytest.raises(ValueError, match="unknown classes 'zebra', 9"):
        resolve_classes(["zebra", 9, "class0"], NAMES)
