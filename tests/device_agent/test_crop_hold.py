"""Crops wait on a slow or dead link while detections flow, against a real Mosquitto and a real agent.

A slow link is forced with a hold threshold of 0 ms: every real loopback round trip is above it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from device_agent.config import ConfigError, load_settings
from device_agent.outbox import MessageKind, Outbox, OutboxLimits, OutboxMessage
from device_agent.publisher import CropHold, OutboxPublisher
from device_agent.telemetry import TelemetryCollector
from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import MqttSession
from fleet_protocol.payloads import TelemetryPayload, decode, encode
from fleet_protocol.topics import Topics
from tests.broker import Inbox, MosquittoBroker, free_port
from tests.device_agent.test_publisher import Collector, settings_for

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
SLOW_LINK = {"crop_hold_rtt_ms": 0.0, "crop_resume_rtt_ms": 0.0}  # any real round trip holds crops


def message(topic: str, kind: MessageKind, size: int) -> OutboxMessage:
    msg_id = new_msg_id()
    payload = msg_id.encode() + b" " + b"x" * (size - len(msg_id) - 1)
    return OutboxMessage(msg_id=msg_id, topic=topic, payload=payload, kind=kind)


def frame(root: str, crops: int, crop_bytes: int = 2000) -> list[OutboxMessage]:
    """What the pipeline enqueues for one frame: its detection event, then the crops cut from it."""
    return [message(f"{root}/detections", MessageKind.DETECTION, 300)] + [
        message(f"{root}/crops", MessageKind.CROP, crop_bytes) for _ in range(crops)
    ]


class Device:
    """An outbox, a session and a publisher over them, as the agent wires them."""

    def __init__(
        self, broker: MosquittoBroker, path: Path, limits: OutboxLimits = OutboxLimits(), **options: object
    ) -> None:
        self.outbox = Outbox(path, limits)
        self.session = MqttSession(settings_for(broker, "hold"))
        self.publisher = OutboxPublisher(self.outbox, self.session, **options)  # type: ignore[arg-type]
        self.session.connect()
        assert self.session.wait_connected(10)
        self.publisher.start()

    def enqueue(self, messages: list[OutboxMessage]) -> None:
        self.outbox.enqueue(messages)
        self.publisher.notify()

    def hold_crops(self, root: str) -> None:
        """Publish one detection, whose round trip (over 0 ms) puts the hold on."""
        self.enqueue(frame(root, crops=0))
        assert self.publisher.flush(10)
        assert self.publisher.crops_held

    def close(self) -> None:
        self.publisher.stop()
        self.session.disconnect()
        self.outbox.close()


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    opened: list[Device] = []
    yield opened
    for device in opened:
        device.close()


def arrived(collector: Collector, kind: str) -> list[str]:
    """msg_ids of one kind ('detections' or 'crops') in the order they arrived."""
    return [m.payload.split(b" ", 1)[0].decode() for m in collector.messages if m.topic.endswith(kind)]


def test_detections_flow_while_crops_wait_then_every_crop_arrives_in_order(
    mqtt_broker: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    collector = Collector(mqtt_broker, "t/hold/#")
    rtts: list[float] = []
    device = Device(
        mqtt_broker, tmp_path / "outbox.db", on_rtt=rtts.append, rtt_probe_interval_s=60.0, **SLOW_LINK
    )
    devices.append(device)
    device.hold_crops("t/hold/cam-1")
    frames = [frame("t/hold/cam-1", crops=2) for _ in range(30)]
    detections = [f[0].msg_id for f in frames]
    crops = [m.msg_id for f in frames for m in f[1:]]

    for batch in frames:
        device.enqueue(batch)

    assert device.publisher.flush(10), "held crops must not keep flush (and so shutdown) waiting"
    assert not collector.wait_for_ids(set(detections), 10)
    time.sleep(0.3)  # time for a wrongly released crop to arrive
    assert arrived(collector, "detections")[1:] == detections  # FIFO among detections
    assert arrived(collector, "crops") == []
    stats = device.outbox.stats()
    assert (stats.waiting["crop"], stats.waiting["detection"]) == (60, 0)
    assert len(rtts) == 1
    assert rtts[0] > 0
    report = TelemetryCollector("cam-1").snapshot(stats, 0, crops_held=device.publisher.crops_held)
    wire = decode(TelemetryPayload, encode(report)).outbox
    assert (wire.crops_held, wire.crops_waiting, wire.depth) == (True, 60, 60)

    device.publisher.set_crop_hold(60_000.0, 30_000.0)  # the link is fine again: the next probe releases

    assert not collector.wait_for_ids(set(crops), 15), "held crops were lost"
    assert device.publisher.flush(10)
    collector.session.disconnect()
    assert not device.publisher.crops_held
    assert arrived(collector, "crops") == crops  # FIFO among crops, each once
    assert device.outbox.stats().depth == 0
    assert device.publisher.counters().acked == 1 + len(detections) + len(crops)


def test_held_crops_obey_the_outbox_cap_oldest_dropped_first_and_counted(
    mqtt_broker: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    collector = Collector(mqtt_broker, "t/cap/#")
    cap = 30_000
    device = Device(
        mqtt_broker,
        tmp_path / "outbox.db",
        OutboxLimits(max_bytes=cap),
        rtt_probe_interval_s=60.0,
        **SLOW_LINK,
    )
    devices.append(device)
    device.hold_crops("t/cap/cam-1")
    frames = [frame("t/cap/cam-1", crops=1) for _ in range(50)]  # 100 kB of crops for a 30 kB outbox

    for batch in frames:
        device.enqueue(batch)
        assert device.outbox.stats().bytes <= cap

    assert device.publisher.flush(10)
    assert not collector.wait_for_ids({f[0].msg_id for f in frames}, 10), "a detection was lost"
    stats = device.outbox.stats()
    dropped = stats.dropped["crop"]
    assert dropped > 0
    assert stats.dropped["detection"] == 0
    assert stats.waiting["crop"] == 50 - dropped

    device.publisher.set_crop_hold(None)
    crops = [f[1].msg_id for f in frames]
    survivors = crops[dropped:]  # the oldest crops went first

    assert not collector.wait_for_ids(set(survivors), 15)
    assert device.publisher.flush(10)
    time.sleep(0.3)
    collector.session.disconnect()
    assert arrived(collector, "crops") == survivors  # no dropped crop was sent from memory
    assert device.outbox.stats().depth == 0


def test_held_crops_that_expire_are_not_sent_and_the_others_are(
    mqtt_broker: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    collector = Collector(mqtt_broker, "t/expire/#")
    limits = OutboxLimits(max_age_s=60.0)
    device = Device(mqtt_broker, tmp_path / "outbox.db", limits, rtt_probe_interval_s=60.0, **SLOW_LINK)
    devices.append(device)
    device.hold_crops("t/expire/cam-1")
    crops = [message("t/expire/cam-1/crops", MessageKind.CROP, 500) for _ in range(20)]
    old = {crop.msg_id for crop in crops[::2]}
    crops = [  # every other crop was made two minutes ago: past max_age_s
        OutboxMessage(c.msg_id, c.topic, c.payload, c.kind, created_at=time.time() - 120 * (c.msg_id in old))
        for c in crops
    ]
    for start in range(0, len(crops), 4):
        device.enqueue(crops[start : start + 4])

    assert device.outbox.expire() == len(old)
    device.publisher.set_crop_hold(None)

    fresh = [c.msg_id for c in crops if c.msg_id not in old]
    assert not collector.wait_for_ids(set(fresh), 15), "a crop that had not expired was lost"
    assert device.publisher.flush(10)
    time.sleep(0.3)
    collector.session.disconnect()
    assert arrived(collector, "crops") == fresh
    assert device.outbox.stats().depth == 0


def test_crops_are_held_while_the_link_is_down_and_all_arrive_after(
    private_broker: MosquittoBroker, tmp_path: Path, devices: list[Device]
) -> None:
    collector = Collector(private_broker, "t/down/#")
    device = Device(private_broker, tmp_path / "outbox.db", crop_hold_rtt_ms=None)
    devices.append(device)
    assert not device.publisher.crops_held
    private_broker.stop()
    deadline = time.monotonic() + 10
    while device.session.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    frames = [frame("t/down/cam-1", crops=2) for _ in range(10)]

    for batch in frames:
        device.enqueue(batch)

    assert device.publisher.crops_held
    assert device.publisher.counters().crops_held
    private_broker.start()
    assert not collector.wait_for_ids({m.msg_id for f in frames for m in f}, 20)
    assert device.publisher.flush(10)
    collector.session.disconnect()
    assert not device.publisher.crops_held
    assert device.outbox.stats().depth == 0


def test_hold_and_resume_thresholds_have_hysteresis() -> None:
    hold = CropHold(1500.0, 500.0)
    judged = [hold.observe(rtt) for rtt in (100, 1499, 1600, 1000, 501, 499, 1000, 1501)]

    assert judged == [False, False, True, True, True, False, False, True]
    assert CropHold(None).observe(1e9) is False
    assert CropHold(200.0).resume_ms == 200.0
    for bad in [(100.0, 200.0), (-1.0, None), (float("nan"), None)]:
        with pytest.raises(ValueError, match="crop hold thresholds"):
            CropHold(*bad)


def test_link_settings_refuse_a_resume_threshold_above_the_hold_one(int8_model: Path) -> None:
    base = {
        "device_id": "cam-1",
        "model": {"path": str(int8_model)},
        "sources": [{"id": "a", "kind": "images", "uri": "x"}],
    }

    settings = load_settings(None, **base, link={"crop_hold_rtt_ms": 800, "crop_resume_rtt_ms": 300})

    assert (settings.link.crop_hold_rtt_ms, settings.link.crop_resume_rtt_ms) == (800, 300)
    with pytest.raises(ConfigError, match="crop_resume_rtt_ms"):
        load_settings(None, **base, link={"crop_hold_rtt_ms": 300, "crop_resume_rtt_ms": 800})


def test_the_agent_holds_crops_on_a_slow_link_keeps_detecting_and_stops_promptly(
    mqtt_broker: MosquittoBroker, int8_model: Path, shared: Path, tmp_path: Path
) -> None:
    device_id = f"hold-{new_msg_id()[-8:].lower()}"
    config = {
        "device_id": device_id,
        "data_dir": str(tmp_path / "data"),
        "broker": {"host": mqtt_broker.host, "port": mqtt_broker.port},
        "model": {"path": str(int8_model), "classes": ["person"]},
        "sources": [{"id": "hall", "kind": "video", "uri": str(shared / "data" / "video" / "vtest.avi")}],
        "publish": {"mode": "every_frame"},
        "crops": {"max_side": 96, "bytes_per_second": 1_000_000, "confidence_change": 0.05},
        "link": {"rtt_probe_interval_s": 60.0, **SLOW_LINK},
        "telemetry_interval_s": 1.0,
        "api": {"enabled": False, "port": free_port()},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    inbox = Inbox()
    watch = MqttSession(settings_for(mqtt_broker, "watch-hold"))
    watch.subscribe(Topics().device_prefix(device_id) + "/#", inbox)
    watch.connect()
    assert watch.wait_connected(10)
    process = subprocess.Popen([EDGEFLEET, "agent", "run", "--config", str(path)], stderr=subprocess.PIPE)
    try:

        def held_report() -> TelemetryPayload | None:
            reports = [decode(TelemetryPayload, m.payload) for m in inbox.of("/telemetry")]
            return next(
                (r for r in reversed(reports) if r.outbox.crops_held and r.outbox.crops_waiting), None
            )

        assert inbox.wait_for(lambda _: held_report() is not None, 90), (
            process.stderr.read1().decode()
            if process.poll() is not None and process.stderr
            else inbox.of("/telemetry")
        )
        crops_then, detections_then = len(inbox.of("/crops")), len(inbox.of("/detections"))
        waiting_then = held_report().outbox.crops_waiting  # type: ignore[union-attr]

        assert inbox.wait_for(lambda _: len(inbox.of("/detections")) >= detections_then + 10, 30)
        assert inbox.wait_for(lambda _: held_report().outbox.crops_waiting > waiting_then, 10)  # type: ignore[union-attr]
        assert len(inbox.of("/crops")) == crops_then  # detections go on, crops wait
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - started < 5.5  # held crops do not hold up the shutdown flush
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        watch.disconnect()
    with Outbox(Path(config["data_dir"]) / "outbox.sqlite3") as outbox:
        assert outbox.stats().waiting["crop"] >= waiting_then  # still there for the next run
