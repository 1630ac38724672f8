"""Staged rollouts against a small simulated fleet over the real broker, on SQLite and PostgreSQL:
waves, the download cap, health gates, pause/resume/abort, error-threshold pause, rollback, conflicts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from fleet_manager.models import AuditEntry, Device, DevicePhase, Rollout, RolloutDevice
from fleet_manager.rollouts import (
    RolloutConflictError,
    RolloutSpec,
    RolloutStateError,
    RolloutTarget,
    RolloutValidationError,
    wave_sizes,
)
from fleet_manager.service import FleetService
from fleet_protocol.mqtt import MqttSession, MqttSettings
from fleet_protocol.payloads import ModelRef, decode_model_desired
from tests.broker import Inbox, MosquittoBroker
from tests.fleet_manager.conftest import RegisteredModels, topics_of, wait_until
from tests.fleet_manager.fleet_sim import SimDevice, SimFleet

ACTOR = "test:operator"


def spec(models: RegisteredModels, **kw: Any) -> RolloutSpec:
    values: dict[str, Any] = {
        "model": models.name,
        "alias": "production",
        "target": RolloutTarget(all=True),
        "waves": [50, 100],
        "probation_s": 0.3,
        "success_threshold": 1.0,
        "error_threshold": 0.1,
    }
    values.update(kw)
    return RolloutSpec(**values)


@contextmanager
def sim_fleet(
    service: FleetService, broker: MosquittoBroker, models: RegisteredModels, count: int, **kw: Any
) -> Iterator[SimFleet]:
    v1 = ModelRef(name=models.name, version=models.v1.version)
    devices = [SimDevice(f"dev-{i:02d}", v1) for i in range(count)]
    with SimFleet(broker, topics_of(service), devices, **kw) as sim:

        def registered() -> bool:
            with service.db.read() as s:
                rows = s.execute(select(Device).where(Device.active_model_version == models.v1.version)).all()
                return len(rows) == count

        wait_until(registered, 15, f"{count} simulated devices to be registered")
        yield sim


def rollout_rows(service: FleetService, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]:
    return service.controller.get(rollout_id)


def wait_state(service: FleetService, rollout_id: str, state: str, timeout: float = 30) -> Rollout:
    def reached() -> Rollout | None:
        rollout, _ = rollout_rows(service, rollout_id)
        return rollout if rollout.state == state else None

    try:
        return wait_until(reached, timeout, f"rollout {rollout_id} to be {state}")  # type: ignore[no-any-return]
    except AssertionError:
        rollout, rows = rollout_rows(service, rollout_id)
        phases = {r.device_id: (r.wave, r.phase, r.error) for r in rows}
        raise AssertionError(f"rollout is {rollout.state} ({rollout.message}); devices: {phases}") from None


def audit_actions(service: FleetService, rollout_id: str) -> list[str]:
    with service.db.read() as s:
        rows = s.execute(
            select(AuditEntry.action).where(AuditEntry.target_id == rollout_id).order_by(AuditEntry.id)
        ).scalars()
        return list(rows)


def max_overlap(rows: list[RolloutDevice]) -> int:
    """Most devices at once between 'desired sent' and 'activated'."""
    edges: list[tuple[datetime, int]] = []
    for r in rows:
        if r.sent_at and r.activated_at:
            edges += [(r.sent_at, 1), (r.activated_at, -1)]
    level = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        level += step
        peak = max(peak, level)
    return peak


def test_wave_sizes_and_spec_validation() -> None:
    assert wave_sizes(10, [10, 50, 100]) == [1, 4, 5]
    assert wave_sizes(200, [10, 50, 100]) == [20, 80, 100]
    assert wave_sizes(1, [10, 50, 100]) == [1, 0, 0]
    assert wave_sizes(3, [5, 25, 100]) == [1, 1, 1]
    target = RolloutTarget(all=True)
    for bad in ([50, 40, 100], [10, 50], [0, 100], [10, 150]):
        with pytest.raises(ValueError, match="wave"):
            RolloutSpec(model="m", version="1", target=target, waves=bad)
    with pytest.raises(ValueError, match="exactly one of version and alias"):
        RolloutSpec(model="m", version="1", alias="production", target=target)
    with pytest.raises(ValueError, match="target is empty"):
        RolloutTarget()
    assert RolloutSpec.parse_model_ref("yolo@3") == ("yolo", "3", None)
    assert RolloutSpec.parse_model_ref("yolo@production") == ("yolo", None, "production")
    with pytest.raises(RolloutValidationError, match="NAME@VERSION"):
        RolloutSpec.parse_model_ref("yolo")


def test_waves_complete_with_download_cap(
    mqtt_broker: MosquittoBroker, make_service: Callable[..., FleetService], fleet_models: RegisteredModels
) -> None:
    service = make_service(mqtt_broker)
    with sim_fleet(service, mqtt_broker, fleet_models, 10) as sim:
        rollout = service.controller.create(
            spec(fleet_models, waves=[10, 50, 100], max_concurrent=2, max_latency_p95_ms=100), ACTOR
        )
        assert rollout.model_version == fleet_models.v2.version
        assert rollout.alias == "production"
        wait_state(service, rollout.id, "completed")
        _final, rows = rollout_rows(service, rollout.id)
        assert all(sim.model_of(d) == (fleet_models.name, fleet_models.v2.version) for d in sim.devices)
        assert [sum(1 for r in rows if r.wave == w) for w in range(3)] == [1, 4, 5]
        assert all(r.phase == DevicePhase.ACTIVE.value and r.proven_at is not None for r in rows)
        # A wave starts only after the previous one is proven (healthy for its probation), not just installed.
        for wave in (1, 2):
            proven_before = max(r.proven_at for r in rows if r.wave == wave - 1)  # type: ignore[type-var]
            assert min(r.sent_at for r in rows if r.wave == wave) >= proven_before  # type: ignore[type-var]
        assert max_overlap(rows) <= 2
        assert audit_actions(service, rollout.id) == [
            "rollout.create",
            "rollout.start",
            "rollout.advance",
            "rollout.advance",
            "rollout.complete",
        ]
        # Completed: the devices are free for the next rollout (here, back to v1 by version).
        again = service.controller.create(
            spec(fleet_models, alias=None, version=fleet_models.v1.version), ACTOR
        )
        wait_state(service, again.id, "completed")
        assert all(sim.model_of(d) == (fleet_models.name, fleet_models.v1.version) for d in sim.devices)


def test_failures_pause_the_first_wave_then_rollback(
    mqtt_broker: MosquittoBroker, make_service: Callable[..., FleetService], fleet_models: RegisteredModels
) -> None:
    service = make_service(mqtt_broker)
    with sim_fleet(service, mqtt_broker, fleet_models, 10) as sim:
        sim.hold()
        rollout = service.controller.create(spec(fleet_models, waves=[50, 100], success_threshold=0.6), ACTOR)
        _, rows = rollout_rows(service, rollout.id)
        failing = [r.device_id for r in rows if r.wave == 0][:2]  # 20% of the fleet fails verification
        for device_id in failing:
            sim.devices[device_id].fail_verify = True
        sim.release()
        paused = wait_state(service, rollout.id, "paused")
        assert paused.current_wave == 0
        assert "wave 1" in (paused.message or "")
        assert "signature does not verify" in (paused.message or "")
        _, rows = rollout_rows(service, rollout.id)
        assert {r.device_id for r in rows if r.phase == DevicePhase.FAILED.value} <= set(failing)
        assert all(r.phase == DevicePhase.WAITING.value for r in rows if r.wave == 1)  # never started
        # Resuming with the failures acknowledged is possible; here the operator rolls back instead.
        service.controller.rollback(rollout.id, ACTOR, "bad model")
        v1 = (fleet_models.name, fleet_models.v1.version)

        def all_back() -> bool:
            _, rows = rollout_rows(service, rollout.id)
            return all(r.phase in (DevicePhase.REVERTED.value, DevicePhase.CANCELLED.value) for r in rows)

        wait_until(all_back, 20, "every device to be reverted")
        assert all(sim.model_of(d) == v1 for d in sim.devices), {d: sim.model_of(d) for d in sim.devices}
        final, rows = rollout_rows(service, rollout.id)
        assert final.state == "rolled_back"
        assert {r.device_id for r in rows if r.phase == DevicePhase.REVERTED.value} == {
            r.device_id for r in rows if r.wave == 0
        }
        with pytest.raises(RolloutStateError, match="already rolled back"):
            service.controller.rollback(rollout.id, ACTOR)
        assert audit_actions(service, rollout.id)[-2:] == ["rollout.pause", "rollout.rollback"]


def test_latency_gate_stops_the_wave_and_auto_rollback(
    mqtt_broker: MosquittoBroker, make_service: Callable[..., FleetService], fleet_models: RegisteredModels
) -> None:
    service = make_service(mqtt_broker)
    with sim_fleet(service, mqtt_broker, fleet_models, 4) as sim:
        for device in sim.devices.values():
            device.latency_ms = 250.0  # every device is over the gate once it runs the new model
        rollout = service.controller.create(
            spec(
                fleet_models, max_latency_p95_ms=100, probation_s=1.0, error_threshold=0.5, auto_rollback=True
            ),
            ACTOR,
        )
        final = wait_state(service, rollout.id, "rolled_back")
        assert "p95 latency 250 ms is over the 100 ms gate" in (final.message or "")
        _, rows = rollout_rows(service, rollout.id)
        assert final.current_wave == 0
        assert all(r.phase == DevicePhase.CANCELLED.value and r.sent_at is None for r in rows if r.wave == 1)
        v1 = (fleet_models.name, fleet_models.v1.version)
        wait_until(lambda: all(sim.model_of(d) == v1 for d in sim.devices), 20, "the wave to be rolled back")
        assert audit_actions(service, rollout.id)[-1] == "rollout.rollback"
        with service.db.read() as s:
            entry = s.execute(select(AuditEntry).where(AuditEntry.action == "rollout.rollback")).scalar_one()
            assert entry.actor == "controller"


def retained_desired(broker: MosquittoBroker, root: str, device_ids: list[str]) -> dict[str, bytes]:
    """What a device subscribing now would get as its retained model/desired (absent: nothing retained)."""
    inbox = Inbox()
    session = MqttSession(
        MqttSettings(
            host=broker.host, port=broker.port, client_id="peek-desired", clean_start=True, topic_root=root
        )
    )
    session.subscribe(f"{root}/devices/+/model/desired", inbox)
    session.connect()
    assert session.wait_connected(10)
    inbox.wait_for(lambda m: len(m) >= len(device_ids), timeout=2)
    session.disconnect()
    return {m.topic.split("/")[-3]: m.payload for m in inbox.messages if m.payload}


def test_pause_resume_abort_and_conflict(
    mqtt_broker: MosquittoBroker, make_service: Callable[..., FleetService], fleet_models: RegisteredModels
) -> None:
    service = make_service(mqtt_broker)
    with sim_fleet(service, mqtt_broker, fleet_models, 6) as sim:
        service.controller.stop()  # ticks by hand until resumed, so the pause lands before the start
        rollout = service.controller.create(spec(fleet_models, waves=[34, 67, 100]), ACTOR)
        service.controller.pause(rollout.id, ACTOR, "change window not open yet")
        # One active rollout per device: another rollout over any of them is refused, naming them.
        with pytest.raises(RolloutConflictError, match="already in an active rollout") as conflict:
            service.controller.create(spec(fleet_models, target=RolloutTarget(device_ids=["dev-03"])), ACTOR)
        assert conflict.value.conflicts == {"dev-03": rollout.id}
        with pytest.raises(RolloutStateError, match="cannot pause"):
            service.controller.pause(rollout.id, ACTOR)
        service.controller.tick()
        assert all(not d.desired_msg_ids for d in sim.devices.values())  # paused: nothing sent
        _, rows = rollout_rows(service, rollout.id)
        sim.freeze([r.device_id for r in rows if r.wave > 0])  # they receive the model but do not act yet
        service.controller.resume(rollout.id, ACTOR)
        service.controller.start(0.1)

        def first_wave_proven() -> bool:
            _, rows = rollout_rows(service, rollout.id)
            return all(r.proven_at is not None for r in rows if r.wave == 0)

        wait_until(first_wave_proven, 20, "the first wave to be proven")
        wait_until(
            lambda: any(r.phase == DevicePhase.SENT.value for r in rollout_rows(service, rollout.id)[1]),
            10,
            "the second wave to be sent",
        )
        aborted = service.controller.abort(rollout.id, ACTOR, "operator saw enough")
        assert aborted.state == "aborted"
        service.controller.tick()
        _, rows = rollout_rows(service, rollout.id)
        first = [r.device_id for r in rows if r.wave == 0]
        second = [r.device_id for r in rows if r.wave == 1]
        assert all(r.phase == DevicePhase.ACTIVE.value for r in rows if r.wave == 0)
        assert all(r.phase == DevicePhase.CANCELLED.value for r in rows if r.wave > 0)
        # The first wave keeps its (retained) desired model; the second wave's desired model was cleared.
        root = topics_of(service).root

        found: dict[str, bytes] = {}

        def only_first_wave_retained() -> dict[str, bytes] | None:
            found.clear()
            found.update(retained_desired(mqtt_broker, root, first + second))
            return dict(found) if set(found) == set(first) else None

        try:
            retained = wait_until(
                only_first_wave_retained, 10, "the second wave's desired model to be cleared"
            )
        except AssertionError:
            with service.db.read() as session:
                state = [
                    (
                        r.device_id,
                        r.wave,
                        r.phase,
                        r.desired_seq,
                        r.publish_pending,
                        len(r.desired_payload or b"-"),
                    )
                    for r in session.execute(select(RolloutDevice)).scalars()
                ]
            connects = service.mqtt.session.connect_count if service.mqtt else None
            retained_ids = {d: getattr(decode_model_desired(p), "msg_id", None) for d, p in found.items()}
            seen = {d: sim.devices[d].desired_arrivals for d in second}
            raise AssertionError(
                f"still retained: {retained_ids}; the second wave received (msg_id, retained): {seen}; "
                f"rows: {state}; "
                f"fleet connects: {connects}"
            ) from None
        assert all(decode_model_desired(p).version == fleet_models.v2.version for p in retained.values())  # type: ignore[union-attr]
        sim.thaw()  # they now see only the latest desired state: cleared, so they keep v1
        time.sleep(0.5)
        v1 = (fleet_models.name, fleet_models.v1.version)
        assert all(sim.model_of(d) == v1 for d in second + [r.device_id for r in rows if r.wave == 2])
        # Aborted: the devices are free again.
        again = service.controller.create(
            spec(fleet_models, target=RolloutTarget(device_ids=["dev-03"])), ACTOR
        )
        assert again.device_count == 1
        assert audit_actions(service, rollout.id) == [
            "rollout.create",
            "rollout.pause",
            "rollout.resume",
            "rollout.start",
            "rollout.advance",
            "rollout.abort",
        ]
