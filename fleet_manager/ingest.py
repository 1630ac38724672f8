"""MQTT ingest, free of MQTT: messages in (topic, payload, properties), rows out, in batches.

The MQTT adapter hands every received message to `Ingestor.submit`; a writer thread takes whatever has
queued (up to `batch_max`), decodes it, and writes it in one transaction:

- `status` (and the broker's will) → the device's state, agent version, active model, last seen;
- `telemetry` → the device's latest figures, plus a history sample at most every N seconds per device;
- `model/reported` → the device's OTA state, plus a history row whenever the state or model changes;
- `detections` → one row per event (unique `msg_id`) and one per object (unique `det_id`);
- `refined` → a row keyed by `det_id`, joined to the detection objects when read;
- `crops` → the JPEG keyed by `det_id` (optional).

Duplicates (the same `msg_id` / `det_id` again, as at-least-once delivery brings) are counted and ignored.
A malformed message (bad topic, bad JSON, a payload whose device id is not its topic's) is counted by kind,
logged and dropped; it never stops the writer. Messages are acknowledged (`acker.ack_many` with their
receipts, one call per batch, in arrival order) only after their batch committed, so with manual
acknowledgements nothing the broker handed over is lost if the process dies.
Retained messages (replayed by the broker on every subscribe) update state but not "last seen".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from fleet_manager.config import IngestSettings, RetentionSettings
from fleet_manager.db import Database
from fleet_manager.models import (
    Crop,
    Detection,
    DetectionObject,
    Device,
    OtaEvent,
    Refinement,
    TelemetrySample,
    utcnow,
)
from fleet_protocol.errors import PayloadError, TopicError
from fleet_protocol.payloads import (
    CropMeta,
    DetectionEvent,
    ModelReported,
    OtaState,
    RefinedPayload,
    StatusPayload,
    TelemetryPayload,
    check_crop_jpeg,
    decode,
)
from fleet_protocol.topics import ParsedTopic, TopicKind, Topics

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
_LOG_EVERY_MALFORMED = 100  # log the first malformed message of each kind, then one in this many
TOPIC_CACHE_MAX = 65_536  # topics parsed once and remembered: a fleet has a few topics per device


class Acknowledger(Protocol):
    """Where received messages are acknowledged once written: the MQTT session, with manual acks."""

    def ack_many(self, receipts: Sequence[Any], /) -> object: ...


@dataclass(frozen=True, slots=True)
class Incoming:
    """One received message, as the MQTT adapter hands it over; `acker.ack_many` takes `receipt` back."""

    topic: str
    payload: bytes
    received_at: datetime
    retain: bool = False
    user_properties: tuple[tuple[str, str], ...] = ()
    acker: Acknowledger | None = None
    receipt: Any = None


class IngestStats:
    """Counters since start, by topic kind; `snapshot()` for the API and benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.malformed: Counter[str] = Counter()
        self.ignored = 0
        self.batches = 0
        self.write_errors = 0
        self.last_error: str | None = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": dict(self.received),
                "stored": dict(self.stored),
                "duplicates": dict(self.duplicates),
                "malformed": dict(self.malformed),
                "ignored": self.ignored,
                "batches": self.batches,
                "write_errors": self.write_errors,
                "last_error": self.last_error,
            }


@dataclass
class _DeviceUpdate:
    last_seen: datetime | None = None
    status: StatusPayload | None = None
    telemetry: tuple[TelemetryPayload, datetime] | None = None
    reports: list[tuple[ModelReported, datetime]] = field(default_factory=list)


@dataclass
class _Batch:
    devices: dict[str, _DeviceUpdate] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    detections: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    refined: dict[str, dict[str, Any]] = field(default_factory=dict)
    crops: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    in_batch_duplicates: Counter[str] = field(default_factory=Counter)
    converted: dict[Any, Any] = field(default_factory=dict)  # bind values, shared by the batch's inserts

    def device(self, device_id: str) -> _DeviceUpdate:
        update = self.devices.get(device_id)
        if update is None:
            update = self.devices[device_id] = _DeviceUpdate()
        return update


