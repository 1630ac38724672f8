"""`edgefleet fleet serve` as a real process, killed with SIGKILL mid-rollout and started again: the rollout
carries on from where it was (no wave restarted, no desired model re-issued), on SQLite and PostgreSQL.
Devices download the artifact over HTTP with their own tokens, as real ones do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import select

from fleet_manager.config import FleetSettings
from fleet_manager.db import Database
from fleet_manager.models import AuditEntry, Role
from fleet_manager.provisioning import provision_device
from fleet_protocol.payloads import ModelRef
from tests.broker import MosquittoBroker, free_port
from tests.fleet_manager.conftest import RegisteredModels, make_token, wait_until
from tests.fleet_manager.fleet_sim import SimDevice, SimFleet

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))


class ServeProcess:
    def __init__(self, env: dict[str, str], log: Path, port: int) -> None:
        self.env, self.log, self.port = env, log, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [EDGEFLEET, "fleet", "serve", "--log-level", "warning"], env=self.env, stdout=log, stderr=log
            )

        def healthy() -> bool:
            assert self.process is not None
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                response = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and response.json()["mqtt_connected"] is True

        wait_until(healthy, 60, "edgefleet fleet serve to be up", interval=0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def test_kill_9_mid_rollout_then_restart_carries_on(
    tmp_path: Path, database_url: str, mqtt_broker: MosquittoBroker, fleet_models: RegisteredModels
) -> None:
    port = free_port()
    suffix = uuid.uuid4().hex[:8]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
        "EDGEFLEET_FLEET_DATA_DIR": str(tmp_path / "fleet"),
        "EDGEFLEET_FLEET_DATABASE_URL": database_url,
        "EDGEFLEET_FLEET_BROKER__PORT": str(mqtt_broker.port),
        "EDGEFLEET_FLEET_BROKER__CLIENT_ID": f"fleet-{suffix}",
        "EDGEFLEET_FLEET_BROKER__TOPIC_ROOT": f"t{suffix}/v1",
        "EDGEFLEET_FLEET_API__PORT": str(port),
        "EDGEFLEET_FLEET_API__PUBLIC_URL": f"http://127.0.0.1:{port}",
        "EDGEFLEET_FLEET_ROLLOUTS__TICK_S": "0.1",
        "EDGEFLEET_FLEET_INGEST__FLUSH_INTERVAL_S": "0.01",
        "EDGEFLEET_REGISTRY_DATA_DIR": str(fleet_models.settings.data_dir),
        "EDGEFLEET_REGISTRY_MLFLOW_URI": fleet_models.settings.tracking_uri,
    }
    settings = FleetSettings(
        data_dir=tmp_path / "fleet", database_url=database_url, broker={"topic_root": f"t{suffix}/v1"}
    )
    db = Database(database_url)
    db.migrate()
    v1 = ModelRef(name=fleet_models.name, version=fleet_models.v1.version)
    tokens = {}
    for i in range(6):
        device_id = f"cam-{i}"
        tokens[device_id] = provision_device(
            db, settings, device_id, group="g", tags={}, actor="test"
        ).artifact_token
    operator = make_token(db, Role.OPERATOR)
    server = ServeProcess(env, tmp_path / "serve.log", port)
    devices = [SimDevice(d, v1) for d in tokens]
    sim = SimFleet(mqtt_broker, settings.topics, devices, tokens=tokens)
    server.start()
    try:
        sim.start()
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {operator}"}, timeout=60
        )

        def all_registered() -> bool:
            response = api.get(
                "/api/v1/devices", params={"model": f"{v1.name}@{v1.version}", "state": "online"}
            )
            return response.json()["total"] == 6

        wait_until(all_registered, 20, "the devices to be online on v1")
        created = api.post(
            "/api/v1/rollouts",
            json={
                "model": fleet_models.name,
                "version": fleet_models.v2.version,
                "target": {"groups": ["g"]},
                "waves": [34, 67, 100],
                "probation_s": 0.5,
                "success_threshold": 1.0,
            },
        )
        assert created.status_code == 201, created.text
        rollout_id = created.json()["id"]
        detail = api.get(f"/api/v1/rollouts/{rollout_id}").json()
        later = [d["device_id"] for d in detail["devices"] if d["wave"] >= 1]
        sim.freeze(later)  # the second wave receives the model but does not act until after the restart

        def second_wave_sent() -> bool:
            rollout = api.get(f"/api/v1/rollouts/{rollout_id}").json()
            return rollout["current_wave"] == 1 and any(
                d["phase"] == "sent" for d in rollout["devices"] if d["wave"] == 1
            )

        wait_until(second_wave_sent, 30, "the second wave to be sent")
        server.kill()
        server.start()
        sim.thaw()

        def completed() -> bool:
            return api.get(f"/api/v1/rollouts/{rollout_id}").json()["state"] == "completed"

        wait_until(completed, 60, "the rollout to complete after the restart")
        v2 = (fleet_models.name, fleet_models.v2.version)
        assert all(sim.model_of(d) == v2 for d in tokens)
        assert all(codes and set(codes) == {200} for codes in sim.downloads.values())
        # Carried on: each device was sent one desired model (re-sent after the restart with the same
        # msg_id, which devices ignore), and no wave started twice.
        for device in devices:
            assert len(set(device.desired_msg_ids)) == 1, device.desired_msg_ids
        with db.read() as session:
            actions = Counter(
                session.execute(select(AuditEntry.action).where(AuditEntry.target_id == rollout_id)).scalars()
            )
        assert actions == Counter(
            {"rollout.create": 1, "rollout.start": 1, "rollout.advance": 2, "rollout.complete": 1}
        )
        api.close()
    finally:
        sim.stop()
        server.stop()
        db.dispose()
