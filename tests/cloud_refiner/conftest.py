"""Shared fixtures of the refiner tests: the real classifiers and real crops cut from the shared images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import pytest

from cloud_refiner.classifier import Classifier
from cloud_refiner.config import PreprocessConfig

Crops = list[tuple[bytes, str]]  # (JPEG bytes, edge label)

# MobileNetV2 from the ONNX zoo has no metadata: its preprocessing and labels come from the config.
MOBILENET_PREPROCESS: dict[str, Any] = {
    "resize_shorter": 256,
    "crop": [224, 224],
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
}
# (image, box x1, y1, x2, y2, edge label): the boxes the detector finds in the shared images (MANIFEST.md).
CROP_BOXES = [
    ("bus.jpg", (34, 230, 800, 766), "bus"),
    ("bus.jpg", (50, 398, 244, 903), "person"),
    ("bus.jpg", (221, 408, 343, 856), "person"),
    ("bus.jpg", (672, 372, 810, 879), "person"),
    ("zidane.jpg", (109, 197, 1113, 711), "person"),
    ("zidane.jpg", (751, 45, 1126, 708), "person"),
    ("zidane.jpg", (434, 436, 524, 714), "tie"),
]


@pytest.fixture(scope="session")
def effnet_path(shared: Path) -> Path:
    return shared / "models" / "efficientnet-lite2.onnx"


@pytest.fixture(scope="session")
def mobilenet_path(shared: Path) -> Path:
    return shared / "models" / "mobilenetv2-12-int8.onnx"


@pytest.fixture(scope="session")
def synset_path(shared: Path) -> Path:
    return shared / "models" / "imagenet_synset.txt"


@pytest.fixture(scope="session")
def effnet(effnet_path: Path) -> Classifier:
    """EfficientNet-Lite2 with everything from its metadata (loading costs ~0.5 s, so once per session)."""
    return Classifier(effnet_path)


@pytest.fixture(scope="session")
def mobilenet(mobilenet_path: Path, synset_path: Path) -> Classifier:
    return Classifier(
        mobilenet_path,
        labels_file=synset_path,
        preprocess=PreprocessConfig.model_validate(MOBILENET_PREPROCESS),
    )


@pytest.fixture(scope="session")
def crops(shared: Path) -> Crops:
    """JPEG crops (bytes, edge label) of the detections in bus.jpg and zidane.jpg, <= 320 px like devices."""
    out = []
    for name, (x1, y1, x2, y2), label in CROP_BOXES:
        image = cv2.imread(str(shared / "data" / "images" / name))
        assert image is not None
        crop = image[y1:y2, x1:x2]
        scale = 320 / max(crop.shape[:2])
        if scale < 1:
            crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        out.append((jpeg.tobytes(), label))
    return out
