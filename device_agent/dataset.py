"""Read a YOLO-format labelled dataset (Ultralytics data YAML) for evaluation.

Boxes stay normalised (`cx, cy, w, h` in 0..1) until the image is read, since pixel boxes need the image
size; `LabelledImage.boxes_xyxy(width, height)` gives them in pixels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import yaml

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
# Normalised coordinates a hair outside 0..1 come from float rounding in exporters; more is an error.
COORD_TOLERANCE = 1e-3


class DatasetError(ValueError):
    """The data YAML, an image list or a label file is missing or malformed."""


@dataclass(frozen=True)
class LabelledImage:
    """One image and its ground truth: `boxes_cxcywh_norm` is `[N, 4]` normalised, `class_ids` is `[N]`."""

    path: Path
    class_ids: npt.NDArray[np.int64]
    boxes_cxcywh_norm: npt.NDArray[np.float64]

    def boxes_xyxy(self, width: int, height: int) -> npt.NDArray[np.float64]:
        """Ground-truth boxes as `[N, 4]` `(x1, y1, x2, y2)` pixels of an image `width` x `height`."""
        cx, cy, w, h = self.boxes_cxcywh_norm.T
        return np.stack(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1
        )


@dataclass(frozen=True)
class LabelledDataset:
    """Class names (index = class id) and the labelled images of one split, sorted by path."""

    yaml_path: Path
    split: str
    names: list[str]
    images: list[LabelledImage]

    @property
    def box_count(self) -> int:
        return sum(len(image.class_ids) for image in self.images)


def load_dataset(yaml_path: Path | str, split: str = "val") -> LabelledDataset:
    """Load `split` (falling back to `train` when the YAML has no `val`) of a YOLO data YAML."""
    yaml_path = Path(yaml_path)
    config = _read_yaml(yaml_path)
    names = _class_names(config, yaml_path)
    root = _dataset_root(config, yaml_path)
    key = "train" if split == "val" and "val" not in config else split
    if config.get(key) is None:
        raise DatasetError(
            f"{yaml_path}: no {split!r} split; add `{split}: images/...` (an images folder or list)"
        )
    image_paths = _image_paths(config[key], root, yaml_path)
    if not image_paths:
        raise DatasetError(f"{yaml_path}: the {key!r} split lists no images ({_suffix_hint()})")
    images = [_labelled_image(path, len(names)) for path in image_paths]
    return LabelledDataset(yaml_path, key, names, images)


def label_path(image_path: Path) -> Path:
    """The label file of an image: the last `/images/` component becomes `/labels/`, the suffix `.txt`."""
    text = str(image_path)
    images_dir, labels_dir = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images_dir in text:
        head, tail = text.rsplit(images_dir, 1)
        text = head + labels_dir + tail
    return Path(text).with_suffix(".txt")


def read_labels(path: Path, class_count: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Parse one label file: `cls cx cy w h` per line (polygons `cls x1 y1 x2 y2 ...` become their box)."""
    class_ids: list[int] = []
    boxes: list[list[float]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            class_id, box = _parse_line(line, class_count, f"{path}:{number}")
            class_ids.append(class_id)
            boxes.append(box)
    return np.array(class_ids, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _parse_line(line: str, class_count: int, where: str) -> tuple[int, list[float]]:
    fields = line.split()
    if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
        raise DatasetError(
            f"{where}: expected `class cx cy w h` or a polygon `class x1 y1 x2 y2 ...`; got {line.strip()!r}"
        )
    try:
        class_value, values = float(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        raise DatasetError(f"{where}: non-numeric value in {line.strip()!r}") from None
    if not class_value.is_integer() or not 0 <= class_value < class_count:
        raise DatasetError(
            f"{where}: class {fields[0]} is not an id in 0..{class_count - 1} of the YAML's names"
        )
    if any(v < -COORD_TOLERANCE or v > 1 + COORD_TOLERANCE for v in values):
        raise DatasetError(f"{where}: coordinates must be normalised to 0..1, got {line.strip()!r}")
    if len(values) > 4:
        xs, ys = values[0::2], values[1::2]
        values = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    return int(class_value), values


def _labelled_image(image_path: Path, class_count: int) -> LabelledImage:
    labels = label_path(image_path)
    if labels.is_file():
        class_ids, boxes = read_labels(labels, class_count)
    else:  # a background image: no objects
        class_ids, boxes = np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
    return LabelledImage(image_path, class_ids, boxes)


def _read_yaml(yaml_path: Path) -> Mapping[str, object]:
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{yaml_path}: data YAML not found; pass the path of a YOLO data .yaml") from None
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yaml_path}: not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with `path`, `val` and `names`")
    return config


def _class_names(config: Mapping[str, object], yaml_path: Path) -> list[str]:
    names = config.get("names")
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    if isinstance(names, dict) and names:
        try:
            by_id = {int(key): str(value) for key, value in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: `names` keys must be class ids 0..N-1") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise DatasetError(f"{yaml_path}: `names` keys must be the ids 0..{len(by_id) - 1} without gaps")
        return [by_id[i] for i in range(len(by_id))]
    raise DatasetError(f"{yaml_path}: `names` is missing or empty; list the class names (index = class id)")


def _dataset_root(config: Mapping[str, object], yaml_path: Path) -> Path:
    root = Path(str(config.get("path") or "."))
    return root if root.is_absolute() else yaml_path.parent / root


def _image_paths(entry: object, root: Path, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    paths: list[Path] = []
    for item in entries:
        location = Path(str(item))
        location = location if location.is_absolute() else root / location
        if location.is_dir():
            paths.extend(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif location.is_file() and location.suffix == ".txt":
            paths.extend(_listed_images(location))
        elif location.is_file() and location.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(location)
        else:
            raise DatasetError(f"{yaml_path}: {location} is not an images folder, an image or a .txt list")
    return sorted(set(paths))


def _listed_images(list_file: Path) -> list[Path]:
    """Image paths listed one per line; relative ones are relative to the list file's folder."""
    paths = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        path = Path(line.strip())
        path = path if path.is_absolute() else list_file.parent / path
        if not path.is_file():
            raise DatasetError(f"{list_file}:{number}: image {path} not found")
        paths.append(path)
    return paths


def _suffix_hint() -> str:
    return "image files end in " + ", ".join(sorted(IMAGE_SUFFIXES))
