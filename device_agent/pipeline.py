"""The agent's core: a frame goes through detect → track → publish/crop policy → durable outbox.

Nothing here speaks MQTT or HTTP: it turns frames into outbox messages. The publisher drains the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from device_agent.detector import DetectionResult, Detector, DetectParams
from device_agent.outbox import MessageKind, Outbox, OutboxFullError, OutboxMessage
from device_agent.policies import Crop, CropPolicy, CropPolicyConfig, PublishPolicy, PublishPolicyConfig
from device_agent.sources import Frame
from device_agent.tracker import IouTracker, TrackedDetection
from fleet_protocol.errors import PayloadError
from fleet_protocol.ids import new_det_id
from fleet_protocol.mqtt import MessageProperties
from fleet_protocol.payloads import (
    MAX_CROP_BYTES,
    MAX_DETECTIONS,
    CropMeta,
    DetectionEvent,
    DetectionItem,
    ModelRef,
    RefinedPayload,
    StageTimingMs,
    encode,
)
from fleet_protocol.topics import Topics

log = logging.getLogger(__name__)

# Drop reasons counted in the outbox beside its own (telemetry: outbox.dropped), for what never reached it.
CROP_TOO_LARGE = "crop_too_large"  # no JPEG within crops.max_bytes (MAX_CROP_BYTES at most)
DETECTION_TRUNCATED = "detection_truncated"  # detections left out of an event to keep it within the contract
TRUNCATION_WARNING_INTERVAL_S = 60.0


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
    """The last N detection events with the refined labels that came back for them (for GET /v1/events).

    Events are kept as they are and turned into JSON only when asked for: the inference thread pays nothing
    per event beyond a deque append.
    """

    capacity: int
    _events: deque[DetectionEvent] = field(init=False)
    _kept_det_ids: set[str] = field(default_factory=set)
    _refined: dict[str, dict[str, object]] = field(default_factory=dict)  # by det_id
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._events = deque(maxlen=self.capacity)

    def add(self, event: DetectionEvent) -> None:
        with self._lock:
            if len(self._events) == self.capacity:
                for det in self._events[0].detections:
                    self._kept_det_ids.discard(det.det_id)
                    self._refined.pop(det.det_id, None)
            self._events.append(event)
            self._kept_det_ids.update(det.det_id for det in event.detections)

    def add_refined(self, refined: RefinedPayload) -> bool:
        """Attach a refined label to its detection; False if that detection is no longer kept."""
        with self._lock:
            if refined.det_id not in self._kept_det_ids:
                return False
            self._refined[refined.det_id] = refined.model_dump(
                mode="json", include={"refined_label", "score", "top_k", "refiner_model"}
            )
            return True

    def latest(self, limit: int) -> list[dict[str, object]]:
        with self._lock:
            events = list(self._events)[-limit:][::-1] if limit > 0 else []
            refined = {
                det.det_id: self._refined[det.det_id]
                for event in events
                for det in event.detections
                if det.det_id in self._refined
            }
        records = [event.model_dump(mode="json", by_alias=True) for event in events]
        for record in records:
            for det in record["detections"]:
                if det["det_id"] in refined:
                    det["refined"] = refined[det["det_id"]]
        return records


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
        self._crop_limit = min(MAX_CROP_BYTES, crops.max_bytes)
        self._last_truncation_warning = -TRUNCATION_WARNING_INTERVAL_S

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
        tracked, det_ids, event, payload = self._event_within_contract(frame, result, tracked, active.ref)
        too_large = state.crops.crops_too_large
        crops = state.crops.crops_for(frame.image, tracked)
        messages = [self._event_message(event, payload)]
        det_id_of = {item.track_id: det_id for item, det_id in zip(tracked, det_ids, strict=True)}
        for crop in crops:
            if len(crop.jpeg) > self._crop_limit:  # the policy keeps to its own limit; never pass this one
                state.crops.crops_too_large += 1
                continue
            messages.append(self._crop_message(crop, det_id_of[crop.tracked.track_id], active.ref))
        if state.crops.crops_too_large > too_large:
            self._outbox.count_dropped(CROP_TOO_LARGE, state.crops.crops_too_large - too_large)
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

    def _event_within_contract(
        self, frame: Frame, result: DetectionResult, tracked: list[TrackedDetection], model: ModelRef
    ) -> tuple[list[TrackedDetection], list[str], DetectionEvent, bytes]:
        """The event of a frame, its payload within MAX_DETECTIONS and MAX_PAYLOAD_BYTES: (the detections
        it carries, their det_ids, the event, its encoded payload). Too many or too large: the most
        confident ones are kept, and the rest counted as `detection_truncated`."""
        kept = tracked if len(tracked) <= MAX_DETECTIONS else _most_confident(tracked, MAX_DETECTIONS)
        while True:
            det_ids = [new_det_id() for _ in kept]
            event = self._event(frame, result, kept, det_ids, model)
            try:
                payload = encode(event)
                break
            except PayloadError:
                if not kept:
                    raise
                kept = _most_confident(kept, len(kept) // 2)
        if len(kept) < len(tracked):
            self._outbox.count_dropped(DETECTION_TRUNCATED, len(tracked) - len(kept))
            now = time.monotonic()
            if now - self._last_truncation_warning >= TRUNCATION_WARNING_INTERVAL_S:
                self._last_truncation_warning = now
                log.warning(
                    "frame %s/%d: %d detections do not fit one event; kept the %d most confident "
                    "(lower model.max_det to avoid this)",
                    frame.source_id,
                    frame.seq,
                    len(tracked),
                    len(kept),
                )
        return kept, det_ids, event, payload

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

    def _event_message(self, event: DetectionEvent, payload: bytes) -> OutboxMessage:
        return OutboxMessage(
            msg_id=event.msg_id,
            topic=self._topics.detections(self.device_id),
            payload=payload,
            kind=MessageKind.DETECTION,
            properties=_JSON,
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


_JSON = MessageProperties(content_type="application/json")


def _most_confident(items: Sequence[TrackedDetection], count: int) -> list[TrackedDetection]:
    """The `count` most confident of `items`, in their order."""
    ranked = sorted(range(len(items)), key=lambda i: -items[i].detection.confidence)[:count]
    return [items[i] for i in sorted(ranked)]
