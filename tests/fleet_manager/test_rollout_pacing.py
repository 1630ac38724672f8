"""How soon the rollout controller acts on reports, and how often: a device with no probation time to serve is
proven in the tick that sees it active; a stream of wakes (ingested OTA reports) does not tick back to back.
On SQLite and PostgreSQL, no broker (the controller publishes nothing without one)."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import update

from fleet_manager.models import Device, DevicePhase
from fleet_manager.rollouts import WAKE_MIN_GAP_S, RolloutSpec, RolloutTarget
from fleet_manager.service import FleetService
from tests.fleet_manager.conftest import RegisteredModels

ACTOR = "test:operator"
DEVICES = 3


def rollout_service(make_service: Callable[..., FleetService], models: RegisteredModels) -> FleetService:
    service = make_service(start=False)
    with service.db.write() as session:
        for index in range(DEVICES):
            session.add(
                Device(
                    id=f"dev-{index}",
                    state="online",
                    active_model_name=models.name,
                    active_model_version=models.v1.version,
                )
            )
    return service


def no_probation(models: RegisteredModels) -> RolloutSpec:
    return RolloutSpec(
        model=models.name,
        version=models.v2.version,
        target=RolloutTarget(all=True),
        waves=[100],
        probation_s=0,
        success_threshold=1.0,
        require_telemetry=False,
    )


def test_a_device_without_probation_time_is_proven_in_the_tick_that_sees_it_active(
    make_service: Callable[..., FleetService], fleet_models: RegisteredModels
) -> None:
    service = rollout_service(make_service, fleet_models)
    controller = service.controller
    rollout = controller.create(no_probation(fleet_models), ACTOR)
    controller.tick()  # starts the wave and sends the desired model
    _, rows = controller.get(rollout.id)
    assert {row.phase for row in rows} == {DevicePhase.SENT.value}
    with service.db.write() as session:
        session.execute(
            update(Device).values(
                ota_state="active",
                ota_rollout_id=rollout.id,
                ota_model_name=fleet_models.name,
                ota_model_version=fleet_models.v2.version,
                ota_progress=1.0,
            )
        )
    controller.tick()
    finished, rows = controller.get(rollout.id)
    assert finished.state == "completed"
    assert all(row.proven_at is not None and row.proven_at == row.activated_at for row in rows)


def test_a_stream_of_wakes_is_paced(
    make_service: Callable[..., FleetService], fleet_models: RegisteredModels
) -> None:
    service = rollout_service(make_service, fleet_models)
    controller = service.controller
    controller.create(no_probation(fleet_models), ACTOR)
    controller.start(tick_s=30.0)  # no periodic tick within the test: every tick here is a woken one
    try:
        deadline = time.monotonic() + 5
        while controller.ticks < 2:  # the first pass (recover + tick) and the wake from create
            assert time.monotonic() < deadline, "the controller did not tick"
            time.sleep(0.01)
        before, started = controller.ticks, time.monotonic()
        while time.monotonic() - started < 0.5:
            controller.wake()
            time.sleep(0.002)
        elapsed = time.monotonic() - started
        woken = controller.ticks - before
    finally:
        controller.stop()
    assert 1 <= woken <= elapsed / WAKE_MIN_GAP_S + 2, f"{woken} ticks for ~250 wakes in {elapsed:.2f} s"
