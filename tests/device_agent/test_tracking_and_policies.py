"""The IoU tracker and the publish and crop policies, on synthetic detections and the real bus photo."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent.detector import Detection, Detector, DetectParams
from device_agent.outbox import MessageKind, Outbox
from device_agent.pipeline import ActiveModel, DetectionPipeline, ModelSlot, RecentEvents
from device_agent.policies import CropPolicy, CropPolicyConfig, PublishPolicy, PublishPolicyConfig
from device_agent.sources import Frame
from device_agent.telemetry import wire_outbox_stats
from device_agent.tracker import IouTracker, iou_matrix
from fleet_protocol.ids import new_det_id
from fleet_protocol.payloads import (
    MAX_DETECTIONS,
    DetectionEvent,
    ModelRef,
    RefinedPayload,
    StageTimingMs,
    decode,
)
from fleet_protocol.topics import Topics


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


def test_an_oversized_crop_is_encoded_again_within_max_bytes(bus_tracked: tuple) -> None:  # type: ignore[type-arg]
    image, tracked = bus_tracked
    unlimited = CropPolicy(CropPolicyConfig(max_side=1024, jpeg_quality=100, bytes_per_second=10_000_000))
    full_size = unlimited.crops_for(image, tracked)
    assert max(len(c.jpeg) for c in full_size) > 100_000  # the limit below has work to do
    policy = CropPolicy(
        CropPolicyConfig(max_side=1024, jpeg_quality=100, max_bytes=20_000, bytes_per_second=10_000_000)
    )
    crops = policy.crops_for(image, tracked)
    assert [c.tracked.track_id for c in crops] == [c.tracked.track_id for c in full_size]
    assert policy.crops_too_large == 0
    smaller = 0
    for crop, original in zip(crops, full_size, strict=True):
        assert len(crop.jpeg) <= 20_000
        decoded = cv2.imdecode(np.frombuffer(crop.jpeg, np.uint8), cv2.IMREAD_COLOR)
        full = cv2.imdecode(np.frombuffer(original.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None
        smaller += max(decoded.shape[:2]) < max(full.shape[:2])
    assert smaller >= 1  # the bus (400 kB at quality 100): a lower quality was not enough


def test_crop_limit_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        CropPolicyConfig(max_bytes=3 * 1024 * 1024)  # over the contract's MAX_CROP_BYTES
    with pytest.raises(ValueError, match="max_bytes"):
        CropPolicyConfig(max_bytes=100)


PipelineFactory = Callable[[CropPolicyConfig, DetectParams], tuple[DetectionPipeline, Outbox]]


@pytest.fixture
def make_pipeline(tmp_path: Path, int8_detector: Detector) -> PipelineFactory:
    outboxes: list[Outbox] = []

    def make(crops: CropPolicyConfig, params: DetectParams) -> tuple[DetectionPipeline, Outbox]:
        outbox = Outbox(tmp_path / f"outbox-{len(outboxes)}.db")
        outboxes.append(outbox)
        active = ActiveModel(int8_detector, ModelRef(name="yolov8n", version="int8"))
        pipeline = DetectionPipeline(
            "cam-0001",
            ModelSlot(active),
            outbox,
            Topics(),
            params=params,
            publish=PublishPolicyConfig(mode="every_frame"),
            crops=crops,
            recent=RecentEvents(10),
        )
        return pipeline, outbox

    yield make  # type: ignore[misc]
    for outbox in outboxes:
        outbox.close()


def test_crops_that_fit_no_limit_never_reach_the_outbox_and_are_counted(
    make_pipeline: PipelineFactory,
    bus_tracked: tuple,  # type: ignore[type-arg]
) -> None:
    image, _ = bus_tracked
    crops = CropPolicyConfig(max_side=4096, jpeg_quality=100, max_bytes=4096, bytes_per_second=10_000_000)
    pipeline, outbox = make_pipeline(crops, DetectParams())
    event = pipeline.process(Frame("hall", 0, image, time.time()))
    assert event is not None
    assert len(event.detections) == 5
    assert [row.message.kind for row in outbox.peek(100)] == [MessageKind.DETECTION]  # the event alone
    stats = outbox.stats()
    assert stats.dropped["crop_too_large"] == 5
    assert wire_outbox_stats(stats).dropped["crops_too_large"] == 5
    pipeline.process(Frame("hall", 1, image, time.time()))  # the same tracks: not tried (nor counted) again
    assert outbox.stats().dropped["crop_too_large"] == 5


def test_an_event_keeps_the_most_confident_detections_the_contract_allows(
    make_pipeline: PipelineFactory,
    int8_detector: Detector,
    bus_tracked: tuple,  # type: ignore[type-arg]
) -> None:
    image, _ = bus_tracked
    mosaic = np.concatenate([np.concatenate([image, image], axis=1)] * 2, axis=0)
    params = DetectParams(conf=0.001, max_det=1000)  # the agent's settings allow up to 1000
    found = int8_detector.detect(mosaic, params)
    assert len(found) > MAX_DETECTIONS
    pipeline, outbox = make_pipeline(CropPolicyConfig(enabled=False), params)

    event = pipeline.process(Frame("hall", 0, mosaic, time.time()))

    assert event is not None
    assert len(event.detections) == MAX_DETECTIONS
    threshold = sorted((d.confidence for d in found), reverse=True)[MAX_DETECTIONS - 1]
    assert min(d.confidence for d in event.detections) >= threshold - 1e-4
    (row,) = outbox.peek(10)
    assert decode(DetectionEvent, row.message.payload).msg_id == event.msg_id
    assert outbox.stats().dropped["detection_truncated"] == len(found) - MAX_DETECTIONS


def event_with(*det_ids: str) -> DetectionEvent:
    return DetectionEvent(
        device_id="cam-0001",
        source="hall",
        frame_seq=0,
        model=ModelRef(name="yolov8n", version="1"),
        width=640,
        height=480,
        timing_ms=StageTimingMs(pre=1.0, infer=20.0, post=1.0),
        detections=[
            {"det_id": det_id, "class_id": 0, "label": "person", "confidence": 0.9, "bbox": (1, 2, 30, 40)}
            for det_id in det_ids
        ],
    )


def refined_for(det_id: str, label: str) -> RefinedPayload:
    return RefinedPayload(
        device_id="cam-0001",
        det_id=det_id,
        edge_label="person",
        refined_label=label,
        score=0.8,
        top_k=[{"label": label, "score": 0.8}],
        refiner_model=ModelRef(name="refiner", version="1"),
        latency_ms=12.0,
    )


def test_recent_events_newest_first_with_their_refined_labels() -> None:
    recent = RecentEvents(2)
    ids = [new_det_id() for _ in range(4)]
    first, second, third = event_with(ids[0]), event_with(ids[1], ids[2]), event_with(ids[3])
    recent.add(first)
    recent.add(second)
    assert recent.add_refined(refined_for(ids[0], "pedestrian"))
    assert recent.add_refined(refined_for(ids[2], "cyclist"))
    recent.add(third)  # the first event goes
    assert not recent.add_refined(refined_for(ids[0], "pedestrian"))
    events = recent.latest(10)
    assert [e["msg_id"] for e in events] == [third.msg_id, second.msg_id]
    assert [d.get("refined", {}).get("refined_label") for d in events[1]["detections"]] == [None, "cyclist"]  # type: ignore[attr-defined]
    assert [e["msg_id"] for e in recent.latest(1)] == [third.msg_id]
