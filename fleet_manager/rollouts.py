"""Staged rollouts: the controller's state machine, free of HTTP and MQTT; everything lives in the database.

A rollout pushes one model version to a target (device ids, groups, tags, or all) in waves of cumulative
percentages, e.g. [10, 50, 100]. States: ``pending → running (wave k) → paused → completed | aborted |
rolled_back``. Each device of the rollout has a phase (`DevicePhase`):

    waiting → queued → sent → active → (proven) ; sent → failed ; active → unhealthy | failed
    any sent → cancelled (abort) ; any sent → reverting → reverted (rollback)

- Operators act through `create`, `pause`, `resume`, `abort` and `rollback`; these only change rows (and
  the audit log). The controller's `tick` does the rest: it maps what devices reported (`model/reported`,
  `status` and telemetry, written by ingest) onto phases, checks the error threshold, advances waves,
  hands out download slots, and publishes the desired models it decided on.
- A wave advances when at least `success_threshold` of its devices are *proven*: active on the new model
  for `probation_s`, with telemetry since activation (unless `require_telemetry` is off) and never over
  the latency gate (`max_latency_p95_ms`) meanwhile. Health, not just "installed".
- When the failed (failed + unhealthy) share of any started wave exceeds `error_threshold`, the rollout
  pauses, or aborts when `on_error="abort"`; with `auto_rollback` it rolls back instead. Resuming a rollout
  acknowledges the failures so far: only new ones count against the threshold.
- Abort clears the retained `model/desired` of devices that had not activated the model (they keep what
  they run). Rollback sets every touched device's desired model back to the one it ran before (cleared
  when that is unknown or no longer in the registry).
- `max_concurrent` caps devices installing at once (only online devices get a slot then).
- One active rollout per device: `device_locks` has the device id as its primary key, so a conflicting
  create fails even when two race; the error lists the devices and the rollouts that hold them.

Crash safety: each decision is committed together with the exact payload to publish (`desired_payload`,
`publish_pending`); publishing happens after the commit and is idempotent (retained, same bytes, same
msg_id), and `recover()` re-publishes every device's current desired payload at start. So `kill -9` at any
moment loses nothing: after a restart the controller carries on from the committed state.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Table, and_, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, lazyload

from fleet_manager import audit
from fleet_manager.db import Database
from fleet_manager.models import (
    ACTIVE_ROLLOUT_STATES,
    Device,
    DeviceLock,
    DevicePhase,
    DeviceTag,
    Rollout,
    RolloutDevice,
    RolloutState,
    utcnow,
)
from fleet_manager.registry import ModelCatalog, ModelInfo, ModelNotFoundError
from fleet_protocol.ids import new_msg_id
from fleet_protocol.payloads import ModelDesired, OtaState, encode

log = logging.getLogger(__name__)

ROLLBACK_SUFFIX = ".rb"
ROLLBACK_SETTLE_S = 2.0  # a device silent this long after a rollback is taken to have no update under way
# A wake (ingest wrote OTA reports, an operator acted) ticks at once, but no sooner than this after the last
# tick began, nor sooner than WAKE_SPACING x the CPU time it took: during a 1,000-device wave reports arrive
# continuously and a tick (~70 ms of CPU) after every batch kept a core busy. Reports wait <= ~0.2 s more.
# CPU time, not wall time: on a loaded machine a tick's wall time stretches, and spacing by it left the
# last reports of a wave waiting seconds.
WAKE_MIN_GAP_S = 0.05
WAKE_SPACING = 3.0
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_REF = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
_INSTALLING = (DevicePhase.SENT.value,)
_FAILURES = (DevicePhase.FAILED.value, DevicePhase.UNHEALTHY.value)
_OTA_GAVE_UP = frozenset({OtaState.FAILED.value, OtaState.ROLLED_BACK.value})
_OTA_IN_PROGRESS = frozenset(
    s.value for s in (OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.STAGING, OtaState.ACTIVATING)
)


# ---- errors -------------------------------------------------------------------------------------------


class RolloutError(Exception):
    """Base of the errors operators see; the message says what to do."""


class RolloutNotFoundError(RolloutError, LookupError):
    pass


class RolloutValidationError(RolloutError, ValueError):
    pass


class RolloutStateError(RolloutError):
    """The action does not apply in the rollout's current state."""


class RolloutConflictError(RolloutError):
    """Devices are already in another active rollout."""

    def __init__(self, conflicts: dict[str, str]) -> None:
        self.conflicts = dict(sorted(conflicts.items()))
        shown = ", ".join(
            f"{device} (rollout {rollout})" for device, rollout in list(self.conflicts.items())[:10]
        )
        more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        super().__init__(
            f"{len(conflicts)} target device(s) are already in an active rollout: {shown}{more}. "
            "One active rollout per device: wait for it to finish, or abort it, or leave these devices out"
        )


# ---- the request ----------------------------------------------------------------------------------------


