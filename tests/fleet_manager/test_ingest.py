"""MQTT ingest into the fleet database, on SQLite and PostgreSQL: state, telemetry, OTA, detections,
refined labels, crops; duplicates ignored; malformed messages counted and dropped, never fatal."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from fleet_manager.config import IngestSettings, RetentionSettings
from fleet_manager.db import Database
from fleet_manager.devices import ota_history, recent_detections, telemetry_history
from fleet_manager.ingest import Incoming, Ingestor
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
from fleet_manager.service import FleetService
from fleet_protocol.ids import new_det_id
from fleet_protocol.mqtt import MessageProperties, MqttSession, MqttSettings
from fleet_protocol.payloads import (
    CropMeta,
    DetectionEvent,
    DetectionItem,
    DeviceState,
    LabelScore,
    ModelRef,
    ModelReported,
    OtaState,
    OutboxStats,
    RefinedPayload,
    StageLatency,
    StageTimingMs,
    StatusPayload,
    TelemetryPayload,
    encode,
)
from fleet_protocol.topics import Topics
from tests.broker import MosquittoBroker
from tests.fleet_manager.conftest import topics_of, wait_until

MODEL = ModelRef(name="yolov8n", version="1")


def detection(device_id: str, labels: list[str], seq: int = 1) -> DetectionEvent:
    items = [
        DetectionItem(
            det_id=new_det_id(), class_id=i, label=label, confidence=0.8, bbox=(1, 2, 30, 40), track_id=i
        )
        for i, label in enumerate(labels)
    ]
    return DetectionEvent(
        device_id=device_id,
        source="cam0",
        frame_seq=seq,
        model=MODEL,
        width=640,
        height=480,
        timing_ms=StageTimingMs(pre=1.0, infer=10.0, post=1.0),
        detections=items,
    )


def telemetry(device_id: str, p95: float = 25.0) -> TelemetryPayload:
    return TelemetryPayload(
        device_id=device_id,
        interval_s=1.0,
        fps=12.5,
        latency_ms={"total": StageLatency(p50=p95 / 2, p95=p95)},
        outbox=OutboxStats(depth=3, bytes=1000, dropped={"crops": 2}),
        cpu_percent=40.0,
        memory_mb=300.0,
    )


def refined(device_id: str, det_id: str) -> RefinedPayload:
    return RefinedPayload(
        device_id=device_id,
        det_id=det_id,
        edge_label="dog",
        refined_label="golden retriever",
        score=0.91,
        top_k=[LabelScore(label="golden retriever", score=0.91)],
        refiner_model=ModelRef(name="efficientnet-lite2", version="1"),
        latency_ms=12.0,
    )


JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 100


def device_session(broker: MosquittoBroker, root: str) -> MqttSession:
    session = MqttSession(
        MqttSettings(
            host=broker.host, port=broker.port, client_id=f"dev-{root}", clean_start=True, topic_root=root
        )
    )
    session.connect()
    assert session.wait_connected(10)
    return session


def test_ingest_over_mqtt(mqtt_broker: MosquittoBroker, make_service) -> None:  # type: ignore[no-untyped-def]
    service: FleetService = make_service(mqtt_broker)
    topics = topics_of(service)
    device = "cam-1"
    publisher = device_session(mqtt_broker, topics.root)
    try:
        status = StatusPayload(
            device_id=device,
            state=DeviceState.ONLINE,
            agent_version="0.1.0",
            active_model=MODEL,
            providers=["cpu"],
        )
        publisher.publish(topics.status(device), encode(status), retain=True).wait(5)
        for p95 in (20.0, 30.0, 40.0):
            publisher.publish(topics.telemetry(device), encode(telemetry(device, p95)), qos=1).wait(5)
        event = detection(device, ["dog", "person"])
        dog = event.detections[0].det_id
        for _ in range(3):  # at-least-once delivery: the same message three times
            publisher.publish(topics.detections(device), encode(event)).wait(5)
        publisher.publish(topics.refined(device), encode(refined(device, dog))).wait(5)
        meta = CropMeta(
            device_id=device,
            det_id=dog,
            label="dog",
            class_id=16,
            confidence=0.8,
            bbox=(1, 2, 30, 40),
            model=MODEL,
        )
        props = MessageProperties(content_type="image/jpeg", user_properties=tuple(meta.to_user_properties()))
        publisher.publish(topics.crops(device), JPEG, properties=props).wait(5)
        report = ModelReported(device_id=device, rollout_id="ro-1", model=MODEL, state=OtaState.DOWNLOADING)
        publisher.publish(topics.model_reported(device), encode(report), retain=True).wait(5)
        # Garbage of every kind: none of it may stop ingest.
        publisher.publish(topics.detections(device), b"{not json").wait(5)
        publisher.publish(topics.detections(device), encode(detection("someone-else", ["cat"]))).wait(5)
        publisher.publish(
            topics.telemetry(device), json.dumps({"schema": "edgefleet.telemetry/1"}).encode()
        ).wait(5)
        publisher.publish(f"{topics.root}/devices/{device}/nonsense", b"{}").wait(5)
        publisher.publish(topics.crops(device), b"not a jpeg", properties=props).wait(5)
        publisher.publish(topics.status(device), b"\xff\xfe", retain=False).wait(5)
        later = detection(device, ["car"], seq=2)
        publisher.publish(topics.detections(device), encode(later)).wait(5)

        def stored() -> bool:
            with service.db.read() as s:
                return s.get(Detection, later.msg_id) is not None and s.get(Crop, dog) is not None

        wait_until(stored, 10, "the detections and the crop to be stored")
        wait_until(
            lambda: sum(service.ingestor.stats.snapshot()["malformed"].values()) >= 6, 10, "malformed counts"
        )
        stats = service.ingestor.stats.snapshot()
        assert stats["malformed"] == {"detections": 2, "telemetry": 1, "topic": 1, "crops": 1, "status": 1}
        assert stats["duplicates"]["detections"] == 2

        with service.db.read() as s:
            row = s.get(Device, device)
            assert row is not None
            assert row.state == "online"
            assert not row.provisioned
            assert (row.active_model_name, row.active_model_version) == ("yolov8n", "1")
            assert row.latency_p95_ms == 40.0
            assert row.fps == 12.5
            assert row.last_seen_at is not None
            assert row.ota_state == "downloading"
            assert row.ota_rollout_id == "ro-1"
            assert s.execute(select(func.count()).select_from(Detection)).scalar_one() == 2
            assert s.execute(select(func.count()).select_from(DetectionObject)).scalar_one() == 3
            assert [x.latency_p95_ms for x in telemetry_history(s, device)] == [20.0, 30.0, 40.0]
            assert [e.state for e in ota_history(s, device)] == ["downloading"]
            views = recent_detections(s, device)
            assert [v.event.frame_seq for v in views] == [2, 1]
            objects = {o["label"]: o for o in views[1].objects}
            assert objects["dog"]["refined"]["label"] == "golden retriever"
            assert objects["dog"]["has_crop"]
            assert objects["person"]["refined"] is None
            assert not objects["person"]["has_crop"]
            assert s.get(Device, "someone-else") is None

        # The will: the broker announces the device offline.
        offline = StatusPayload(device_id=device, state=DeviceState.OFFLINE, agent_version="0.1.0")
        publisher.publish(topics.status(device), encode(offline), retain=True).wait(5)

        def is_offline() -> bool:
            with service.db.read() as s:
                d = s.get(Device, device)
                return d is not None and d.state == "offline"

        wait_until(is_offline, 10, "the device to be offline")
    finally:
        publisher.disconnect()


def incoming(topics: Topics, kind: str, device: str, payload: bytes, at=None, **kw) -> Incoming:  # type: ignore[no-untyped-def]
    return Incoming(
        topic=f"{topics.device_prefix(device)}/{kind}", payload=payload, received_at=at or utcnow(), **kw
    )


class CommittedAcks:
    """An acknowledger that records each `ack_many` call, and what the database held at that moment."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls: list[list[str]] = []
        self.detections_stored: list[int] = []

    def ack_many(self, receipts: Sequence[str]) -> None:
        self.calls.append(list(receipts))
        with self.db.read() as s:
            self.detections_stored.append(s.execute(select(func.count()).select_from(Detection)).scalar_one())


