"""`edgefleet sim`: simulated devices run the agent's real MQTT session, outbox and OTA code.

In-process against the session broker and a real artifact server: signed downloads with a resume, a
corrupted download caught by the sha256 check, the devices' own probation rolling slow ones back, telemetry,
detections through the outbox, retained status. As a process against a broker with the accounts and ACL
that fleet provisioning generates: provisioned devices connect, one without an account does not, `kill -9`
leaves the wills. The command's errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from device_agent.sim import EvenShare, SimConfig, SimFleet, sim_command
from fleet_protocol.mqtt import MqttSession, MqttSettings
from fleet_protocol.payloads import (
    DetectionEvent,
    ModelRef,
    ModelReported,
    OtaState,
    StatusPayload,
    TelemetryPayload,
    decode,
    encode,
)
from fleet_protocol.signing import generate_keypair, load_private_key
from fleet_protocol.topics import Topics
from tests.broker import Inbox, MosquittoBroker
from tests.device_agent.ota_helpers import TOKEN, ArtifactServer, desired_for, relabelled
from tests.fleet_manager.conftest import wait_until

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))


def observer(
    broker: MosquittoBroker, root: str, inbox: Inbox, username: str | None = None, password: str | None = None
) -> MqttSession:
    session = MqttSession(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"observer-{uuid.uuid4().hex[:6]}",
            clean_start=True,
            session_expiry_s=0,
            username=username,
            password=password,
        )
    )
    session.subscribe(f"{root}/devices/+/#", inbox)
    session.connect()
    assert session.wait_connected(10), "the observer could not connect"
    return session


def latest(inbox: Inbox, device_id: str, kind: str) -> bytes | None:
    found = [m.payload for m in inbox.messages if m.topic.endswith(f"/{device_id}/{kind}")]
    return found[-1] if found else None


def status_of(inbox: Inbox, device_id: str) -> StatusPayload | None:
    payload = latest(inbox, device_id, "status")
    return decode(StatusPayload, payload) if payload else None


def test_even_share_picks_evenly_in_asking_order() -> None:
    fifth = EvenShare(0.2)
    assert [i for i in range(1, 21) if fifth.next()] == [5, 10, 15, 20]
    third = EvenShare(1 / 3)
    assert sum(third.next() for _ in range(30)) == 10
    assert not any(EvenShare(0.0).next() for _ in range(50))
    assert all(EvenShare(1.0).next() for _ in range(50))


@pytest.fixture
def artifacts(tmp_path: Path, int8_model: Path) -> Iterator[tuple[ArtifactServer, Path]]:
    model = relabelled(int8_model, tmp_path / "v2.onnx", "sim-v2")
    server = ArtifactServer(tmp_path / "artifacts")
    # The first whole-file response breaks off half-way: that device resumes with a Range request.
    server.add("simyolo", "2", model, truncate_first_at=model.stat().st_size // 2)
    server.start()
    yield server, model
    server.kill()


def test_simulated_devices_run_the_real_ota_path(
    tmp_path: Path, mqtt_broker: MosquittoBroker, int8_model: Path, artifacts: tuple[ArtifactServer, Path]
) -> None:
    server, model = artifacts
    private_pem, public_pem = generate_keypair()
    (tmp_path / "signing.pem").write_bytes(private_pem)
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "registry.pem").write_bytes(public_pem)
    root = f"t{uuid.uuid4().hex[:8]}/v1"
    topics = Topics(root)
    config = SimConfig(
        devices=5,
        data_dir=tmp_path / "devices",
        model=int8_model,
        model_ref=ModelRef(name="simyolo", version="1"),
        broker_port=mqtt_broker.port,
        topic_root=root,
        token=SecretStr(TOKEN),
        trust_store=trust,
        rate_hz=2.0,
        fps=10.0,
        telemetry_s=0.3,
        latency_ms=40.0,
        slow_latency_ms=400.0,
        fail_verify=0.2,  # the 5th device to download corrupts it
        slow=0.5,  # every 2nd device to activate is slow: over 100 ms x 1.5, its own probation rolls back
        latency_budget_ms=100.0,
        probation_s=0.5,
        probation_frames=3,
    )
    inbox = Inbox()
    watch = observer(mqtt_broker, root, inbox)
    fleet = SimFleet(config)
    try:
        fleet.start()
        assert fleet.wait_connected(10)
        ids = config.device_ids
        assert ids == [f"sim-000{i}" for i in range(5)]

        def online() -> bool:
            return all((s := status_of(inbox, d)) is not None and s.state.value == "online" for d in ids)

        assert inbox.wait_for(lambda _: online(), 10), "every device publishes a retained online status"
        assert all(status_of(inbox, d).active_model == config.model_ref for d in ids)  # type: ignore[union-attr]

        key = load_private_key(tmp_path / "signing.pem")
        for device_id in ids:
            desired = desired_for(
                device_id,
                model,
                name="simyolo",
                version="2",
                base_url=server.base_url,
                rollout_id="ro-sim",
                private_key=key,
            )
            watch.publish(topics.model_desired(device_id), encode(desired), qos=1, retain=True).wait(5)

        def outcome(device_id: str) -> OtaState | None:
            payload = latest(inbox, device_id, "model/reported")
            report = decode(ModelReported, payload) if payload else None
            if report is None or report.rollout_id != "ro-sim":
                return None
            done = report.state in (OtaState.FAILED, OtaState.ROLLED_BACK) or (
                report.state is OtaState.ACTIVE and report.progress == 1.0
            )
            return report.state if done else None

        assert inbox.wait_for(lambda _: all(outcome(d) for d in ids), 60), [outcome(d) for d in ids]
        reports = {d: decode(ModelReported, latest(inbox, d, "model/reported") or b"") for d in ids}
        states = sorted(r.state.value for r in reports.values())
        assert states == ["active", "active", "failed", "rolled_back", "rolled_back"], reports
        failed = next(r for r in reports.values() if r.state is OtaState.FAILED)
        assert "sha256 mismatch" in (failed.error or "")
        for report in reports.values():
            if report.state is OtaState.ROLLED_BACK:
                assert "p95 latency" in (report.error or "")
        snapshot = fleet.snapshot(per_device=True)
        assert (snapshot["faulty"], snapshot["slow"]) == (1, 2)
        assert snapshot["models"] == {"simyolo@2": 2, "simyolo@1": 3}
        # A download broke off half-way and was resumed with a Range request.
        assert any(r["range"] for r in server.requests() if r["status"] == 206)

        for device_id, report in reports.items():
            record = json.loads((config.data_dir / device_id / "models" / "ota-state.json").read_text())
            assert record["job"]["state"] == report.state.value
            if report.state is OtaState.ACTIVE:
                assert record["current"]["version"] == "2"
                assert record["job"]["committed"] is True
                status = status_of(inbox, device_id)
                assert status is not None
                assert status.active_model == ModelRef(name="simyolo", version="2")
            else:
                assert record["current"] is None  # back on (or never left) the configured model

        # Telemetry and detections flow: the devices on v2 detect with it, at the normal latency.
        active = [d for d, r in reports.items() if r.state is OtaState.ACTIVE]

        def fresh_detections() -> bool:
            for device_id in active:
                payload = latest(inbox, device_id, "detections")
                if payload is None or decode(DetectionEvent, payload).model.version != "2":
                    return False
            return True

        assert inbox.wait_for(lambda _: fresh_detections(), 10)
        for device_id in active:
            telemetry = decode(TelemetryPayload, latest(inbox, device_id, "telemetry") or b"")
            assert telemetry.latency_ms["total"].p95 == 40.0
        events = [decode(DetectionEvent, m.payload) for m in inbox.of("/detections")]
        assert len({e.msg_id for e in events}) == len(events)
        assert all(len(e.detections) == 2 for e in events)
        wait_until(lambda: all(d.outbox.stats().depth == 0 for d in fleet.devices), 10, "outboxes to drain")
    finally:
        fleet.stop()
    assert inbox.wait_for(
        lambda _: all((s := status_of(inbox, d)) and s.state.value == "offline" for d in config.device_ids),
        10,
    ), "a clean stop leaves a retained offline status"
    watch.disconnect()


# ---- as a process, with provisioned broker accounts ---------------------------------------------------


def test_sim_process_with_provisioned_accounts(tmp_path: Path, int8_model: Path) -> None:
    from fleet_manager.db import Database
    from fleet_manager.models import BrokerRole
    from fleet_manager.provisioning import create_service_account, provision_device
    from tests.fleet_manager.conftest import fleet_settings

    root = "edgefleet/v1"
    settings = fleet_settings(
        tmp_path, f"sqlite:///{tmp_path / 'fleet.sqlite3'}", None, broker={"topic_root": root}
    )
    db = Database(settings.resolved_database_url)
    db.migrate()
    try:
        fleet_password, _, _ = create_service_account(db, settings, "fleet", BrokerRole.FLEET, actor="test")
        accounts = {
            device_id: provision_device(db, settings, device_id, group=None, tags={}, actor="test")
            for device_id in ("sim-0000", "sim-0001")
        }
    finally:
        db.dispose()
    credentials = tmp_path / "credentials.yaml"
    credentials.write_text(
        yaml.safe_dump(
            {d: {"password": p.broker_password, "token": p.artifact_token} for d, p in accounts.items()}
        )
    )
    broker = MosquittoBroker(
        tmp_path / "mosquitto", password_file=settings.password_file, acl_file=settings.acl_file
    ).start()
    inbox = Inbox()
    watch = observer(broker, root, inbox, username="fleet", password=fleet_password)
    args = [
        EDGEFLEET,
        "sim",
        "--devices",
        "3",  # sim-0002 has no account: the broker turns it away
        "--model",
        str(int8_model),
        "--data-dir",
        str(tmp_path / "devices"),
        "--broker-port",
        str(broker.port),
        "--credentials",
        str(credentials),
        "--allow-unsigned",
        "--telemetry-interval",
        "0.5",
    ]
    log = tmp_path / "sim.log"
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ})
    try:

        def states() -> dict[str, str]:
            found = {}
            for device_id in ("sim-0000", "sim-0001", "sim-0002"):
                status = status_of(inbox, device_id)
                if status is not None:
                    found[device_id] = status.state.value
            return found

        online = {"sim-0000": "online", "sim-0001": "online"}
        wait_until(lambda: process.poll() is None and states() == online, 30, "provisioned devices online")
        status = status_of(inbox, "sim-0000")
        assert status is not None
        assert status.active_model == ModelRef(name="yolov8n_int8", version="local")
        assert status.providers == ["simulated"]
        assert inbox.wait_for(lambda _: latest(inbox, "sim-0001", "telemetry") is not None, 10)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        # No clean goodbye: the broker publishes each device's will.
        offline = {"sim-0000": "offline", "sim-0001": "offline"}
        wait_until(lambda: states() == offline, 15, "the wills of the killed devices")
        assert latest(inbox, "sim-0002", "status") is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        watch.disconnect()
        broker.stop()


def test_sim_command_errors(tmp_path: Path, int8_model: Path) -> None:
    import typer

    app = typer.Typer()
    app.command()(sim_command)
    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["--help"]).output.replace("│", " ").split())
    assert "SIMULATED" in help_text
    assert "share one onnxruntime session" in help_text
    cases = [
        ([], "--model is required"),
        (["--model", str(tmp_path / "missing.onnx")], "no such file"),
        (["--model", str(int8_model), "--model-ref", "noversion"], "NAME@VERSION"),
        (["--model", str(int8_model), "--data-dir", str(tmp_path)], "trust store"),
        (["--model", str(int8_model), "--allow-unsigned", "--fail-verify", "2"], "fail_verify"),
        (["--model", str(int8_model), "--allow-unsigned", "--log-level", "loud"], "--log-level"),
        (["--model", str(int8_model), "--allow-unsigned", "--prefix", "bad/"], "device id"),
        (["--model", str(int8_model), "--allow-unsigned", "--credentials", str(tmp_path)], "credentials"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args, terminal_width=200)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