class RolloutTarget(BaseModel):
    """Which devices: the union of the ids, the groups' members, and the devices carrying all `tags`."""

    model_config = ConfigDict(extra="forbid")

    device_ids: list[str] = Field(default_factory=list, max_length=100_000, description="Device ids.")
    groups: list[str] = Field(default_factory=list, max_length=1000, description="Device groups.")
    tags: dict[str, str] = Field(default_factory=dict, max_length=32, description="Tags all must match.")
    all: bool = Field(default=False, description="Every registered device.")

    @model_validator(mode="after")
    def _something(self) -> RolloutTarget:
        if not (self.all or self.device_ids or self.groups or self.tags):
            raise ValueError("the target is empty: give device_ids, groups, tags, or all=true")
        return self


class RolloutSpec(BaseModel):
    """What to roll out, where, and how cautiously."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=_NAME, description="Registered model name.")
    version: str | None = Field(default=None, pattern=_REF, description="Model version (or give alias).")
    alias: str | None = Field(default=None, pattern=_REF, description="Registry alias, e.g. 'production'.")
    target: RolloutTarget = Field(description="The devices.")
    waves: list[float] = Field(
        default_factory=lambda: [10.0, 50.0, 100.0],
        min_length=1,
        max_length=20,
        description="Cumulative percentages of the target per wave, increasing, ending at 100.",
    )
    success_threshold: float = Field(
        default=0.9, gt=0, le=1, description="Share of a wave's devices that must be proven to advance."
    )
    error_threshold: float = Field(
        default=0.1, ge=0, lt=1, description="Failed share of a wave above which the rollout stops."
    )
    on_error: Literal["pause", "abort"] = Field(default="pause", description="What the error threshold does.")
    probation_s: float = Field(
        default=60.0, ge=0, le=7 * 86_400, description="Seconds a device must stay healthy on the new model."
    )
    max_latency_p95_ms: float | None = Field(
        default=None, gt=0, description="Health gate: telemetry p95 latency above this fails the device."
    )
    require_telemetry: bool = Field(
        default=True, description="A device counts as proven only after telemetry since its activation."
    )
    auto_rollback: bool = Field(
        default=False, description="On the error threshold, roll the devices back to their previous model."
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Most devices installing at once (None: no cap)."
    )

    @model_validator(mode="after")
    def _version_or_alias(self) -> RolloutSpec:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of version and alias")
        return self

    @field_validator("waves")
    @classmethod
    def _increasing_to_100(cls, waves: list[float]) -> list[float]:
        if any(p <= 0 or p > 100 for p in waves):
            raise ValueError(f"wave percentages must lie in (0, 100], got {waves}")
        if any(b <= a for a, b in itertools.pairwise(waves)):
            raise ValueError(f"wave percentages must increase (they are cumulative), got {waves}")
        if waves[-1] != 100:
            raise ValueError(f"the last wave must be 100 (the whole target), got {waves}")
        return waves

    @classmethod
    def parse_model_ref(cls, ref: str) -> tuple[str, str | None, str | None]:
        """`name@3` → version 3; `name@production` → alias (digits only = a version)."""
        name, sep, rest = ref.partition("@")
        if not sep or not name or not rest:
            raise RolloutValidationError(f"model {ref!r}: write NAME@VERSION or NAME@ALIAS, e.g. yolov8n@3")
        return (name, rest, None) if rest.isdigit() else (name, None, rest)


class DesiredPublisher(Protocol):
    """Publishes a retained `model/desired` payload (b"" clears it)."""

    def publish_desired(self, device_id: str, payload: bytes) -> bool:
        """True when the message was accepted for delivery (it is then re-sent until acknowledged)."""
        ...


@dataclass(frozen=True)
class WaveProgress:
    index: int
    percent: float
    devices: int
    phases: dict[str, int]
    proven: int

    @property
    def failures(self) -> int:
        return sum(self.phases.get(p, 0) for p in _FAILURES)


def wave_sizes(count: int, waves: Sequence[float]) -> list[int]:
    """Devices per wave for `count` devices and cumulative percentages (each wave gets at least one
    device while devices remain)."""
    sizes: list[int] = []
    done = 0
    for percent in waves:
        upto = min(count, max(done + 1, math.ceil(count * percent / 100 - 1e-9)))
        sizes.append(upto - done)
        done = upto
    return sizes


def needed(count: int, share: float) -> int:
    return math.ceil(count * share - 1e-9)


def artifact_url(public_url: str, name: str, version: str) -> str:
    return f"{public_url.rstrip('/')}/v1/artifacts/{name}/{version}"


# ---- the controller -----------------------------------------------------------------------------------


class RolloutController:
    """Creates rollouts and drives them; share one per process (its methods are thread-safe)."""

    def __init__(
        self,
        db: Database,
        catalog: ModelCatalog,
        *,
        public_url: str,
        publisher: DesiredPublisher | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.public_url = public_url
        self.publisher = publisher
        self._clock = clock
        self._tick_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    # ---- operator actions ------------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, actor: str) -> Rollout:
        info = self._resolve(spec)
        rollout_id = f"ro-{new_msg_id()}"
        now = self._clock()
        try:
            with self.db.write() as session:
                devices = self._target_devices(session, spec.target)
                if not devices:
                    raise RolloutValidationError(
                        f"the target matches no registered device: {spec.target.model_dump()}"
                    )
                ids = [d.id for d in devices]
                held = self._locked(session, ids)
                if held:
                    raise RolloutConflictError(held)
                rollout = Rollout(
                    id=rollout_id,
                    model_name=info.name,
                    model_version=info.version,
                    alias=spec.alias,
                    sha256=info.sha256,
                    size=info.size,
                    signature=info.signature,
                    variant=info.variant,
                    url=artifact_url(self.public_url, info.name, info.version),
                    target=spec.target.model_dump(),
                    waves=list(spec.waves),
                    success_threshold=spec.success_threshold,
                    error_threshold=spec.error_threshold,
                    on_error=spec.on_error,
                    probation_s=spec.probation_s,
                    max_latency_p95_ms=spec.max_latency_p95_ms,
                    require_telemetry=spec.require_telemetry,
                    auto_rollback=spec.auto_rollback,
                    max_concurrent=spec.max_concurrent,
                    state=RolloutState.PENDING.value,
                    current_wave=0,
                    device_count=len(devices),
                    acknowledged_failures={},
                    created_by=actor,
                    created_at=now,
                    updated_at=now,
                )
                session.add(rollout)
                session.flush()
                order = sorted(
                    devices, key=lambda d: hashlib.sha256(f"{rollout_id}/{d.id}".encode()).digest()
                )
                sizes = wave_sizes(len(order), spec.waves)
                position = 0
                for wave, size in enumerate(sizes):
                    for device in order[position : position + size]:
                        session.add(
                            RolloutDevice(
                                rollout_id=rollout_id,
                                device_id=device.id,
                                wave=wave,
                                position=position,
                                phase=DevicePhase.WAITING.value,
                                prev_name=device.active_model_name,
                                prev_version=device.active_model_version,
                                updated_at=now,
                                desired_seq=0,
                                publish_pending=False,
                            )
                        )
                        session.add(DeviceLock(device_id=device.id, rollout_id=rollout_id))
                        position += 1
                session.flush()
                audit.record(
                    session,
                    actor,
                    "rollout.create",
                    "rollout",
                    rollout_id,
                    model=f"{info.name}@{info.version}",
                    alias=spec.alias,
                    devices=len(devices),
                    waves=list(spec.waves),
                    wave_sizes=sizes,
                    spec=spec.model_dump(mode="json"),
                )
        except IntegrityError:
            # Another rollout took some of these devices between our check and our insert.
            with self.db.read() as session:
                held = self._locked(session, self._target_ids(session, spec.target))
            raise RolloutConflictError(held or {"(unknown)": "a concurrent rollout"}) from None
        self.wake()
        return rollout

    def pause(self, rollout_id: str, actor: str, reason: str | None = None) -> Rollout:
        with self.db.write() as session:
            rollout = self._lock(session, rollout_id)
            self._require(rollout, {RolloutState.PENDING, RolloutState.RUNNING}, "pause")
            rollout.state = RolloutState.PAUSED.value
            rollout.message = reason or f"paused by {actor}"
            rollout.updated_at = self._clock()
            audit.record(session, actor, "rollout.pause", "rollout", rollout_id, reason=reason)
        return rollout

    def resume(self, rollout_id: str, actor: str) -> Rollout:
        with self.db.write() as session:
            rollout = self._lock(session, rollout_id)
            self._require(rollout, {RolloutState.PAUSED}, "resume")
            rows = self._rows(session, rollout_id)
            failures: Counter[int] = Counter(r.wave for r in rows if r.phase in _FAILURES)
            rollout.acknowledged_failures = {str(w): n for w, n in failures.items()}
            rollout.state = (RolloutState.RUNNING if rollout.started_at else RolloutState.PENDING).value
            rollout.message = None
            rollout.updated_at = self._clock()
            audit.record(
                session,
                actor,
                "rollout.resume",
                "rollout",
                rollout_id,
                acknowledged_failures=sum(failures.values()),
            )
        self.wake()
        return rollout

    def abort(self, rollout_id: str, actor: str, reason: str | None = None) -> Rollout:
        with self.db.write() as session:
            rollout = self._lock(session, rollout_id)
            self._require(rollout, ACTIVE_ROLLOUT_STATES, "abort")
            self._abort(session, rollout, actor, reason or f"aborted by {actor}")
        self.wake()
        return rollout

    def rollback(self, rollout_id: str, actor: str, reason: str | None = None) -> Rollout:
        with self.db.read() as session:
            rollout = self._get(session, rollout_id)
            previous = {
                (r.prev_name, r.prev_version)
                for r in self._rows(session, rollout_id)
                if r.prev_name and r.prev_version
            }
        infos = self._lookup_previous(previous)  # registry calls outside the transaction
        with self.db.write() as session:
            rollout = self._lock(session, rollout_id)
            if rollout.state == RolloutState.ROLLED_BACK.value:
                raise RolloutStateError(f"rollout {rollout_id} is already rolled back")
            self._rollback(session, rollout, actor, reason or f"rolled back by {actor}", infos)
        self.wake()
        return rollout

    # ---- reading ---------------------------------------------------------------------------------------

    def get(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]:
        with self.db.read() as session:
            rollout = self._get(session, rollout_id)
            return rollout, self._rows(session, rollout_id)

    def list_rollouts(
        self, *, states: Iterable[str] | None = None, limit: int = 100, offset: int = 0
    ) -> list[Rollout]:
        with self.db.read() as session:
            query = (
                select(Rollout)
                .order_by(Rollout.created_at.desc(), Rollout.id.desc())
                .limit(limit)
                .offset(offset)
            )
            if states:
                query = query.where(Rollout.state.in_(list(states)))
            return list(session.execute(query).scalars())

    @staticmethod
    def progress(rollout: Rollout, rows: Sequence[RolloutDevice]) -> list[WaveProgress]:
        by_wave: dict[int, list[RolloutDevice]] = defaultdict(list)
        for row in rows:
            by_wave[row.wave].append(row)
        waves = []
        for index, percent in enumerate(rollout.waves):
            members = by_wave.get(index, [])
            phases = Counter(r.phase for r in members)
            proven = sum(
                1 for r in members if r.proven_at is not None and r.phase == DevicePhase.ACTIVE.value
            )
            waves.append(WaveProgress(index, float(percent), len(members), dict(phases), proven))
        return waves

    # ---- the loop --------------------------------------------------------------------------------------

    def start(self, tick_s: float) -> None:
        """Recover, then tick every `tick_s` (sooner when woken) on a thread of its own."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(tick_s,), name="fleet-rollouts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _run(self, tick_s: float) -> None:
        recovered = False
        while not self._stop.is_set():
            began, began_cpu = time.monotonic(), time.thread_time()
            try:
                if not recovered:
                    count = self.recover()
                    recovered = True
                    if count:
                        log.info("re-publishing the desired model of %d device(s) after start", count)
                self.tick()
            except Exception:
                log.exception("rollout controller tick failed; retrying")
            if self._wake.wait(tick_s):
                spacing = max(WAKE_MIN_GAP_S, WAKE_SPACING * (time.thread_time() - began_cpu))
                self._stop.wait(max(0.0, began + spacing - time.monotonic()))
            self._wake.clear()

    def recover(self) -> int:
        """Mark every device's current desired payload for publishing again (after a restart)."""
        with self.db.write() as session:
            ids = (
                session.execute(
                    select(RolloutDevice.id)
                    .join(Device, Device.id == RolloutDevice.device_id)
                    .where(
                        RolloutDevice.desired_payload.is_not(None),
                        Device.desired_rollout_id == RolloutDevice.rollout_id,
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                session.execute(
                    update(RolloutDevice).where(RolloutDevice.id.in_(ids)).values(publish_pending=True)
                )
        return len(ids)

    def tick(self) -> None:
        """One pass over every rollout that needs attention, then publish what was decided."""
        with self._tick_lock:
            self.ticks += 1
            with self.db.read() as session:
                ids = set(
                    session.execute(
                        select(Rollout.id).where(Rollout.state.in_([s.value for s in ACTIVE_ROLLOUT_STATES]))
                    ).scalars()
                )
                ids.update(
                    session.execute(
                        select(RolloutDevice.rollout_id)
                        .where(RolloutDevice.phase.in_([DevicePhase.SENT.value, DevicePhase.REVERTING.value]))
                        .distinct()
                    ).scalars()
                )
            for rollout_id in sorted(ids):
                try:
                    self._tick_rollout(rollout_id)
                except Exception:
                    log.exception("rollout %s: tick failed", rollout_id)
            self.publish_pending()

    def publish_pending(self) -> int:
        """Publish the desired payloads decided but not yet handed to the broker; returns how many."""
        if self.publisher is None:
            return 0
        with self.db.read() as session:
            rows = session.execute(
                select(
                    RolloutDevice.id,
                    RolloutDevice.device_id,
                    RolloutDevice.desired_payload,
                    RolloutDevice.desired_seq,
                    RolloutDevice.rollout_id,
                    Device.desired_rollout_id,
                )
                .outerjoin(Device, Device.id == RolloutDevice.device_id)
                .where(RolloutDevice.publish_pending.is_(True))
                .order_by(RolloutDevice.id)
            ).all()
        if not rows:
            return 0
        published = 0
        done: list[tuple[int, int]] = []
        for row_id, device_id, payload, seq, rollout_id, owner in rows:
            if payload is None or owner != rollout_id:
                done.append((row_id, seq))  # revoked, or a newer rollout owns this device's desired model
            elif self.publisher.publish_desired(device_id, payload):
                done.append((row_id, seq))
                published += 1
        if done:
            with self.db.write() as session:
                # One executemany: a statement per row cost more than the publishing (1,000-device wave).
                session.connection().execute(
                    _CLEAR_PUBLISH_PENDING, [{"row_id": row_id, "seq": seq} for row_id, seq in done]
                )
        return published

    # ---- one rollout, one pass -------------------------------------------------------------------------

    def _tick_rollout(self, rollout_id: str) -> None:
        now = self._clock()
        with self.db.write() as session:
            rollout = self._lock(session, rollout_id)
            rows = self._rows(session, rollout_id)
            devices = self._devices(session, [r.device_id for r in rows])
            self._sync(rollout, rows, devices, now)
            state = rollout.state_enum
            if state is RolloutState.PENDING:
                self._start(session, rollout, rows, now)
                state = rollout.state_enum
            if state is RolloutState.RUNNING:
                self._step(session, rollout, rows, devices, now)

    def _sync(
        self, rollout: Rollout, rows: list[RolloutDevice], devices: dict[str, Device], now: datetime
    ) -> None:
        """Map what devices reported onto their phases (and judge health in probation)."""
        target = (rollout.model_name, rollout.model_version)
        in_probation = rollout.state_enum in ACTIVE_ROLLOUT_STATES
        for row in rows:
            device = devices.get(row.device_id)
            if device is None:
                continue
            running = _running_model(device)
            reported_for_us = device.ota_rollout_id == rollout.id
            superseded = device.desired_rollout_id != rollout.id
            if superseded and row.phase in (DevicePhase.SENT.value, DevicePhase.REVERTING.value):
                # A later rollout owns this device's desired model now (possible once this one ended).
                row.phase = DevicePhase.CANCELLED.value
                row.error = f"superseded by rollout {device.desired_rollout_id}"
                row.updated_at = now
            elif row.phase == DevicePhase.SENT.value:
                if running == target:
                    row.phase = DevicePhase.ACTIVE.value
                    row.activated_at = now
                    row.ota_state, row.progress, row.error = OtaState.ACTIVE.value, 1.0, None
                    if in_probation:  # judged in this pass (proven now when no probation time is asked)
                        self._judge(rollout, row, device, now)
                elif reported_for_us and device.ota_state in _OTA_GAVE_UP:
                    self._fail(row, device.ota_error or f"device reported {device.ota_state}", now)
                elif reported_for_us and (row.ota_state, row.progress) != (
                    device.ota_state,
                    device.ota_progress,
                ):
                    row.ota_state, row.progress = device.ota_state, device.ota_progress
                    row.updated_at = now
            elif row.phase == DevicePhase.ACTIVE.value and row.proven_at is None and in_probation:
                self._judge(rollout, row, device, now)
            elif row.phase == DevicePhase.REVERTING.value:
                previous = (row.prev_name, row.prev_version)
                # Back when it runs its previous model and is not about to leave it: it is not installing
                # the rolled-back model, and has answered the rollback, or failed the update, or had
                # time to start installing a desired model it may have received just before.
                installing = reported_for_us and device.ota_state in _OTA_IN_PROGRESS
                settled = (
                    device.ota_rollout_id == rollout.id + ROLLBACK_SUFFIX
                    or (reported_for_us and device.ota_state in _OTA_GAVE_UP)
                    or now - (rollout.finished_at or now) >= timedelta(seconds=ROLLBACK_SETTLE_S)
                )
                if running == previous and not installing and settled:
                    row.phase = DevicePhase.REVERTED.value
                    row.ota_state, row.updated_at = OtaState.ACTIVE.value, now
                elif (
                    device.ota_rollout_id == rollout.id + ROLLBACK_SUFFIX
                    and device.ota_state == OtaState.FAILED.value
                ) and row.error != device.ota_error:
                    row.error = f"rollback failed: {device.ota_error}"
                    row.updated_at = now

    def _judge(self, rollout: Rollout, row: RolloutDevice, device: Device, now: datetime) -> None:
        """Probation of an active, not yet proven device: failed, unhealthy, proven, or not yet decided."""
        if device.ota_rollout_id == rollout.id and device.ota_state in _OTA_GAVE_UP:
            self._fail(row, device.ota_error or f"device reported {device.ota_state}", now)
            return
        activated = row.activated_at or now
        fresh = device.telemetry_at is not None and device.telemetry_at > activated
        gate = rollout.max_latency_p95_ms
        if fresh and gate is not None and device.latency_p95_ms is not None and device.latency_p95_ms > gate:
            row.phase = DevicePhase.UNHEALTHY.value
            row.error = f"p95 latency {device.latency_p95_ms:.0f} ms is over the {gate:g} ms gate"
            row.failed_at = row.updated_at = now
        elif now - activated >= timedelta(seconds=rollout.probation_s) and (
            fresh or not rollout.require_telemetry
        ):
            row.proven_at = row.updated_at = now

    def _fail(self, row: RolloutDevice, error: str, now: datetime) -> None:
        row.phase = DevicePhase.FAILED.value
        row.error = error[:2000]
        row.failed_at = row.updated_at = now

    def _start(self, session: Session, rollout: Rollout, rows: list[RolloutDevice], now: datetime) -> None:
        rollout.state = RolloutState.RUNNING.value
        rollout.started_at = rollout.updated_at = now
        rollout.current_wave = 0
        self._queue_wave(rows, 0, now)
        audit.record(session, audit.CONTROLLER_ACTOR, "rollout.start", "rollout", rollout.id, wave=1)

    def _queue_wave(self, rows: list[RolloutDevice], wave: int, now: datetime) -> None:
        for row in rows:
            if row.wave == wave and row.phase == DevicePhase.WAITING.value:
                row.phase = DevicePhase.QUEUED.value
                row.updated_at = now

    def _step(
        self,
        session: Session,
        rollout: Rollout,
        rows: list[RolloutDevice],
        devices: dict[str, Device],
        now: datetime,
    ) -> None:
        by_wave: dict[int, list[RolloutDevice]] = defaultdict(list)
        for row in rows:
            by_wave[row.wave].append(row)
        # 1. the error threshold, over every started wave
        for wave in range(rollout.current_wave + 1):
            members = [r for r in by_wave.get(wave, []) if r.phase != DevicePhase.CANCELLED.value]
            failed = [r for r in members if r.phase in _FAILURES]
            new_failures = len(failed) - int(rollout.acknowledged_failures.get(str(wave), 0))
            if members and new_failures > 0 and new_failures / len(members) > rollout.error_threshold:
                errors = Counter((r.error or "unknown").split("\n")[0][:200] for r in failed)
                reason = (
                    f"wave {wave + 1}: {len(failed)} of {len(members)} devices failed, over the "
                    f"{rollout.error_threshold:.0%} error threshold; "
                    + "; ".join(f"{n}x {e}" for e, n in errors.most_common(3))
                )
                self._trip(session, rollout, reason)
                return
        # 2. advance when the current wave has enough proven devices
        wave = rollout.current_wave
        members = [r for r in by_wave.get(wave, []) if r.phase != DevicePhase.CANCELLED.value]
        proven = sum(1 for r in members if r.phase == DevicePhase.ACTIVE.value and r.proven_at is not None)
        if proven >= needed(len(members), rollout.success_threshold):
            if wave + 1 >= len(rollout.waves):
                rollout.state = RolloutState.COMPLETED.value
                rollout.finished_at = rollout.updated_at = now
                rollout.message = f"{proven} of {len(members)} devices in the last wave proven"
                self._release(session, rollout.id)
                audit.record(session, audit.CONTROLLER_ACTOR, "rollout.complete", "rollout", rollout.id)
                return
            rollout.current_wave = wave + 1
            rollout.updated_at = now
            self._queue_wave(rows, wave + 1, now)
            audit.record(
                session,
                audit.CONTROLLER_ACTOR,
                "rollout.advance",
                "rollout",
                rollout.id,
                wave=wave + 2,
                proven=proven,
                devices=len(members),
            )
        # 3. hand out download slots
        self._dispatch(rollout, rows, devices, now)

    def _dispatch(
        self, rollout: Rollout, rows: list[RolloutDevice], devices: dict[str, Device], now: datetime
    ) -> None:
        queued = sorted(
            (r for r in rows if r.phase == DevicePhase.QUEUED.value and r.wave <= rollout.current_wave),
            key=lambda r: (r.wave, r.position),
        )
        if not queued:
            return
        cap = rollout.max_concurrent
        slots = len(queued)
        if cap is not None:
            installing = sum(
                1
                for r in rows
                if r.phase in _INSTALLING
                and (d := devices.get(r.device_id)) is not None
                and d.state == "online"
            )
            slots = max(0, cap - installing)
        desired = None
        for row in queued:
            if slots <= 0:
                break
            device = devices.get(row.device_id)
            if device is None:
                row.phase, row.error, row.updated_at = DevicePhase.CANCELLED.value, "device revoked", now
                continue
            if cap is not None and device.state != "online":
                continue
            if desired is None:
                desired = self._desired_fields(rollout)
            payload = encode(ModelDesired(device_id=device.id, **desired))
            self._set_desired(
                row, device, rollout.id, payload, (rollout.model_name, rollout.model_version), now
            )
            row.phase = DevicePhase.SENT.value
            row.sent_at = now
            slots -= 1

    def _desired_fields(self, rollout: Rollout) -> dict[str, Any]:
        return {
            "rollout_id": rollout.id,
            "name": rollout.model_name,
            "version": rollout.model_version,
            "sha256": rollout.sha256,
            "size": rollout.size,
            "url": rollout.url,
            "signature": rollout.signature,
            "variant": rollout.variant,
        }

    def _set_desired(
        self,
        row: RolloutDevice,
        device: Device | None,
        rollout_id: str,
        payload: bytes,
        model: tuple[str | None, str | None],
        now: datetime,
    ) -> None:
        row.desired_payload = payload
        row.desired_seq = (row.desired_seq or 0) + 1
        row.publish_pending = True
        row.updated_at = now
        if device is not None:
            device.desired_rollout_id = rollout_id
            device.desired_name, device.desired_version = model

    def _trip(self, session: Session, rollout: Rollout, reason: str) -> None:
        log.warning("rollout %s: %s", rollout.id, reason)
        if rollout.auto_rollback:
            previous = {
                (r.prev_name, r.prev_version)
                for r in self._rows(session, rollout.id)
                if r.prev_name and r.prev_version
            }
            self._rollback(session, rollout, audit.CONTROLLER_ACTOR, reason, self._lookup_previous(previous))
        elif rollout.on_error == "abort":
            self._abort(session, rollout, audit.CONTROLLER_ACTOR, reason)
        else:
            rollout.state = RolloutState.PAUSED.value
            rollout.message = reason
            rollout.updated_at = self._clock()
            audit.record(
                session, audit.CONTROLLER_ACTOR, "rollout.pause", "rollout", rollout.id, reason=reason
            )

    def _abort(self, session: Session, rollout: Rollout, actor: str, reason: str) -> None:
        now = self._clock()
        rows = self._rows(session, rollout.id)
        devices = self._devices(session, [r.device_id for r in rows])
        cleared = 0
        for row in rows:
            if row.phase in (DevicePhase.WAITING.value, DevicePhase.QUEUED.value):
                row.phase, row.updated_at = DevicePhase.CANCELLED.value, now
            elif row.phase in (DevicePhase.SENT.value, DevicePhase.FAILED.value):
                # Stop the download (or the retries) with an empty retained desired: it keeps its model.
                self._set_desired(row, devices.get(row.device_id), rollout.id, b"", (None, None), now)
                if row.phase == DevicePhase.SENT.value:
                    row.phase = DevicePhase.CANCELLED.value
                cleared += 1
        rollout.state = RolloutState.ABORTED.value
        rollout.message = reason
        rollout.finished_at = rollout.updated_at = now
        self._release(session, rollout.id)
        audit.record(session, actor, "rollout.abort", "rollout", rollout.id, reason=reason, cleared=cleared)

    def _rollback(
        self,
        session: Session,
        rollout: Rollout,
        actor: str,
        reason: str,
        infos: dict[tuple[str, str], ModelInfo | None],
    ) -> None:
        now = self._clock()
        rows = self._rows(session, rollout.id)
        devices = self._devices(session, [r.device_id for r in rows])
        reverting = unknown = 0
        touched = (
            DevicePhase.SENT.value,
            DevicePhase.ACTIVE.value,
            DevicePhase.FAILED.value,
            DevicePhase.UNHEALTHY.value,
            DevicePhase.CANCELLED.value,
        )
        for row in rows:
            if row.phase in (DevicePhase.WAITING.value, DevicePhase.QUEUED.value):
                row.phase, row.updated_at = DevicePhase.CANCELLED.value, now
                continue
            if row.phase not in touched or row.desired_payload is None:
                continue  # never sent anything (or already reverting)
            device = devices.get(row.device_id)
            info = (
                infos.get((row.prev_name, row.prev_version)) if row.prev_name and row.prev_version else None
            )
            if device is None:
                row.phase, row.updated_at = DevicePhase.CANCELLED.value, now
                continue
            if device.desired_rollout_id != rollout.id:
                row.error = (
                    f"not rolled back: rollout {device.desired_rollout_id} has changed its model since"
                )
                row.updated_at = now
                continue
            if info is None:
                self._set_desired(row, device, rollout.id, b"", (None, None), now)
                row.phase = DevicePhase.REVERTED.value
                row.error = (
                    "no previous model known to the registry: "
                    "desired model cleared, the device keeps what it runs"
                )
                unknown += 1
                continue
            payload = encode(
                ModelDesired(
                    device_id=device.id,
                    rollout_id=rollout.id + ROLLBACK_SUFFIX,
                    name=info.name,
                    version=info.version,
                    sha256=info.sha256,
                    size=info.size,
                    url=artifact_url(self.public_url, info.name, info.version),
                    signature=info.signature,
                    variant=info.variant,
                )
            )
            self._set_desired(row, device, rollout.id, payload, (info.name, info.version), now)
            row.phase = DevicePhase.REVERTING.value
            reverting += 1
        rollout.state = RolloutState.ROLLED_BACK.value
        rollout.message = reason
        rollout.finished_at = rollout.updated_at = now
        self._release(session, rollout.id)
        audit.record(
            session,
            actor,
            "rollout.rollback",
            "rollout",
            rollout.id,
            reason=reason,
            reverting=reverting,
            without_previous=unknown,
        )

    # ---- helpers ---------------------------------------------------------------------------------------

    def _resolve(self, spec: RolloutSpec) -> ModelInfo:
        try:
            if spec.version is not None:
                return self.catalog.get(spec.model, spec.version)
            assert spec.alias is not None
            return self.catalog.resolve(spec.model, spec.alias)
        except ModelNotFoundError as error:
            ref = f"{spec.model}@{spec.version or spec.alias}"
            raise RolloutValidationError(f"model {ref} is not in the registry: {error}") from error

    def _lookup_previous(
        self, previous: Iterable[tuple[str | None, str | None]]
    ) -> dict[tuple[str, str], ModelInfo | None]:
        infos: dict[tuple[str, str], ModelInfo | None] = {}
        for name, version in previous:
            if not name or not version:
                continue
            try:
                infos[(name, version)] = self.catalog.get(name, version)
            except ModelNotFoundError:
                infos[(name, version)] = None
        return infos

    def _target_ids(self, session: Session, target: RolloutTarget) -> list[str]:
        return [d.id for d in self._target_devices(session, target)]

    def _target_devices(self, session: Session, target: RolloutTarget) -> list[Device]:
        query = select(Device).order_by(Device.id)
        if not target.all:
            clauses: list[Any] = []
            if target.device_ids:
                clauses.append(Device.id.in_(target.device_ids))
            if target.groups:
                clauses.append(Device.group_name.in_(target.groups))
            if target.tags:
                clauses.append(
                    and_(
                        *(
                            exists().where(
                                DeviceTag.device_id == Device.id, DeviceTag.key == k, DeviceTag.value == v
                            )
                            for k, v in target.tags.items()
                        )
                    )
                )
            query = query.where(or_(*clauses))
        return list(session.execute(query).scalars())

    def _locked(self, session: Session, device_ids: list[str]) -> dict[str, str]:
        held: dict[str, str] = {}
        for start in range(0, len(device_ids), 500):
            chunk = device_ids[start : start + 500]
            for device_id, rollout_id in session.execute(
                select(DeviceLock.device_id, DeviceLock.rollout_id).where(DeviceLock.device_id.in_(chunk))
            ):
                held[device_id] = rollout_id
        return held

    def _release(self, session: Session, rollout_id: str) -> None:
        session.execute(delete(DeviceLock).where(DeviceLock.rollout_id == rollout_id))

    def _get(self, session: Session, rollout_id: str) -> Rollout:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise RolloutNotFoundError(f"no rollout {rollout_id!r}")
        return rollout

    def _lock(self, session: Session, rollout_id: str) -> Rollout:
        rollout = session.execute(
            select(Rollout).where(Rollout.id == rollout_id).with_for_update()
        ).scalar_one_or_none()
        if rollout is None:
            raise RolloutNotFoundError(f"no rollout {rollout_id!r}")
        return rollout

    @staticmethod
    def _require(rollout: Rollout, states: Iterable[RolloutState], action: str) -> None:
        allowed = {s.value for s in states}
        if rollout.state not in allowed:
            raise RolloutStateError(
                f"cannot {action} rollout {rollout.id}: it is {rollout.state} "
                f"({action} applies to {', '.join(sorted(allowed))})"
            )

    @staticmethod
    def _rows(session: Session, rollout_id: str) -> list[RolloutDevice]:
        return list(
            session.execute(
                select(RolloutDevice)
                .where(RolloutDevice.rollout_id == rollout_id)
                .order_by(RolloutDevice.position)
            ).scalars()
        )

    @staticmethod
    def _devices(session: Session, ids: list[str]) -> dict[str, Device]:
        """The devices, without what the controller never reads (their JSON columns and tags: two thirds of
        a tick's CPU for 1,000 devices, and a tick follows every ingested batch of OTA reports)."""
        devices: dict[str, Device] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = select(Device).where(Device.id.in_(chunk)).options(*_DEVICE_STATE_ONLY)
            for device in session.execute(query).scalars():
                devices[device.id] = device
        return devices


# Only if no newer payload was decided meanwhile (that one is published next time).
_ROLLOUT_DEVICES = cast(Table, RolloutDevice.__table__)
_CLEAR_PUBLISH_PENDING = (
    update(_ROLLOUT_DEVICES)
    .where(_ROLLOUT_DEVICES.c.id == bindparam("row_id"), _ROLLOUT_DEVICES.c.desired_seq == bindparam("seq"))
    .values(publish_pending=False)
)

_DEVICE_STATE_ONLY = (
    defer(Device.telemetry),
    defer(Device.hardware),
    defer(Device.providers),
    lazyload(Device.tags),
)


def _running_model(device: Device) -> tuple[str | None, str | None]:
    """The model a device runs: its latest `model/reported` when that says active, else its status."""
    if device.ota_state == OtaState.ACTIVE.value and device.ota_model_name:
        return device.ota_model_name, device.ota_model_version
    return device.active_model_name, device.active_model_version


def count_active_rollouts(session: Session) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(Rollout)
            .where(Rollout.state.in_([s.value for s in ACTIVE_ROLLOUT_STATES]))
        ).scalar_one()
    )
