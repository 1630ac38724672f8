"""The agent's core: a frame goes through detect → track → publish/crop policy → durable outbox.

Nothing here speaks MQTT or HTTP: it turns frames into outbox messages. The publisher drains the outbox.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from device_agent.detector import DetectionResult, Detector, DetectParams
from device_agent.outbox import MessageKind, Outbox, OutboxFullError, OutboxMessage
from device_agent.policies import Crop, CropPolicy, CropPolicyConfig, PublishPolicy, PublishPolicyConfig
from device_agent.sources import Frame
from device_agent.tracker import IouTracker, TrackedDetection
from fleet_protocol.ids import new_det_id
from fleet_protocol.mqtt import MessageProperties
from fleet_protocol.payloads import (
    CropMeta,
    DetectionEvent,
    DetectionItem,
    ModelRef,
    RefinedPayload,
    StageTimingMs,
    encode,
)
from fleet_protocol.topics import Topics


@dataclass(frozen=True)
class ActiveModel:
    """The detector serving now, how the fleet names it, and its thresholds (None: the pipeline's)."""

    detector: Detector
    ref: ModelRef
    params: DetectParams | None = None


class ModelSlot:
    """Holds the active model; a swap takes effect between two frames, never during one."""

    def __init__(self, active: ActiveModel) -> None:
        self._active = active
        self._lock = threading.Lock()

    def get(self) -> ActiveModel:
        with self._lock:
            return self._active

    def swap(self, new: ActiveModel) -> ActiveModel:
        with self._lock:
            previous, self._active = self._active, new
            return previous


@dataclass
class _SourceState:
    tracker: IouTracker
    publish: PublishPolicy
    crops: CropPolicy


@dataclass
class RecentEvents:
    """The last N detection events with the refined labels that came back for them (for GET /v1/events)."""

    capacity: int
    _events: deque[dict[str, object]] = field(init=False)
    _by_det_id: dict[str, dict[str, object]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._events = deque(maxlen=self.capacity)

    def add(self, event: DetectionEvent) -> None:
        record = event.model_dump(mode="json", by_alias=True)
        with self._lock:
            if len(self._events) == self.capacity:
                for det in self._events[0]["detections"]:  # type: ignore[attr-defined]
                    self._by_det_id.pop(det["det_id"], None)
            self._events.append(record)
            for det in record["detections"]:
                self._by_det_id[det["det_id"]] = det

    def add_refined(self, refined: RefinedPayload) -> bool:
        """Attach a refined label to its detection; False if that detection is no longer kept."""
        with self._lock:
            det = self._by_det_id.get(refined.det_id)
            if det is None:
                return False
            det["refined"] = refined.model_dump(
                mode="json", include={"refined_label", "score", "top_k", "refiner_model"}
            )
            return True

    def latest(self, limit: int) -> list[dict[str, object]]:
        with self._lock:
            return list(self._events)[-limit:][::-1]


class DetectionPipeline:
    """Turns frames into detection events and crops, written to the outbox before anything is sent."""

    def __init__(
        self,
        device_id: str,
        model: ModelSlot,
        outbox: Outbox,
        topics: Topics,
        *,
        params: DetectParams,
        publish: PublishPolicyConfig,
        crops: CropPolicyConfig,
        recent: RecentEvents,
        on_enqueued: Callable[[], None] = lambda: None,
        on_produced: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.model = model
        self.params = params
        self._outbox = outbox
        self._topics = topics
        self._publish_config = publish
        self._crop_config = crops
        self._recent = recent
        self._on_enqueued = on_enqueued
        self._on_produced = on_produced
        self._sources: dict[str, _SourceState] = {}
        self.last_result: DetectionResult | None = None
        self.last_model: ActiveModel | None = None  # the model the last (or failing) frame went to

    def process(self, frame: Frame) -> DetectionEvent | None:
        """Detect in one frame; return the event if one was published (already durable in the outbox)."""
        active = self.model.get()
        self.last_model = active
        result = active.detector.run(frame.image, active.params or self.params)
        self.last_result = result
        state = self._state_for(frame.source_id)
        tracked = state.tracker.update(result.detections)
        if not state.publish.should_publish(tracked):
            return None
        det_ids = [new_det_id() for _ in tracked]
        event = self._event(frame, result, tracked, det_ids, active.ref)
        crops = state.crops.crops_for(frame.image, tracked)
        messages = [self._event_message(event)]
        det_id_of = {item.track_id: det_id for item, det_id in zip(tracked, det_ids, strict=True)}
        messages += [self._crop_message(crop, det_id_of[crop.tracked.track_id], active.ref) for crop in crops]
        try:
            self._outbox.enqueue(messages)
        except OutboxFullError as error:
            refused = {m.msg_id for m in error.rejected}
            self._produced([m for m in messages if m.msg_id not in refused])
            raise
        self._produced(messages)
        self._recent.add(event)
        return event

    def _produced(self, committed: list[OutboxMessage]) -> None:
        if not committed:
            return
        self._on_enqueued()
        if self._on_produced is not None:
            self._on_produced([m.msg_id for m in committed])

    def _state_for(self, source_id: str) -> _SourceState:
        if source_id not in self._sources:
            self._sources[source_id] = _SourceState(
                IouTracker(), PublishPolicy(self._publish_config), CropPolicy(self._crop_config)
            )
        return self._sources[source_id]

    def _event(
        self,
        frame: Frame,
        result: DetectionResult,
        tracked: list[TrackedDetection],
        det_ids: list[str],
        model: ModelRef,
    ) -> DetectionEvent:
        timing = result.timing
        return DetectionEvent(
            device_id=self.device_id,
            source=frame.source_id,
            frame_seq=frame.seq,
            model=model,
            width=result.width,
            height=result.height,
            timing_ms=StageTimingMs(pre=timing.pre_ms, infer=timing.infer_ms, post=timing.post_ms),
            detections=[
                DetectionItem(
                    det_id=det_id,
                    class_id=item.detection.class_id,
                    label=item.detection.label,
                    confidence=item.detection.confidence,
                    bbox=item.detection.bbox,
                    track_id=item.track_id,
                )
                for item, det_id in zip(tracked, det_ids, strict=True)
            ],
        )

    def _event_message(self, event: DetectionEvent) -> OutboxMessage:
        return OutboxMessage(
            msg_id=event.msg_id,
            topic=self._topics.detections(self.device_id),
            payload=encode(event),
            kind=MessageKind.DETECTION,
            properties=MessageProperties(content_type="application/json"),
        )

    def _crop_message(self, crop: Crop, det_id: str, model: ModelRef) -> OutboxMessage:
        det = crop.tracked.detection
        meta = CropMeta(
            device_id=self.device_id,
            det_id=det_id,
            label=det.label,
            class_id=det.class_id,
            confidence=det.confidence,
            bbox=det.bbox,
            model=model,
        )
        return OutboxMessage(
            msg_id=meta.msg_id,
            topic=self._topics.crops(self.device_id),
            payload=crop.jpeg,
            kind=MessageKind.CROP,
            properties=MessageProperties(
                content_type="image/jpeg",
                response_topic=self._topics.refined(self.device_id),
                correlation_data=det_id.encode(),
                user_properties=tuple(meta.to_user_properties()),
            ),
        )
