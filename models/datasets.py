"""Labelled datasets for evaluation: YOLO format (images/ + labels/) or COCO json.

Both load into the same shape: a list of samples with ground-truth boxes in pixels, so the mAP
code never cares where labels came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from agent.vision import IMAGE_SUFFIXES
from models.errors import FactoryError


@dataclass
class Sample:
    image: Path
    width: int
    height: int
    boxes: list[tuple[int, tuple[float, float, float, float]]] = field(
        default_factory=list
    )  # class, xywh


@dataclass
class Dataset:
    name: str
    samples: list[Sample]
    categories: dict[int, str] | None = None  # COCO json: category id -> name, mapped by name

    @property
    def box_count(self) -> int:
        return sum(len(s.boxes) for s in self.samples)


def load_dataset(path: Path) -> Dataset:
    """A COCO json file (``instances.json``) or a YOLO folder (``images/`` + ``labels/``).

    Raises:
        FactoryError: missing data, no labels, unreadable images or malformed label lines.
    """
    if path.is_file() and path.suffix == ".json":
        return _load_coco(path)
    if path.is_dir():
        return _load_yolo(path)
    raise FactoryError(
        f"dataset not found: {path} (a YOLO folder with images/ and labels/, or a COCO .json)"
    )


def _image_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FactoryError(f"dataset image cannot be decoded: {path}")
    return image.shape[1], image.shape[0]


def _load_yolo(root: Path) -> Dataset:
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise FactoryError(f"{root} has no images/ folder (YOLO format: images/ and labels/)")
    if not labels_dir.is_dir():
        raise FactoryError(f"{root} has no labels/ folder: evaluation needs labelled images")
    samples = []
    for image in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        label = labels_dir / image.relative_to(images_dir).with_suffix(".txt")
        width, height = _image_size(image)
        sample = Sample(image, width, height)
        if label.is_file():  # no label file: an image with no objects
            for number, line in enumerate(label.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cls, cx, cy, w, h = int(parts[0]), *map(float, parts[1:5])
                except (ValueError, IndexError):
                    raise FactoryError(
                        f"{label}:{number}: expected 'class cx cy w h', got {line!r}"
                    ) from None
                sample.boxes.append(
                    (cls, ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height))
                )
        samples.append(sample)
    if not samples:
        raise FactoryError(f"{images_dir} holds no images")
    if not any(s.boxes for s in samples):
        raise FactoryError(f"{labels_dir} holds no labels for the images in {images_dir}")
    return Dataset(root.name, samples)


def _load_coco(path: Path) -> Dataset:
    try:
        data = json.loads(path.read_text())
        images = {img["id"]: img for img in data["images"]}
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FactoryError(f"{path} is not a COCO json dataset: {exc}") from None
    if not annotations:
        raise FactoryError(f"{path} has no annotations: evaluation needs labelled images")
    base = path.parent
    samples: dict[int, Sample] = {}
    for image_id, image in images.items():
        file = base / image.get("file_name", "")
        if not file.is_file():
            file = base / "images" / image.get("file_name", "")
        if not file.is_file():
            raise FactoryError(f"{path}: image {image.get('file_name')!r} not found next to it")
        width, height = image.get("width") or 0, image.get("height") or 0
        if not width or not height:
            width, height = _image_size(file)
        samples[image_id] = Sample(file, int(width), int(height))
    for annotation in annotations:
        if annotation.get("iscrowd"):
            continue
        x, y, w, h = annotation["bbox"]
        samples[annotation["image_id"]].boxes.append((int(annotation["category_id"]), (x, y, w, h)))
    names = {int(c["id"]): str(c["name"]) for c in data.get("categories", []) if "name" in c}
    return Dataset(path.stem, [samples[k] for k in sorted(samples)], names or None)
