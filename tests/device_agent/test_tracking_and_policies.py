"""The IoU tracker and the publish and crop policies, on synthetic detections and the real bus photo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent.detector import Detection, Detector
from device_agent.policies import CropPolicy, CropPolicyConfig, PublishPolicy, PublishPolicyConfig
from device_agent.tracker import IouTracker, iou_matrix


def det(x: float, label: str = "person", conf: float = 0.9, class_id: int = 0) -> Detection:
    return Detection(class_id, label, conf, (x, 100.0, x + 50.0, 200.0))


def test_tracks_keep_their_id_while_objects_move() -> None:
    tracker = IouTracker()
    first = tracker.update([det(0), det(300)])
    assert [t.is_new for t in first] == [True, True]
    ids = [t.track_id for t in first]
    for step in range(1, 10):
        moved = tracker.update([det(300 + 5 * step), det(5 * step)])
        assert [t.track_id for t in moved] == ids[::-1]
        assert not any(t.is_new for t in moved)


def test_new_class_or_far_box_is_a_new_track_and_lost_tracks_expire() -> None:
    tracker = IouTracker(max_missed=2)
    (person,) = tracker.update([det(0)])
    (dog,) = tracker.update([det(0, "dog", class_id=16)])
    assert dog.track_id != person.track_id
    assert dog.is_new
    for _ in range(3):
        tracker.update([])
    (again,) = tracker.update([det(0, "dog", class_id=16)])
    assert again.is_new
    assert again.track_id not in {person.track_id, dog.track_id}


def test_iou_matrix() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=np.float64)
    assert iou_matrix(boxes, boxes) == pytest.approx(np.array([[1.0, 1 / 3], [1 / 3, 1.0]]))


def test_publish_policies() -> None:
    tracker = IouTracker()
    frames = [tracker.update(d) for d in ([det(0)], [det(2)], [det(2), det(300)], [det(4), det(302)], [])]
    every = PublishPolicy(PublishPolicyConfig(mode="every_frame"))
    assert [every.should_publish(f) for f in frames] == [True, True, True, True, False]
    on_change = PublishPolicy(PublishPolicyConfig(mode="on_change"))
    assert [on_change.should_publish(f) for f in frames] == [True, False, True, False, False]
    rate = PublishPolicy(PublishPolicyConfig(mode="max_rate", max_rate_hz=2))
    assert [
        rate.should_publish(f, now=t) for f, t in zip(frames, [0.0, 0.1, 0.6, 0.7, 2.0], strict=True)
    ] == [
        True,
        False,
        True,
        False,
        False,
    ]


@pytest.fixture(scope="module")
def bus_tracked(int8_detector: Detector, bus_jpg: Path) -> tuple[np.ndarray, list]:  # type: ignore[type-arg]
    image = cv2.imread(str(bus_jpg))
    return image, IouTracker().update(int8_detector.detect(image))


def test_one_crop_per_new_track_as_valid_capped_jpegs(bus_tracked: tuple) -> None:  # type: ignore[type-arg]
    image, tracked = bus_tracked
    policy = CropPolicy(CropPolicyConfig(max_side=128, bytes_per_second=10_000_000))
    crops = policy.crops_for(image, tracked)
    assert len(crops) == 5
    for crop in crops:
        decoded = cv2.imdecode(np.frombuffer(crop.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None
        assert max(decoded.shape[:2]) <= 128
    assert policy.crops_for(image, tracked) == []  # same tracks, same confidence: no new crops


def test_crop_selection_by_class_band_and_confidence_change(bus_tracked: tuple) -> None:  # type: ignore[type-arg]
    image, tracked = bus_tracked
    only_bus = CropPolicy(CropPolicyConfig(classes=["bus"], bytes_per_second=10_000_000))
    assert [c.tracked.detection.label for c in only_bus.crops_for(image, tracked)] == ["bus"]
    uncertain = CropPolicy(CropPolicyConfig(uncertain_band=(0.25, 0.5), bytes_per_second=10_000_000))
    assert [round(c.tracked.detection.confidence, 3) for c in uncertain.crops_for(image, tracked)] == [0.312]
    policy = CropPolicy(CropPolicyConfig(confidence_change=0.2, bytes_per_second=10_000_000))
    policy.crops_for(image, tracked)
    lower = [
        type(t)(
            Detection(
                t.detection.class_id, t.detection.label, t.detection.confidence - 0.25, t.detection.bbox
            ),
            t.track_id,
            False,
        )
        for t in tracked
    ]
    assert len(policy.crops_for(image, lower)) == 5


def test_crop_budget_limits_bytes(bus_tracked: tuple) -> None:  # type: ignore[type-arg]
    image, tracked = bus_tracked
    policy = CropPolicy(CropPolicyConfig(bytes_per_second=20_000, max_side=320))
    crops = policy.crops_for(image, tracked)
    assert sum(len(c.jpeg) for c in crops) <= 20_000
    assert policy.crops_over_budget == 5 - len(crops) > 0
