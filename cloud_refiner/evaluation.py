"""Does class conditioning help? Ground-truth crops of a YOLO-format dataset, classified both ways.

Crops are cut from the dataset's ground-truth boxes whose class has an ImageNet subset, whose shorter side
is at least `min_side` pixels, padded by `pad` of the box size on each side (clipped to the image). A crop
counts as a hit when the classifier's top-1 lies in the ImageNet subset of its true class:

- unconditioned: the top-1 over all classes (top-5: any of the five in the subset);
- conditioned: the top-1 within the subset of the crop's *edge label*. With the true class as edge label
  (`edge_labels=None`) this is 1.0 by construction: an upper bound and a check of the mapping. The real
  measure gives each crop the label an edge detector put on it (`match_edge_labels`: the detection that
  overlaps the box best, IoU >= 0.5; the test runs the agent's YOLOv8n, `edgefleet refiner eval
  --detector-url` asks a device agent's HTTP API): a wrong edge label then conditions onto the wrong subset
  and misses, and a crop the detector missed (no label) falls back to the unconditioned answer.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from cloud_refiner.classifier import Classifier
from cloud_refiner.conditioning import Conditioner, LabelSubsets

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """The dataset config or its files cannot be used; the message says what is missing."""


@dataclass(frozen=True)
class GtCrop:
    """One ground-truth box, cut out with padding."""

    image: Path
    box_index: int  # line in the label file
    label: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 of the ground-truth box, pixels
    crop: np.ndarray = field(repr=False)  # BGR, padded


@dataclass(frozen=True)
class ConditioningReport:
    crops: int
    classes: int
    unconditioned_top1: float
    unconditioned_top5: float
    conditioned_top1: float
    edge_labelled: int  # crops that had an edge label (the rest fell back to unconditioned)
    edge_label_correct: int  # of those, how many edge labels named the true class

    def as_dict(self) -> dict[str, float | int]:
        return {
            "crops": self.crops,
            "classes": self.classes,
            "unconditioned_top1": round(self.unconditioned_top1, 4),
            "unconditioned_top5": round(self.unconditioned_top5, 4),
            "conditioned_top1": round(self.conditioned_top1, 4),
            "edge_labelled": self.edge_labelled,
            "edge_label_correct": self.edge_label_correct,
        }


@dataclass(frozen=True)
class EdgeDetection:
    """What an edge detector reported for one object."""

    label: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2, pixels


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_edge_labels(
    crops: Sequence[GtCrop], detections: Mapping[Path, Sequence[EdgeDetection]], min_iou: float = 0.5
) -> list[str | None]:
    """Per crop, the label of the detection overlapping its box best (IoU >= `min_iou`), else None."""
    labels: list[str | None] = []
    for crop in crops:
        scored = [(box_iou(crop.box, d.bbox), d.label) for d in detections.get(crop.image, ())]
        best = max(scored, default=(0.0, None))
        labels.append(best[1] if best[0] >= min_iou else None)
    return labels


def detect_over_http(base_url: str, image: Path, timeout_s: float = 120.0) -> list[EdgeDetection]:
    """Detections of `image` from a device agent's local API (`POST {base_url}/v1/detect`)."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"the detector URL must be http:// or https://, got {base_url!r}")
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/detect",
        data=image.read_bytes(),
        headers={"content-type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = json.load(response)
    return [EdgeDetection(str(d["label"]), tuple(d["bbox"])) for d in body["detections"]]


def dataset_images(data_yaml: Path, split: str = "val") -> tuple[list[Path], list[str]]:
    """Image files of a YOLO data YAML's split and its class names."""
    try:
        config = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise DatasetError(f"cannot read the dataset config {data_yaml}: {error}") from error
    names = config.get("names") if isinstance(config, dict) else None
    if isinstance(names, dict):
        names = [str(names[key]) for key in sorted(names, key=int)]
    if not isinstance(names, list) or split not in config:
        raise DatasetError(f"{data_yaml}: expected `names` and a `{split}` entry (a YOLO data YAML)")
    root = (data_yaml.parent / str(config.get("path", "."))).resolve()
    images_dir = root / str(config[split])
    if not images_dir.is_dir():
        raise DatasetError(f"{data_yaml}: the {split} images folder {images_dir} does not exist")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return images, [str(name) for name in names]


def label_file_of(image: Path) -> Path:
    """YOLO's convention: `.../images/<split>/x.jpg` -> `.../labels/<split>/x.txt`."""
    parts = list(image.parts)
    index = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if index is None:
        return image.with_suffix(".txt")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def ground_truth_crops(
    data_yaml: Path, subsets: LabelSubsets, *, min_side: int = 48, pad: float = 0.10, split: str = "val"
) -> list[GtCrop]:
    """Padded crops of every ground-truth box of a mapped class with a shorter side >= `min_side` px."""
    images, names = dataset_images(data_yaml, split)
    crops = []
    for image_path in images:
        label_path = label_file_of(image_path)
        if not label_path.is_file():
            continue  # a background image
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"cannot decode {image_path}")
        height, width = image.shape[:2]
        for index, line in enumerate(label_path.read_text(encoding="utf-8").splitlines()):
            fields = line.split()
            if len(fields) < 5:
                continue
            class_id = int(float(fields[0]))
            label = names[class_id] if 0 <= class_id < len(names) else str(class_id)
            if label not in subsets:
                continue
            cx, cy, bw, bh = (float(v) for v in fields[1:5])
            x1, y1 = (cx - bw / 2) * width, (cy - bh / 2) * height
            x2, y2 = (cx + bw / 2) * width, (cy + bh / 2) * height
            if min(x2 - x1, y2 - y1) < min_side:
                continue
            px, py = (x2 - x1) * pad, (y2 - y1) * pad
            left, top = max(0, round(x1 - px)), max(0, round(y1 - py))
            right, bottom = min(width, round(x2 + px)), min(height, round(y2 + py))
            box = (round(x1), round(y1), round(x2), round(y2))
            crops.append(GtCrop(image_path, index, label, box, image[top:bottom, left:right].copy()))
    return crops