def test_batches_duplicates_order_downsampling_and_retention(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service: FleetService = make_service(None, start=False)
    topics = Topics("edgefleet/v1")
    ingestor = Ingestor(service.db, topics, IngestSettings(telemetry_history_interval_s=60))
    device = "cam-2"
    now = utcnow()
    event = detection(device, ["dog"])
    det = event.detections[0].det_id
    acks = CommittedAcks(service.db)
    # The refined label before its detection (a refiner may be quicker than the fleet manager's batch).
    ingestor.process(
        [incoming(topics, "refined", device, encode(refined(device, det)), acker=acks, receipt="r")]
    )
    ingestor.process(
        [
            incoming(topics, "detections", device, encode(event), acker=acks, receipt="d1"),
            incoming(topics, "detections", device, b"{not json", acker=acks, receipt="bad"),
            incoming(topics, "detections", device, encode(event), acker=acks, receipt="d2"),
            incoming(topics, "telemetry", device, encode(telemetry(device, 10)), at=now),
            incoming(
                topics, "telemetry", device, encode(telemetry(device, 20)), at=now + timedelta(seconds=30)
            ),
            incoming(
                topics, "telemetry", device, encode(telemetry(device, 30)), at=now + timedelta(seconds=61)
            ),
        ]
    )
    ingestor.process([incoming(topics, "detections", device, encode(event))])  # a later redelivery
    # One call per batch, in arrival order: duplicates and malformed messages too, once committed.
    assert acks.calls == [["r"], ["d1", "bad", "d2"]]
    assert acks.detections_stored == [0, 1]
    stats = ingestor.stats.snapshot()
    assert stats["duplicates"] == {"detections": 2}
    assert stats["stored"]["detections"] == 1
    with service.db.read() as s:
        assert [x.latency_p95_ms for x in telemetry_history(s, device)] == [10.0, 30.0]  # one per 60 s
        assert s.get(Device, device).latency_p95_ms == 30.0  # type: ignore[union-attr]
        (view,) = recent_detections(s, device)
        assert view.objects[0]["refined"]["label"] == "golden retriever"

    # Retention: everything received "long ago" goes; the audit log is not touched by it.
    old = now - timedelta(days=40)
    old_event = detection(device, ["cat"])
    ingestor.process([incoming(topics, "detections", device, encode(old_event), at=old)])
    report = ModelReported(device_id=device, model=MODEL, state=OtaState.ACTIVE)
    ingestor.process([incoming(topics, "model/reported", device, encode(report), at=old)])
    deleted = ingestor.purge(RetentionSettings(detections_days=7, telemetry_days=30, ota_events_days=30))
    assert deleted["detections"] == 1
    assert deleted["detection_objects"] == 1
    assert deleted["ota_events"] == 1
    with service.db.read() as s:
        assert s.get(Detection, old_event.msg_id) is None
        assert s.get(Detection, event.msg_id) is not None
        assert s.get(Refinement, det) is not None
        assert s.execute(select(func.count()).select_from(OtaEvent)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(TelemetrySample)).scalar_one() == 2


def test_batched_acks_keep_a_small_receive_window_moving(mqtt_broker: MosquittoBroker, make_service) -> None:  # type: ignore[no-untyped-def]
    """The broker sends at most `queue_max` unacknowledged messages: four times that many get through only
    if every committed batch is acknowledged."""
    service: FleetService = make_service(mqtt_broker, ingest={"queue_max": 100, "batch_max": 30})
    topics = topics_of(service)
    publisher = device_session(mqtt_broker, topics.root)
    try:
        events = [detection(f"cam-{i % 4}", ["person"], seq=i) for i in range(400)]
        handles = [publisher.publish(topics.detections(e.device_id), encode(e), qos=1) for e in events]
        assert all(handle.wait(10) for handle in handles)
        wait_until(
            lambda: service.ingestor.stats.snapshot()["stored"].get("detections", 0) == len(events),
            20,
            "every detection to be stored",
        )
        assert service.ingestor.stats.snapshot()["batches"] >= len(events) // 30
    finally:
        publisher.disconnect()


def test_submit_waits_for_room_and_the_writer_drains_in_batches(make_service) -> None:  # type: ignore[no-untyped-def]
    service: FleetService = make_service(None, start=False)
    topics = Topics("edgefleet/v1")
    settings = IngestSettings(queue_max=100, batch_max=30, flush_interval_s=0.01)
    ingestor = Ingestor(service.db, topics, settings)
    acks = CommittedAcks(service.db)
    messages = [
        incoming(
            topics,
            "detections",
            "cam-3",
            encode(detection("cam-3", ["car"], seq=i)),
            acker=acks,
            receipt=f"m{i}",
        )
        for i in range(101)
    ]
    for message in messages[:100]:
        ingestor.submit(message)
    late = threading.Thread(target=ingestor.submit, args=(messages[100],))
    late.start()
    late.join(0.3)
    assert late.is_alive()  # the queue is full: the adapter (paho's thread) waits, the broker holds the rest

    ingestor.start()
    try:
        late.join(5)
        assert not late.is_alive()
        assert ingestor.wait_idle(10)
    finally:
        ingestor.stop()
    assert ingestor.stats.snapshot()["stored"] == {"detections": 101}
    assert max(len(call) for call in acks.calls) <= 30
    assert [receipt for call in acks.calls for receipt in call] == [f"m{i}" for i in range(101)]