def latency_p95(payload: TelemetryPayload) -> float | None:
    """The p95 the health gates use: the 'total' stage, else the sum of the stages reported."""
    stages = payload.latency_ms
    if "total" in stages:
        return stages["total"].p95
    if not stages:
        return None
    return sum(stage.p95 for stage in stages.values())


def _latency_p50(payload: TelemetryPayload) -> float | None:
    stages = payload.latency_ms
    if "total" in stages:
        return stages["total"].p50
    return sum(stage.p50 for stage in stages.values()) if stages else None


class Ingestor:
    """Decodes and writes device messages in batches; `start()` runs the writer thread."""

    def __init__(
        self,
        db: Database,
        topics: Topics,
        settings: IngestSettings | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.topics = topics
        self.settings = settings or IngestSettings()
        self.stats = IngestStats()
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sample: dict[str, datetime] = {}
        self._parsed_topics: dict[str, ParsedTopic] = {}
        self._listeners: list[Callable[[frozenset[str]], None]] = []
        self._inbox: deque[Incoming] = deque()  # submitted, not yet taken by the writer
        self._pending = 0  # submitted, not yet committed (or dropped)
        self._lock = threading.Lock()  # guards the inbox and the pending count; the conditions share it
        self._arrived = threading.Condition(self._lock)  # the writer waits for a first message, a full batch
        self._room = threading.Condition(self._lock)  # submit waits for room in the inbox
        self._idle = threading.Condition(self._lock)  # wait_idle waits for pending == 0

    # ---- feeding ----------------------------------------------------------------------------------------

    def submit(self, message: Incoming) -> None:
        """Queue a message for the writer; blocks while the queue is full (backpressure to the broker).

        Dropped (never acked: the broker sends it again) if the writer stops while the queue is full.
        """
        with self._lock:
            while len(self._inbox) >= self.settings.queue_max:
                if self._stop.is_set():
                    return
                if not self._room.wait(1.0):
                    log.warning(
                        "ingest queue full (%d messages): the database is not keeping up", len(self._inbox)
                    )
            self._inbox.append(message)
            self._pending += 1
            queued = len(self._inbox)
            if queued == 1 or queued == self._full_batch():  # what the writer may be waiting for
                self._arrived.notify()

    def add_listener(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Called after each committed batch with the topic kinds it held (e.g. to wake the controller)."""
        self._listeners.append(listener)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every submitted message is written (or dropped); tests and benchmarks."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    # ---- the writer thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (within `timeout`), then stop the writer."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.wait_idle(timeout)
        self._stop.set()
        with self._lock:
            self._arrived.notify_all()
            self._room.notify_all()
        thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._process_with_retry(batch)

    def _next_batch(self) -> list[Incoming]:
        """Up to `batch_max` messages, once that many queued or `flush_interval_s` after the first did;
        empty after a while with none (to check for a stop)."""
        full = self._full_batch()
        with self._lock:
            if not self._inbox and not self._arrived.wait(0.2):
                return []
            deadline = time.monotonic() + self.settings.flush_interval_s
            while len(self._inbox) < full and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
            inbox = self._inbox
            batch = [inbox.popleft() for _ in range(min(self.settings.batch_max, len(inbox)))]
            self._room.notify_all()
        return batch

    def _full_batch(self) -> int:
        """Messages that make a batch worth writing at once: `batch_max`, or a full queue if that is less."""
        return min(self.settings.batch_max, self.settings.queue_max)

    def _process_with_retry(self, batch: list[Incoming]) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                self.process(batch)
                return
            except (OperationalError, DBAPIError) as error:
                if isinstance(error, OperationalError) or error.connection_invalidated:
                    self._note_error(error)
                    log.warning("ingest: database unavailable (%s); retrying in %.1f s", error.orig, delay)
                    if self._stop.wait(delay):
                        return
                    delay = min(RETRY_MAX_S, delay * 2)
                    continue
                self._note_error(error)
                log.error(
                    "ingest: a batch of %d failed (%s); writing its messages one by one", len(batch), error
                )
                self._process_one_by_one(batch)
                return
            except Exception as error:
                self._note_error(error)
                log.exception("ingest: a batch of %d failed; writing its messages one by one", len(batch))
                self._process_one_by_one(batch)
                return

    def _process_one_by_one(self, batch: list[Incoming]) -> None:
        for message in batch:
            try:
                self.process([message])
            except Exception as error:
                self._note_error(error)
                kind = _kind_name(self.topics, message.topic)
                with self.stats._lock:
                    self.stats.malformed[f"{kind}:rejected_by_db"] += 1
                log.error("ingest: dropped a %s message the database refused: %s", kind, error)
                self._ack([message])
                self._done(1)

    def _note_error(self, error: Exception) -> None:
        with self.stats._lock:
            self.stats.write_errors += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"[:500]

    # ---- one batch -------------------------------------------------------------------------------------

    def process(self, messages: list[Incoming]) -> None:
        """Decode and write `messages` in one transaction, then ack them; raises on database errors."""
        batch = _Batch()
        malformed: Counter[str] = Counter()
        ignored = 0
        for message in messages:
            outcome = self._decode_into(batch, message)
            if outcome is None:
                ignored += 1
            elif outcome.startswith("malformed:"):
                malformed[outcome.removeprefix("malformed:")] += 1
        duplicates = Counter(batch.in_batch_duplicates)
        stored: Counter[str] = Counter()
        if batch.counts:
            with self.db.write() as session:
                self._write(session, batch, stored, duplicates)
        self._ack(messages)
        with self.stats._lock:
            self.stats.received.update(batch.counts)
            self.stats.received.update(malformed)
            self.stats.malformed.update(malformed)
            self.stats.duplicates.update(duplicates)
            self.stats.stored.update(stored)
            self.stats.ignored += ignored
            self.stats.batches += 1
        self._done(len(messages))
        kinds = frozenset(batch.counts)
        if kinds:
            for listener in list(self._listeners):
                try:
                    listener(kinds)
                except Exception:
                    log.exception("ingest listener %r failed", listener)

    def _ack(self, messages: list[Incoming]) -> None:
        """One `ack_many` per acknowledger (as a rule the one MQTT session), receipts in arrival order."""
        receipts: dict[Acknowledger, list[Any]] = {}
        for message in messages:
            if message.acker is not None:
                receipts.setdefault(message.acker, []).append(message.receipt)
        for acker, batch in receipts.items():
            try:
                acker.ack_many(batch)
            except Exception:
                log.exception("acknowledging %d messages failed", len(batch))

    def _done(self, count: int) -> None:
        with self._lock:
            self._pending = max(0, self._pending - count)
            if self._pending == 0:
                self._idle.notify_all()

    def _malformed(self, kind: str, topic: str, reason: str) -> str:
        with self.stats._lock:
            seen = self.stats.malformed[kind]
        if seen % _LOG_EVERY_MALFORMED == 0:
            log.warning("dropped a malformed %s message on %s: %s", kind, topic[:200], reason[:500])
        return f"malformed:{kind}"

    def _decode_into(self, batch: _Batch, message: Incoming) -> str | None:
        """Add `message` to `batch`; returns its kind, 'malformed:<kind>', or None when ignored."""
        try:
            parsed = self._parse_topic(message.topic)
        except TopicError as error:
            return self._malformed("topic", message.topic, str(error))
        kind = parsed.kind
        if kind in (TopicKind.MODEL_DESIRED, TopicKind.CMD):
            return None  # what the fleet manager itself publishes
        if not message.payload and kind in (TopicKind.STATUS, TopicKind.MODEL_REPORTED):
            return None  # a retained message deleted (a revoked device)
        name: str = kind.value
        try:
            if kind is TopicKind.CROPS:
                meta = CropMeta.from_user_properties(message.user_properties)
                check_crop_jpeg(message.payload)
                device_id = meta.device_id
            else:
                payload = decode(_MODEL_OF_KIND[kind], message.payload)
                device_id = payload.device_id
        except PayloadError as error:
            return self._malformed(name, message.topic, str(error))
        if device_id != parsed.device_id:
            return self._malformed(
                name,
                message.topic,
                f"payload device_id {device_id!r} is not the topic's {parsed.device_id!r}",
            )
        update = batch.device(device_id)
        if not message.retain and (update.last_seen is None or message.received_at > update.last_seen):
            update.last_seen = message.received_at
        received = message.received_at
        if kind is TopicKind.CROPS:
            if not self.settings.store_crops:
                batch.counts[name] += 1
                return name
            self._add_unique(
                batch, batch.crops, meta.det_id, name, _crop_row(meta, message.payload, received)
            )
        elif isinstance(payload, StatusPayload):
            update.status = payload
        elif isinstance(payload, TelemetryPayload):
            update.telemetry = (payload, received)
            last = self._last_sample.get(device_id)
            interval = timedelta(seconds=self.settings.telemetry_history_interval_s)
            if last is None or received - last >= interval:
                self._last_sample[device_id] = received
                batch.samples.append(_sample_row(payload, received))
        elif isinstance(payload, ModelReported):
            update.reports.append((payload, received))
        elif isinstance(payload, DetectionEvent):
            if self._add_unique(
                batch, batch.detections, payload.msg_id, name, _detection_row(payload, received)
            ):
                for item in payload.detections:
                    batch.objects.setdefault(item.det_id, _object_row(payload, item, received))
        elif isinstance(payload, RefinedPayload):
            self._add_unique(batch, batch.refined, payload.det_id, name, _refined_row(payload, received))
        batch.counts[name] += 1
        return name

    def _parse_topic(self, topic: str) -> ParsedTopic:
        parsed = self._parsed_topics.get(topic)
        if parsed is None:
            parsed = self.topics.parse(topic)
            if len(self._parsed_topics) >= TOPIC_CACHE_MAX:
                self._parsed_topics.clear()  # rare: simpler than evicting, and safe beside another caller
            self._parsed_topics[topic] = parsed
        return parsed

    @staticmethod
    def _add_unique(
        batch: _Batch, rows: dict[str, dict[str, Any]], key: str, kind: str, row: dict[str, Any]
    ) -> bool:
        if key in rows:
            batch.in_batch_duplicates[kind] += 1
            return False
        rows[key] = row
        return True

    def _write(self, session: Session, batch: _Batch, stored: Counter[str], duplicates: Counter[str]) -> None:
        if batch.devices:
            self._write_devices(session, batch.devices, stored)
        if batch.samples:
            session.execute(insert(TelemetrySample), batch.samples)
        for model, key, rows, kind in (
            (Detection, "msg_id", batch.detections, "detections"),
            (DetectionObject, "det_id", batch.objects, None),
            (Refinement, "det_id", batch.refined, "refined"),
            (Crop, "det_id", batch.crops, "crops"),
        ):
            if rows:
                self._insert_new(session, model, key, rows, kind, stored, duplicates, batch.converted)

    def _insert_new(
        self,
        session: Session,
        model: Any,
        key: str,
        rows: dict[str, dict[str, Any]],
        kind: str | None,
        stored: Counter[str],
        duplicates: Counter[str],
        converted: dict[Any, Any],
    ) -> None:
        # ON CONFLICT DO NOTHING drops the keys stored already (by an earlier batch, or a concurrent writer);
        # the rows it inserted (the driver's rowcount, summed over the executemany) are the new ones, the
        # rest duplicates: no SELECT of the keys first (a query per 500 keys, per table and batch).
        inserted = self.db.insert_ignore_many(session, model.__table__, [key], list(rows.values()), converted)
        if kind is not None:
            if inserted:
                stored[kind] += inserted
            if inserted < len(rows):
                duplicates[kind] += len(rows) - inserted

    def _write_devices(
        self, session: Session, updates: dict[str, _DeviceUpdate], stored: Counter[str]
    ) -> None:
        ids = sorted(updates)
        devices = {d.id: d for d in session.execute(select(Device).where(Device.id.in_(ids))).scalars()}
        now = self._clock()
        events: list[dict[str, Any]] = []
        for device_id in ids:
            update = updates[device_id]
            device = devices.get(device_id)
            if device is None:
                device = Device(id=device_id, created_at=now, state="unknown", providers=[], hardware={})
                device.provisioned = False
                session.add(device)
            if update.last_seen is not None and (
                device.last_seen_at is None or update.last_seen > device.last_seen_at
            ):
                device.last_seen_at = update.last_seen
            if update.status is not None:
                _apply_status(device, update.status)
                stored["status"] += 1
            if update.telemetry is not None:
                _apply_telemetry(device, *update.telemetry)
                stored["telemetry"] += 1
            for report, received in update.reports:
                event = _apply_report(device, report, received)
                if event is not None:
                    events.append(event)
                stored["model/reported"] += 1
        session.flush()
        if events:
            session.execute(self.db.insert_ignore(OtaEvent.__table__, ["msg_id"]), events)

    # ---- retention -------------------------------------------------------------------------------------

    def purge(self, retention: RetentionSettings, now: datetime | None = None) -> dict[str, int]:
        """Delete rows older than the retention settings; returns rows deleted per table."""
        now = now or self._clock()
        plan: list[tuple[Any, Any, float]] = [
            (Detection, Detection.received_at, retention.detections_days),
            (DetectionObject, DetectionObject.received_at, retention.detections_days),
            (Refinement, Refinement.received_at, retention.detections_days),
            (Crop, Crop.received_at, retention.crops_days),
            (TelemetrySample, TelemetrySample.ts, retention.telemetry_days),
            (OtaEvent, OtaEvent.received_at, retention.ota_events_days),
        ]
        deleted: dict[str, int] = {}
        for model, column, days in plan:
            cutoff = now - timedelta(days=days)
            with self.db.write() as session:
                result = session.execute(delete(model).where(column < cutoff))
                deleted[model.__tablename__] = int(getattr(result, "rowcount", 0) or 0)
        return deleted


_MODEL_OF_KIND: dict[TopicKind, Any] = {
    TopicKind.STATUS: StatusPayload,
    TopicKind.TELEMETRY: TelemetryPayload,
    TopicKind.DETECTIONS: DetectionEvent,
    TopicKind.REFINED: RefinedPayload,
    TopicKind.MODEL_REPORTED: ModelReported,
}


def _kind_name(topics: Topics, topic: str) -> str:
    try:
        return topics.parse(topic).kind.value
    except TopicError:
        return "topic"


def _apply_status(device: Device, status: StatusPayload) -> None:
    if device.status_at is not None and status.ts < device.status_at and status.state.value != "offline":
        return  # an older birth than what we have (a will is always taken: the broker sends it last)
    device.state = status.state.value
    device.status_at = status.ts
    device.agent_version = status.agent_version
    if status.active_model is not None:
        device.active_model_name = status.active_model.name
        device.active_model_version = status.active_model.version
    if status.providers:
        device.providers = list(status.providers)
    if status.hardware:
        device.hardware = dict(status.hardware)


def _apply_telemetry(device: Device, payload: TelemetryPayload, received: datetime) -> None:
    device.telemetry = payload.model_dump(mode="json", exclude={"schema_name"})
    device.telemetry_at = received
    device.fps = payload.fps
    device.latency_p95_ms = latency_p95(payload)


def _apply_report(device: Device, report: ModelReported, received: datetime) -> dict[str, Any] | None:
    """Update the device's OTA state; a history row when the state, model or rollout changed."""
    model = report.model
    changed = (
        device.ota_state != report.state.value
        or device.ota_rollout_id != report.rollout_id
        or device.ota_model_name != (model.name if model else None)
        or device.ota_model_version != (model.version if model else None)
    )
    device.ota_state = report.state.value
    device.ota_rollout_id = report.rollout_id
    device.ota_model_name = model.name if model else None
    device.ota_model_version = model.version if model else None
    device.ota_progress = report.progress
    device.ota_error = report.error
    device.ota_previous_name = report.previous_model.name if report.previous_model else None
    device.ota_previous_version = report.previous_model.version if report.previous_model else None
    device.ota_at = received
    if report.state is OtaState.ACTIVE and model is not None:
        device.active_model_name, device.active_model_version = model.name, model.version
    if not changed:
        return None
    return {
        "msg_id": report.msg_id,
        "device_id": report.device_id,
        "ts": report.ts,
        "received_at": received,
        "rollout_id": report.rollout_id,
        "state": report.state.value,
        "model_name": model.name if model else None,
        "model_version": model.version if model else None,
        "error": report.error,
        "previous_name": report.previous_model.name if report.previous_model else None,
        "previous_version": report.previous_model.version if report.previous_model else None,
    }


def _sample_row(payload: TelemetryPayload, received: datetime) -> dict[str, Any]:
    return {
        "device_id": payload.device_id,
        "ts": received,
        "fps": payload.fps,
        "latency_p50_ms": _latency_p50(payload),
        "latency_p95_ms": latency_p95(payload),
        "cpu_percent": payload.cpu_percent,
        "memory_mb": payload.memory_mb,
        "temperature_c": payload.temperature_c,
        "link_rtt_ms": payload.link_rtt_ms,
        "outbox_depth": payload.outbox.depth,
        "outbox_dropped": sum(payload.outbox.dropped.values()),
        "frames_dropped": payload.frames_dropped,
        "latency_ms": {k: v.model_dump() for k, v in payload.latency_ms.items()},
    }


def _detection_row(event: DetectionEvent, received: datetime) -> dict[str, Any]:
    return {
        "msg_id": event.msg_id,
        "device_id": event.device_id,
        "ts": event.ts,
        "received_at": received,
        "source": event.source,
        "frame_seq": event.frame_seq,
        "model_name": event.model.name,
        "model_version": event.model.version,
        "width": event.width,
        "height": event.height,
        "pre_ms": event.timing_ms.pre,
        "infer_ms": event.timing_ms.infer,
        "post_ms": event.timing_ms.post,
        "object_count": len(event.detections),
    }


def _object_row(event: DetectionEvent, item: Any, received: datetime) -> dict[str, Any]:
    return {
        "det_id": item.det_id,
        "msg_id": event.msg_id,
        "device_id": event.device_id,
        "received_at": received,
        "class_id": item.class_id,
        "label": item.label,
        "confidence": item.confidence,
        "x1": item.bbox[0],
        "y1": item.bbox[1],
        "x2": item.bbox[2],
        "y2": item.bbox[3],
        "track_id": item.track_id,
    }


def _refined_row(payload: RefinedPayload, received: datetime) -> dict[str, Any]:
    return {
        "det_id": payload.det_id,
        "msg_id": payload.msg_id,
        "device_id": payload.device_id,
        "ts": payload.ts,
        "received_at": received,
        "edge_label": payload.edge_label,
        "refined_label": payload.refined_label,
        "score": payload.score,
        "top_k": [entry.model_dump() for entry in payload.top_k],
        "refiner_name": payload.refiner_model.name,
        "refiner_version": payload.refiner_model.version,
        "latency_ms": payload.latency_ms,
    }


def _crop_row(meta: CropMeta, jpeg: bytes, received: datetime) -> dict[str, Any]:
    return {
        "det_id": meta.det_id,
        "msg_id": meta.msg_id,
        "device_id": meta.device_id,
        "ts": meta.ts,
        "received_at": received,
        "label": meta.label,
        "confidence": meta.confidence,
        "jpeg": jpeg,
    }
