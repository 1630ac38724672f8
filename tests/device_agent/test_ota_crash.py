"""`kill -9` of the agent in each OTA state: the restarted agent runs a verified model (never none), reports
truthfully, picks the update up where its record says it was, and converges on the desired model.

Verifying, staging and activating last milliseconds to a second, so the agent is told to stay in the state
under test (`ota.test_hold_s`, applied after the state is persisted and reported, as a slow disk or CPU
would); the download is slowed by the server instead, so the kill lands mid-transfer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet_protocol.ids import new_msg_id
from fleet_protocol.payloads import ModelRef, OtaState, encode
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
    wait_report,
)
from tests.device_agent.test_ota_e2e import publish_desired, watcher

TOPICS = Topics()
INT8 = ModelRef(name="yolov8n_int8", version="local")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArtifactServer, Any, bytes, Path]]:
    root = tmp_path_factory.mktemp("ota-crash")
    private_pem, public_pem = generate_keypair()
    (root / "registry.key").write_bytes(private_pem)
    server = ArtifactServer(root / "artifacts").start()
    try:
        yield server, load_private_key(root / "registry.key"), public_pem, root
    finally:
        server.kill()


@pytest.mark.parametrize("state", ["downloading", "verifying", "staging", "activating", "probation"])
def test_kill_9_in_each_state_restarts_on_a_verified_model_and_converges(
    state: str,
    artifacts: tuple[ArtifactServer, Any, bytes, Path],
    mqtt_broker: MosquittoBroker,
    int8_model: Path,
    shared: Path,
    tmp_path: Path,
) -> None:
    server, key, public_pem, root = artifacts
    version = f"kill-{state}"
    new = ModelRef(name="yolov8n", version=version)
    path = relabelled(int8_model, root / f"{version}.onnx", version)
    size = path.stat().st_size
    server.add("yolov8n", version, path, **({"rate_bps": size / 5} if state == "downloading" else {}))
    (tmp_path / "data" / "trust").mkdir(parents=True)
    (tmp_path / "data" / "trust" / "registry.pub").write_bytes(public_pem)
    ota: dict[str, Any] = {
        "token": TOKEN,
        "latency_budget_ms": 3000,
        "probation_s": 120.0 if state == "probation" else 1.0,
        "probation_frames": 3,
        "retry_min_s": 0.2,
        "retry_max_s": 1.0,
    }
    if state in ("verifying", "staging", "activating"):
        ota["test_hold_s"] = {state: 120}
    config = write_agent_config(
        tmp_path,
        device_id=f"ota-kill-{new_msg_id()[-6:].lower()}",
        broker_port=mqtt_broker.port,
        model=int8_model,
        sources=[
            {
                "id": "hall",
                "kind": "video",
                "uri": str(shared / "data/video/vtest.avi"),
                "fps": 5,
                "loop": True,
            }
        ],
        publish={"mode": "every_frame", "publish_empty": True},
        crops={"enabled": False},
        ota=ota,
    )
    agent = AgentProcess(config)
    inbox = Inbox()
    watch = watcher(mqtt_broker, TOPICS.model_reported(agent.device_id), inbox)
    rollout = f"r-{version}"
    try:
        agent.start()
        wait_report(inbox, lambda r: r.state is OtaState.ACTIVE, 90, "at start")
        desired = desired_for(
            agent.device_id,
            path,
            name="yolov8n",
            version=version,
            base_url=server.base_url,
            rollout_id=rollout,
            private_key=key,
        )
        publish_desired(mqtt_broker, agent.device_id, encode(desired))
        if state == "downloading":
            in_state = lambda r: r.state is OtaState.DOWNLOADING and r.progress >= 0.2  # noqa: E731
        elif state == "probation":
            in_state = lambda r: r.state is OtaState.ACTIVE and r.model == new  # noqa: E731
        else:
            in_state = lambda r: r.state.value == state  # noqa: E731
        wait_report(inbox, lambda r: r.rollout_id == rollout and in_state(r), 90, f"{state} before the kill")
        agent.kill9()

        record_path = Path(agent.config["data_dir"]) / "models" / "ota-state.json"
        record = json.loads(record_path.read_text())
        expected_state = "active" if state == "probation" else state
        assert record["job"]["state"] == expected_state
        assert record["job"]["committed"] is False
        if state == "downloading":
            part = Path(agent.config["data_dir"]) / "models" / "downloads" / f"{desired.sha256}.part"
            assert 0 < part.stat().st_size < size

        settings = yaml.safe_load(config.read_text())
        settings["ota"].pop("test_hold_s", None)
        settings["ota"]["probation_s"] = 1.0
        config.write_text(yaml.safe_dump(settings))
        server.set_faults("yolov8n", version)
        seen = len(reports(inbox))
        agent.start()
        done = wait_report(
            inbox,
            lambda r: r.rollout_id == rollout and r.state is OtaState.ACTIVE and r.progress == 1.0,
            90,
            "active after the restart",
        )
        assert done.model == new
        assert done.previous_model == INT8
        after = reports(inbox)[seen:]
        # The first report of the restarted agent says truthfully which model it started on.
        first = after[0]
        if state == "probation":
            assert (first.state, first.model, first.progress) == (OtaState.ACTIVE, new, 0.0)
        else:
            assert first.state.value == state or first.state is OtaState.STAGING
            assert first.previous_model == INT8  # the old model serves while the update resumes
        assert not [r for r in after if r.state in (OtaState.FAILED, OtaState.ROLLED_BACK)]
        assert agent.status()["active_model"] == new.model_dump()
        final = json.loads(record_path.read_text())
        assert final["job"]["restarts"] == 1
        assert final["current"]["sha256"] == desired.sha256
        if state == "downloading":
            resumed = [r for r in server.requests() if r["path"].endswith(version) and r["range"]]
            assert resumed
            assert resumed[-1]["status"] == 206
    finally:
        watch.disconnect()
        publish_desired(mqtt_broker, agent.device_id, b"")
        agent.kill9()