def classify_crops(
    classifier: Classifier,
    crops: Sequence[GtCrop],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Class probabilities for every crop, [len(crops), classes]."""
    rows = []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        rows.append(classifier.classify([classifier.prepare(c.crop) for c in chunk]))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(rows) if rows else np.zeros((0, len(classifier.names)), np.float32)


def conditioning_report(
    probs: np.ndarray,
    crops: Sequence[GtCrop],
    conditioner: Conditioner,
    subsets: LabelSubsets,
    edge_labels: Iterable[str | None] | None = None,
) -> ConditioningReport:
    """Hit rates of unconditioned and conditioned top-1 (see the module doc); `edge_labels` per crop."""
    labels = list(edge_labels) if edge_labels is not None else [c.label for c in crops]
    if len(labels) != len(crops) or len(probs) != len(crops):
        raise ValueError(f"{len(crops)} crops, {len(probs)} probability rows and {len(labels)} edge labels")
    top1 = top5 = conditioned = 0
    for row, crop, edge_label in zip(probs, crops, labels, strict=True):
        truth = subsets.subset(crop.label)
        assert truth is not None
        best5 = np.argsort(-row)[:5]
        top1 += int(best5[0] in truth)
        top5 += int(bool(np.isin(best5, truth).any()))
        conditioned += int(conditioner.refine(row, edge_label).class_id in truth)
    count = max(len(crops), 1)
    return ConditioningReport(
        crops=len(crops),
        classes=len({c.label for c in crops}),
        unconditioned_top1=top1 / count,
        unconditioned_top5=top5 / count,
        conditioned_top1=conditioned / count,
        edge_labelled=sum(label is not None for label in labels),
        edge_label_correct=sum(label == crop.label for label, crop in zip(labels, crops, strict=True)),
    )
