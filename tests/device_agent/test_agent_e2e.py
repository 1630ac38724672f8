"""`edgefleet agent run` as a real process on vtest.avi, publishing to the session's real Mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import yaml

from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import MqttSession, MqttSettings
from fleet_protocol.payloads import (
    CropMeta,
    DetectionEvent,
    LabelScore,
    ModelRef,
    RefinedPayload,
    StatusPayload,
    TelemetryPayload,
    decode,
    encode,
)
from fleet_protocol.topics import Topics
from tests.broker import Inbox, MosquittoBroker, free_port

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
TOPICS = Topics()


def subscriber(broker: MosquittoBroker, topic_filter: str, inbox: Inbox) -> MqttSession:
    session = MqttSession(
        MqttSettings(host=broker.host, port=broker.port, client_id=f"watch-{new_msg_id()}", clean_start=True)
    )
    session.subscribe(topic_filter, inbox)
    session.connect()
    assert session.wait_connected(10)
    return session


@pytest.fixture
def agent_config(mqtt_broker: MosquittoBroker, int8_model: Path, shared: Path, tmp_path: Path) -> Path:
    config = {
        "device_id": f"e2e-{new_msg_id()[-8:].lower()}",
        "data_dir": str(tmp_path / "data"),
        "broker": {"host": mqtt_broker.host, "port": mqtt_broker.port, "keepalive_s": 5},
        "model": {"path": str(int8_model), "classes": ["person"]},
        "sources": [{"id": "hall", "kind": "video", "uri": str(shared / "data" / "video" / "vtest.avi")}],
        "publish": {"mode": "every_frame"},
        "crops": {"max_side": 160, "bytes_per_second": 1_000_000},
        "telemetry_interval_s": 1.0,
        "api": {"port": free_port()},
        "produced_log": str(tmp_path / "produced.txt"),
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def running_agent(agent_config: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict]]:  # type: ignore[type-arg]
    config = yaml.safe_load(agent_config.read_text())
    process = subprocess.Popen(
        [EDGEFLEET, "agent", "run", "--config", str(agent_config)], stderr=subprocess.PIPE
    )
    try:
        yield process, config
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_agent_publishes_events_and_crops_and_its_will_fires_on_kill_9(
    mqtt_broker: MosquittoBroker,
    running_agent: tuple[subprocess.Popen[bytes], dict],  # type: ignore[type-arg]
) -> None:
    process, config = running_agent
    device_id = config["device_id"]
    inbox = Inbox()
    watch = subscriber(mqtt_broker, TOPICS.device_prefix(device_id) + "/#", inbox)
    try:
        assert inbox.wait_for(
            lambda _: len(inbox.of("/detections")) >= 20 and len(inbox.of("/crops")) >= 5, 90
        ), (
            process.stderr.read1().decode()
            if process.poll() is not None and process.stderr
            else "too few messages"
        )
        events = [decode(DetectionEvent, m.payload) for m in inbox.of("/detections")]
        assert all(d.label == "person" for e in events for d in e.detections)
        assert sum(len(e.detections) for e in events) > 40
        assert [e.frame_seq for e in events] == sorted(e.frame_seq for e in events)
        det_ids = {d.det_id for e in events for d in e.detections}
        for crop in inbox.of("/crops")[:5]:
            props = crop.properties
            assert props.content_type == "image/jpeg"
            assert props.response_topic == TOPICS.refined(device_id)
            meta = CropMeta.from_user_properties(props.user_properties)
            assert props.correlation_data == meta.det_id.encode()
            assert meta.det_id in det_ids
            assert meta.label == "person"
            image = cv2.imdecode(np.frombuffer(crop.payload, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None
            assert max(image.shape[:2]) <= 160
        assert inbox.wait_for(lambda _: len(inbox.of("/telemetry")) >= 1, 10)
        telemetry = decode(TelemetryPayload, inbox.of("/telemetry")[-1].payload)
        assert telemetry.fps > 0
        assert "infer" in telemetry.latency_ms

        retained = Inbox()
        late = subscriber(mqtt_broker, TOPICS.status(device_id), retained)
        assert retained.wait_for(lambda messages: len(messages) >= 1, 10)
        assert retained.messages[0].retain
        assert decode(StatusPayload, retained.messages[0].payload).state.value == "online"
        late.disconnect()

        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert inbox.wait_for(
            lambda _: any(
                decode(StatusPayload, m.payload).state.value == "offline" for m in inbox.of("/status")
            ),
            20,
        )
        produced = set(Path(config["produced_log"]).read_text().split())
        received = {decode(DetectionEvent, m.payload).msg_id for m in inbox.of("/detections")}
        assert received <= produced  # everything that arrived was recorded as committed first
    finally:
        watch.disconnect()


def test_local_api_status_events_refined_labels_and_malformed_messages(
    mqtt_broker: MosquittoBroker,
    running_agent: tuple[subprocess.Popen[bytes], dict],  # type: ignore[type-arg]
) -> None:
    process, config = running_agent
    device_id = config["device_id"]
    base = f"http://127.0.0.1:{config['api']['port']}"
    events: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(e["detections"] for e in events):
        time.sleep(0.5)
        try:
            events = httpx.get(f"{base}/v1/events?limit=5", timeout=5).json()
        except httpx.HTTPError:
            assert process.poll() is None, "the agent exited"
    det_id = next(e for e in events if e["detections"])["detections"][0]["det_id"]

    inject = MqttSession(MqttSettings(host=mqtt_broker.host, port=mqtt_broker.port, client_id="inject"))
    inject.connect()
    assert inject.wait_connected(10)
    refined_topic = TOPICS.refined(device_id)
    for garbage in [b"", b"{not json", b"\xff\xfe", b'{"schema": "edgefleet.refined/1"}', b"[]" * 1000]:
        assert inject.publish(refined_topic, garbage, qos=1).wait(10)
    refined = RefinedPayload(
        device_id=device_id,
        det_id=det_id,
        edge_label="person",
        refined_label="pedestrian",
        score=0.8,
        top_k=[LabelScore(label="pedestrian", score=0.8)],
        refiner_model=ModelRef(name="efficientnet-lite2", version="1"),
        latency_ms=12.0,
    )
    assert inject.publish(refined_topic, encode(refined), qos=1).wait(10)
    inject.disconnect()

    def joined() -> bool:
        found = httpx.get(f"{base}/v1/events?limit=1000", timeout=5).json()
        return any(
            d.get("refined", {}).get("refined_label") == "pedestrian" for e in found for d in e["detections"]
        )

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not joined():
        time.sleep(0.3)
    assert joined()
    status = httpx.get(f"{base}/v1/status", timeout=5).json()
    assert status["malformed_messages"] == 5
    assert status["broker_connected"] is True
    assert status["device_id"] == device_id
    before = status["frames_processed"]
    time.sleep(1.5)
    assert httpx.get(f"{base}/v1/status", timeout=5).json()["frames_processed"] > before  # still detecting
    detect = httpx.post(
        f"{base}/v1/detect",
        content=(Path(config["sources"][0]["uri"]).parents[1] / "images" / "bus.jpg").read_bytes(),
    )
    assert detect.status_code == 200
    assert any(d["label"] == "bus" for d in detect.json()["detections"])

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 5.5
    assert os.path.exists(config["produced_log"])
