"""OTA end to end: a real agent on yolov8n_int8 is sent yolov8n (fp32) over real MQTT and HTTP; then the
same model again (a no-op), then a third model while the agent is stopped (it converges when it returns).

The source is a video file with no target fps, so the source hands the inference loop every frame (none is
ever replaced by a newer one): a gap in the frame sequence of the detection events could only come from
the model swap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import MqttSession, MqttSettings
from fleet_protocol.payloads import (
    DetectionEvent,
    ModelDesired,
    ModelRef,
    OtaState,
    StatusPayload,
    decode,
    encode,
)
from fleet_protocol.signing import generate_keypair, load_private_key
from fleet_protocol.topics import Topics
from tests.broker import Inbox, MosquittoBroker
from tests.device_agent.agent_runner import AgentProcess, write_agent_config
from tests.device_agent.ota_helpers import (
    TOKEN,
    ArtifactServer,
    desired_for,
    relabelled,
    reports,
    states_of,
    wait_report,
)

TOPICS = Topics()


def watcher(broker: MosquittoBroker, topic_filter: str, inbox: Inbox) -> MqttSession:
    session = MqttSession(
        MqttSettings(host=broker.host, port=broker.port, client_id=f"ota-{new_msg_id()}", clean_start=True)
    )
    session.subscribe(topic_filter, inbox)
    session.connect()
    assert session.wait_connected(10)
    return session


def publish_desired(broker: MosquittoBroker, device_id: str, payload: bytes) -> None:
    session = MqttSession(MqttSettings(host=broker.host, port=broker.port, client_id=f"fleet-{new_msg_id()}"))
    session.connect()
    assert session.wait_connected(10)
    assert session.publish(TOPICS.model_desired(device_id), payload, qos=1, retain=True).wait(10)
    session.disconnect()


@pytest.fixture
def setup(
    tmp_path: Path, mqtt_broker: MosquittoBroker, int8_model: Path, shared: Path
) -> Iterator[tuple[AgentProcess, ArtifactServer, Any]]:
    private_pem, public_pem = generate_keypair()
    (tmp_path / "registry.key").write_bytes(private_pem)
    trust = tmp_path / "data" / "trust"
    trust.mkdir(parents=True)
    (trust / "registry.pub").write_bytes(public_pem)
    server = ArtifactServer(tmp_path / "artifacts").start()
    config = write_agent_config(
        tmp_path,
        device_id=f"ota-e2e-{new_msg_id()[-6:].lower()}",
        broker_port=mqtt_broker.port,
        model=int8_model,
        sources=[{"id": "hall", "kind": "video", "uri": str(shared / "data/video/vtest.avi"), "loop": True}],
        publish={"mode": "every_frame", "publish_empty": True},
        crops={"enabled": False},
        ota={"token": TOKEN, "latency_budget_ms": 3000, "probation_s": 1.0, "probation_frames": 5},
    )
    agent = AgentProcess(config)
    try:
        yield agent, server, load_private_key(tmp_path / "registry.key")
    finally:
        agent.kill9()
        server.kill()


def test_ota_end_to_end_states_in_order_no_frame_gap_no_op_and_offline_convergence(
    setup: tuple[AgentProcess, ArtifactServer, Any],
    mqtt_broker: MosquittoBroker,
    fp32_model: Path,
    int8_model: Path,
    tmp_path: Path,
) -> None:
    agent, server, key = setup
    device = agent.device_id
    server.add("yolov8n", "2", fp32_model)
    inbox = Inbox()
    watch = watcher(mqtt_broker, TOPICS.device_prefix(device) + "/#", inbox)
    try:
        agent.start()
        first = wait_report(inbox, lambda r: r.state is OtaState.ACTIVE, 90, "at start")
        assert first.model is not None
        assert (first.model.name, first.model.version) == (
            "yolov8n_int8",
            "local",
        )
        assert inbox.wait_for(lambda _: len(inbox.of("/detections")) >= 10, 60)

        desired = desired_for(
            device,
            fp32_model,
            name="yolov8n",
            version="2",
            base_url=server.base_url,
            rollout_id="r-e2e",
            private_key=key,
        )
        publish_desired(mqtt_broker, device, encode(desired))
        done = wait_report(
            inbox,
            lambda r: r.rollout_id == "r-e2e" and r.state is OtaState.ACTIVE and r.progress == 1.0,
            90,
            "active after probation",
        )
        assert done.model is not None
        assert (done.model.name, done.model.version) == ("yolov8n", "2")
        assert done.previous_model is not None
        assert done.previous_model.name == "yolov8n_int8"
        assert done.error is None
        assert states_of(inbox, "r-e2e") == [
            OtaState.DOWNLOADING,
            OtaState.VERIFYING,
            OtaState.STAGING,
            OtaState.ACTIVATING,
            OtaState.ACTIVE,
        ]

        def fp32_events() -> int:
            return sum(1 for m in inbox.of("/detections") if b'"version":"2"' in m.payload)

        assert inbox.wait_for(lambda _: fp32_events() >= 10, 60)
        events = [decode(DetectionEvent, m.payload) for m in inbox.of("/detections")]
        by_seq = {e.frame_seq: (e.model.name, e.model.version) for e in events}
        seqs = sorted(by_seq)
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a frame is missing from the detection events"
        models = [by_seq[s] for s in seqs]
        swap = models.index(("yolov8n", "2"))
        assert swap > 0
        assert set(models[:swap]) == {("yolov8n_int8", "local")}
        assert set(models[swap:]) == {("yolov8n", "2")}, "the model changed more than once"

        status = agent.status()
        assert status["active_model"] == {"name": "yolov8n", "version": "2"}
        assert status["frames_failed"] == 0
        assert status["ota"]["state"] == "active"
        retained = Inbox()
        late = watcher(mqtt_broker, TOPICS.status(device), retained)
        assert retained.wait_for(
            lambda ms: any(
                (s := decode(StatusPayload, m.payload)).active_model is not None
                and s.active_model.version == "2"
                for m in ms
            ),
            10,
        )
        late.disconnect()

        # On disk: the new file in the store, the record naming it current and the configured model previous.
        record = json.loads((Path(agent.config["data_dir"]) / "models" / "ota-state.json").read_text())
        assert record["current"]["sha256"] == desired.sha256
        assert record["previous"]["origin"] == "config"
        assert (
            Path(agent.config["data_dir"]) / "models" / record["current"]["file"]
        ).stat().st_size == desired.size

        # The same model again (a fresh message of the same rollout): a no-op, reported as active at once.
        gets_before = [r for r in server.requests() if r["method"] == "GET"]
        again = ModelDesired.model_validate(
            {**desired.model_dump(), "msg_id": new_msg_id(), "rollout_id": "r-again"}
        )
        publish_desired(mqtt_broker, device, encode(again))
        wait_report(inbox, lambda r: r.rollout_id == "r-again" and r.state is OtaState.ACTIVE, 20, "no-op")
        assert states_of(inbox, "r-again") == [OtaState.ACTIVE]
        assert [r for r in server.requests() if r["method"] == "GET"] == gets_before

        # Offline while the fleet moves on: the retained desired brings the device along when it returns.
        assert agent.terminate() == 0
        offline_model = relabelled(int8_model, tmp_path / "int8-3.onnx", "3")
        server.add("yolov8n", "3", offline_model)
        later = desired_for(
            device,
            offline_model,
            name="yolov8n",
            version="3",
            base_url=server.base_url,
            rollout_id="r-offline",
            private_key=key,
        )
        publish_desired(mqtt_broker, device, encode(later))
        seen = len(reports(inbox))
        agent.start()
        back = wait_report(
            inbox,
            lambda r: r.rollout_id == "r-offline" and r.state is OtaState.ACTIVE and r.progress == 1.0,
            90,
            "active after coming back",
        )
        assert back.model == ModelRef(name="yolov8n", version="3")
        assert back.previous_model == ModelRef(name="yolov8n", version="2")
        restarted = reports(inbox)[seen]  # it came back on the model it had verified and activated before
        assert (restarted.state, restarted.model) == (OtaState.ACTIVE, ModelRef(name="yolov8n", version="2"))
        assert agent.status()["active_model"] == {"name": "yolov8n", "version": "3"}
    finally:
        watch.disconnect()
        publish_desired(mqtt_broker, device, b"")  # clear the retained desired
