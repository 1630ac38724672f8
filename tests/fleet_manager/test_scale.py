"""200 simulated devices against the real fleet manager, Mosquitto and artifact endpoint (SQLite, PostgreSQL).

The devices are `edgefleet sim` processes: the agent's real MQTT session, outbox and OTA code (download,
size/sha256/Ed25519 verify, persisted states, model/reported), one data folder per device, kept from one
test to the next (a restarted simulator boots each device from its OTA record, as an agent does). The tests
run in order on one fleet:

1. waves 10% → 50% → 100% complete: every device downloads, verifies and activates the new model;
2. with 20% of the devices failing verification, the rollout pauses in its first wave, and a rollback
   returns that wave's devices to their previous model;
3. a wave whose devices report latency over the gate does not advance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from fleet_manager.api.main import create_app
from fleet_manager.models import Device, DevicePhase, Role, RolloutDevice
from fleet_manager.registry import RegistryCatalog
from fleet_manager.rollouts import RolloutSpec, RolloutTarget
from fleet_manager.service import FleetService
from tests.broker import MosquittoBroker, free_port
from tests.fleet_manager.conftest import (
    BACKENDS,
    POSTGRES_ADMIN_URL,
    RegisteredModels,
    ServerThread,
    fleet_settings,
    make_token,
    postgres_url,
    wait_until,
)

DEVICES = 200
ACTOR = "test:scale"
EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
SIM_DEFAULTS = [
    "--rate",
    "0.2",
    "--fps",
    "4",
    "--telemetry-interval",
    "0.5",
    "--latency-ms",
    "40",
    "--slow-latency-ms",
    "400",
    "--probation-s",
    "0.5",
    "--probation-frames",
    "2",
    "--connect-rate",
    "1000",
    "--report-every",
    "1",
]


@dataclass
class Fleet:
    service: FleetService
    models: RegisteredModels
    broker: MosquittoBroker
    folder: Path
    token: str
    v2_file: Path  # the file of v2 (fp32): what the devices start with

    @property
    def v1(self) -> tuple[str, str]:
        return self.models.name, self.models.v1.version

    @property
    def v2(self) -> tuple[str, str]:
        return self.models.name, self.models.v2.version

    def running(self) -> Counter[tuple[str | None, str | None]]:
        """The model each device runs, as the fleet manager knows it (status and model/reported)."""
        with self.service.db.read() as session:
            devices = session.execute(select(Device)).scalars().all()
            return Counter((d.active_model_name, d.active_model_version) for d in devices)

    def online(self, model: tuple[str, str]) -> int:
        with self.service.db.read() as session:
            devices = session.execute(select(Device).where(Device.state == "online")).scalars().all()
            return sum(1 for d in devices if (d.active_model_name, d.active_model_version) == model)

    def rollout(self, version: str, **kw: Any) -> str:
        values: dict[str, Any] = {
            "model": self.models.name,
            "version": version,
            "target": RolloutTarget(all=True),
            "waves": [10, 50, 100],
            "probation_s": 1.0,
            "success_threshold": 1.0,
            "error_threshold": 0.1,
        }
        values.update(kw)
        return self.service.controller.create(RolloutSpec(**values), ACTOR).id

    def rows(self, rollout_id: str) -> list[RolloutDevice]:
        return self.service.controller.get(rollout_id)[1]

    def wait_state(self, rollout_id: str, state: str, timeout: float) -> None:
        def reached() -> bool:
            return self.service.controller.get(rollout_id)[0].state == state

        try:
            wait_until(reached, timeout, f"rollout {rollout_id} to be {state}", interval=0.2)
        except AssertionError:
            rollout, rows = self.service.controller.get(rollout_id)
            phases = Counter((r.wave, r.phase) for r in rows)
            raise AssertionError(
                f"rollout is {rollout.state} in wave {rollout.current_wave + 1} ({rollout.message}); "
                f"(wave, phase) counts: {dict(phases)}"
            ) from None


class Sim:
    """`edgefleet sim --devices 200` as a process of its own; its status file is the devices' own view."""

    def __init__(self, fleet: Fleet, name: str, *extra: str) -> None:
        self.status_file = fleet.folder / f"{name}.status.json"
        self.log = fleet.folder / f"{name}.log"
        models = fleet.models
        trust = fleet.folder / "trust"
        trust.mkdir(exist_ok=True)
        (trust / "registry.pem").write_bytes(models.public_pem)
        topics = fleet.service.settings.topics
        args = [
            EDGEFLEET,
            "sim",
            "--devices",
            str(DEVICES),
            # the devices start on v2 (the fp32 file); what they installed since is in their OTA records
            "--model",
            str(fleet.v2_file),
            "--model-ref",
            f"{models.name}@{models.v2.version}",
            "--data-dir",
            str(fleet.folder / "devices"),
            "--trust-store",
            str(trust),
            "--broker-port",
            str(fleet.broker.port),
            "--topic-root",
            topics.root,
            "--status-file",
            str(self.status_file),
            *SIM_DEFAULTS,
            *extra,
        ]
        env = {**os.environ, "EDGEFLEET_SIM_TOKEN": fleet.token}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, env=env, stdout=log, stderr=log)

    def devices(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        devices: dict[str, dict[str, Any]] = data.get("per_device", {})
        return devices

    def alive(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.returncode == 0, self.log.read_text()[-3000:]


@pytest.fixture(scope="module", params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's database: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('scale-db') / 'fleet.sqlite3'}"
        return
    schema = f"scale_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield postgres_url(schema)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    database: str,
    mqtt_broker: MosquittoBroker,
    fleet_models: RegisteredModels,
    fleet_catalog: RegistryCatalog,
    fp32_model: Path,
) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("scale")
    port = free_port()
    settings = fleet_settings(
        folder,
        database,
        mqtt_broker,
        api={"port": port, "public_url": f"http://127.0.0.1:{port}"},
        ingest={"telemetry_history_interval_s": 10, "flush_interval_s": 0.05},
        rollouts={"tick_s": 0.2},
    )
    service = FleetService(settings, catalog=fleet_catalog)
    service.start()
    try:
        assert service.mqtt is not None
        assert service.mqtt.wait_connected(10)
        with ServerThread(create_app(service), port):
            token = make_token(service.db, Role.OPERATOR)
            yield Fleet(service, fleet_models, mqtt_broker, folder, token, fp32_model)
    finally:
        service.stop()


@pytest.fixture
def sims(fleet: Fleet) -> Iterator[list[Sim]]:
    started: list[Sim] = []
    yield started
    for sim in started:
        sim.stop()


def start_sim(fleet: Fleet, sims: list[Sim], name: str, model: tuple[str, str], *extra: str) -> Sim:
    """Start the simulator and wait until the fleet manager sees all its devices online on `model`."""
    sim = Sim(fleet, name, *extra)
    sims.append(sim)
    wait_until(
        lambda: sim.alive() and fleet.online(model) == DEVICES,
        90,
        f"{DEVICES} simulated devices online on {model}",
        interval=0.25,
    )
    return sim


def test_waves_complete_for_200_devices(fleet: Fleet, sims: list[Sim]) -> None:
    sim = start_sim(fleet, sims, "complete", fleet.v2)
    started = time.monotonic()
    rollout_id = fleet.rollout(fleet.models.v1.version, max_latency_p95_ms=200)
    fleet.wait_state(rollout_id, "completed", 90)
    took = time.monotonic() - started
    rows = fleet.rows(rollout_id)
    assert [sum(1 for r in rows if r.wave == w) for w in range(3)] == [20, 80, 100]
    assert all(r.phase == DevicePhase.ACTIVE.value and r.proven_at is not None for r in rows)
    for wave in (1, 2):  # a wave starts only once the one before is proven
        proven = max(r.proven_at for r in rows if r.wave == wave - 1 and r.proven_at is not None)
        assert min(r.sent_at for r in rows if r.wave == wave and r.sent_at is not None) >= proven
    assert fleet.running()[fleet.v1] == DEVICES
    # The devices' own view: each downloaded, verified and activated v1, and persisted it.
    v1 = f"{fleet.models.name}@{fleet.models.v1.version}"
    wait_until(lambda: Counter(d["model"] for d in sim.devices().values())[v1] == DEVICES, 10, "sim status")
    devices = sim.devices()
    assert {d["ota_state"] for d in devices.values()} == {"active"}
    record = json.loads((fleet.folder / "devices" / "sim-0123" / "models" / "ota-state.json").read_text())
    assert (record["current"]["version"], record["previous"]["origin"]) == (fleet.models.v1.version, "config")
    created = fleet.service.controller.get(rollout_id)[0].created_at
    timeline = []
    for wave in range(3):
        members = [r for r in rows if r.wave == wave]
        timeline.append(
            "wave {}: sent +{:.1f} s, all active +{:.1f} s, all proven +{:.1f} s".format(
                wave + 1,
                *(
                    (max(getattr(r, f) for r in members) - created).total_seconds()
                    if f != "sent_at"
                    else (min(r.sent_at for r in members if r.sent_at) - created).total_seconds()
                    for f in ("sent_at", "activated_at", "proven_at")
                ),
            )
        )
    print(f"\n200 devices, waves 10/50/100, probation 1 s: completed in {took:.1f} s; " + "; ".join(timeline))


def test_failed_verification_pauses_first_wave_and_rollback_restores(fleet: Fleet, sims: list[Sim]) -> None:
    sim = start_sim(fleet, sims, "fail-verify", fleet.v1, "--fail-verify", "0.2")
    rollout_id = fleet.rollout(fleet.models.v2.version)
    fleet.wait_state(rollout_id, "paused", 60)
    rollout, rows = fleet.service.controller.get(rollout_id)
    assert rollout.current_wave == 0
    assert "wave 1" in (rollout.message or "")
    assert len([r for r in rows if r.wave == 0]) == 20

    def wave_1_failed() -> list[RolloutDevice]:
        return [r for r in fleet.rows(rollout_id) if r.wave == 0 and r.phase == DevicePhase.FAILED.value]

    # The simulator corrupts the downloads of every 5th device to fetch: 4 of the wave's 20. The pause comes
    # as soon as the failures pass the error threshold, so the last ones may still be on their way.
    wait_until(lambda: len(wave_1_failed()) == 4, 30, "4 failed verifications in wave 1")
    first = [r for r in fleet.rows(rollout_id) if r.wave == 0]
    failed = wave_1_failed()
    assert fleet.service.controller.get(rollout_id)[0].state == "paused"
    assert all("sha256 mismatch" in (r.error or "") for r in failed), [r.error for r in failed]
    assert all(r.sent_at is None for r in rows if r.wave > 0)
    wait_until(
        lambda: sum(1 for r in fleet.rows(rollout_id) if r.phase == DevicePhase.ACTIVE.value) == 16,
        30,
        "the 16 other devices of wave 1 to activate v2",
    )

    fleet.service.controller.rollback(rollout_id, ACTOR, "20% failed verification")

    def reverted() -> bool:
        current = fleet.rows(rollout_id)
        return all(r.phase == DevicePhase.REVERTED.value for r in current if r.wave == 0)

    wait_until(reverted, 60, "wave 1 to be reverted")
    first_ids = {r.device_id for r in first}
    with fleet.service.db.read() as session:
        devices = session.execute(select(Device).where(Device.id.in_(first_ids))).scalars().all()
        assert {(d.active_model_name, d.active_model_version) for d in devices} == {fleet.v1}
    assert fleet.running()[fleet.v1] == DEVICES
    v1 = f"{fleet.models.name}@{fleet.models.v1.version}"
    wait_until(lambda: all(sim.devices()[d]["model"] == v1 for d in first_ids), 10, "devices' own view of v1")
    assert sum(1 for d in sim.devices().values() if d["faulty"]) == 4


def test_wave_over_latency_gate_does_not_advance(fleet: Fleet, sims: list[Sim]) -> None:
    start_sim(fleet, sims, "slow", fleet.v1, "--slow", "0.25")
    rollout_id = fleet.rollout(
        fleet.models.v2.version, max_latency_p95_ms=200, success_threshold=0.9, error_threshold=0.5
    )

    def judged() -> bool:
        phases = Counter(r.phase for r in fleet.rows(rollout_id) if r.wave == 0)
        proven = sum(1 for r in fleet.rows(rollout_id) if r.wave == 0 and r.proven_at is not None)
        return phases[DevicePhase.UNHEALTHY.value] == 5 and proven == 15

    wait_until(judged, 60, "wave 1: 5 devices over the latency gate, 15 proven")
    time.sleep(3.0)  # three probation periods more: still no advance
    rollout, rows = fleet.service.controller.get(rollout_id)
    assert (rollout.state, rollout.current_wave) == ("running", 0)
    assert all(r.sent_at is None for r in rows if r.wave > 0)
    unhealthy = [r for r in rows if r.phase == DevicePhase.UNHEALTHY.value]
    assert len(unhealthy) == 5
    assert all("over the 200 ms gate" in (r.error or "") for r in unhealthy), [r.error for r in unhealthy]
    fleet.service.controller.abort(rollout_id, ACTOR, "latency over the gate")
