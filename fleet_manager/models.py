"""The fleet database: SQLAlchemy 2 tables (the schema itself is made by the Alembic migrations)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

ID_LEN = 64
ULID_LEN = 26


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them without an offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the fleet database stores UTC-aware datetimes")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012  (SQLAlchemy's documented form)
        datetime: UtcDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Role(str, Enum):
    """API roles, weakest first; `device` tokens may only download their own artifacts."""

    DEVICE = "device"
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _ROLE_RANK[self]

    def allows(self, needed: Role) -> bool:
        if self is Role.DEVICE or needed is Role.DEVICE:
            return self is needed
        return self.rank >= needed.rank


_ROLE_RANK = {Role.DEVICE: 0, Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class BrokerRole(str, Enum):
    """What a broker account may do (see `broker_auth.render_acl`)."""

    DEVICE = "device"
    FLEET = "fleet"
    REFINER = "refiner"


class RolloutState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"

    @property
    def active(self) -> bool:
        return self in ACTIVE_ROLLOUT_STATES


ACTIVE_ROLLOUT_STATES = frozenset({RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED})


class DevicePhase(str, Enum):
    """Where one device stands in one rollout."""

    WAITING = "waiting"  # its wave has not started
    QUEUED = "queued"  # its wave started; waits for a download slot (or to come online)
    SENT = "sent"  # model/desired published; installing
    ACTIVE = "active"  # reports the new model active; in probation until proven
    FAILED = "failed"  # reported failed or rolled back
    UNHEALTHY = "unhealthy"  # active, but its telemetry broke the health gate during probation
    CANCELLED = "cancelled"  # the rollout ended before the device got (or finished) the model
    REVERTING = "reverting"  # rollback: its previous model is desired again
    REVERTED = "reverted"  # back on its previous model (or desired cleared when it had none)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    group_name: Mapped[str | None] = mapped_column(String(ID_LEN), index=True)
    provisioned: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="unknown", index=True)
    last_seen_at: Mapped[datetime | None]
    status_at: Mapped[datetime | None]
    agent_version: Mapped[str | None] = mapped_column(String(64))
    active_model_name: Mapped[str | None] = mapped_column(String(128))
    active_model_version: Mapped[str | None] = mapped_column(String(64))
    providers: Mapped[list[Any]] = mapped_column(default=list)
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)
    telemetry: Mapped[dict[str, Any] | None]
    telemetry_at: Mapped[datetime | None]
    fps: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    ota_state: Mapped[str | None] = mapped_column(String(16))
    ota_rollout_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    ota_model_name: Mapped[str | None] = mapped_column(String(128))
    ota_model_version: Mapped[str | None] = mapped_column(String(64))
    ota_progress: Mapped[float | None] = mapped_column(Float)
    ota_error: Mapped[str | None] = mapped_column(Text)
    ota_previous_name: Mapped[str | None] = mapped_column(String(128))
    ota_previous_version: Mapped[str | None] = mapped_column(String(64))
    ota_at: Mapped[datetime | None]
    desired_rollout_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    desired_name: Mapped[str | None] = mapped_column(String(128))
    desired_version: Mapped[str | None] = mapped_column(String(64))

    tags: Mapped[list[DeviceTag]] = relationship(
        back_populates="device", cascade="all, delete-orphan", lazy="selectin", passive_deletes=True
    )

    __table_args__ = (Index("ix_devices_active_model", "active_model_name", "active_model_version"),)

    @property
    def tag_map(self) -> dict[str, str]:
        return {tag.key: tag.value for tag in self.tags}


class DeviceTag(Base):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))

    device: Mapped[Device] = relationship(back_populates="tags")

    __table_args__ = (Index("ix_device_tags_key_value", "key", "value"),)


class BrokerAccount(Base):
    """A Mosquitto account: a device (username = device id) or a service (fleet manager, refiner)."""

    __tablename__ = "broker_accounts"

    username: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    device_id: Mapped[str | None] = mapped_column(String(ID_LEN), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(String(ID_LEN), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise a token in lists
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None]


class TelemetrySample(Base):
    """Downsampled telemetry history (at most one sample per device per configured interval)."""

    __tablename__ = "telemetry_samples"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID_LEN))
    ts: Mapped[datetime]
    fps: Mapped[float] = mapped_column(Float)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    cpu_percent: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[float] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    link_rtt_ms: Mapped[float | None] = mapped_column(Float)
    outbox_depth: Mapped[int] = mapped_column(BigInteger)
    outbox_dropped: Mapped[int] = mapped_column(BigInteger)
    frames_dropped: Mapped[int] = mapped_column(BigInteger)
    latency_ms: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_telemetry_device_ts", "device_id", "ts"),)


class Detection(Base):
    """One `detections` event (a published frame); unique on msg_id."""

    __tablename__ = "detections"

    msg_id: Mapped[str] = mapped_column(String(ULID_LEN), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID_LEN))
    ts: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(index=True)
    source: Mapped[str] = mapped_column(String(128))
    frame_seq: Mapped[int] = mapped_column(BigInteger)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    pre_ms: Mapped[float] = mapped_column(Float)
    infer_ms: Mapped[float] = mapped_column(Float)
    post_ms: Mapped[float] = mapped_column(Float)
    object_count: Mapped[int] = mapped_column(Integer)

    @property
    def timing_ms(self) -> dict[str, float]:
        return {"pre": self.pre_ms, "infer": self.infer_ms, "post": self.post_ms}

    __table_args__ = (Index("ix_detections_device_ts", "device_id", "ts"),)


class DetectionObject(Base):
    """One detected object of a detections event (its time is the event's); unique on det_id (refined labels
    join on it). The box is four columns, not JSON: ingest writes several of these per message."""

    __tablename__ = "detection_objects"

    det_id: Mapped[str] = mapped_column(String(ULID_LEN), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(ULID_LEN), index=True)
    device_id: Mapped[str] = mapped_column(String(ID_LEN))
    received_at: Mapped[datetime] = mapped_column(index=True)
    class_id: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    track_id: Mapped[int | None] = mapped_column(BigInteger)

    @property
    def bbox(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


class Refinement(Base):
    """A `refined` label; joins detection_objects on det_id (either may arrive first)."""

    __tablename__ = "refinements"

    det_id: Mapped[str] = mapped_column(String(ULID_LEN), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(ULID_LEN))
    device_id: Mapped[str] = mapped_column(String(ID_LEN))
    ts: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(index=True)
    edge_label: Mapped[str] = mapped_column(String(128))
    refined_label: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    top_k: Mapped[list[Any]]
    refiner_name: Mapped[str] = mapped_column(String(128))
    refiner_version: Mapped[str] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)


class Crop(Base):
    """A crop JPEG, keyed by the detection it shows."""

    __tablename__ = "crops"

    det_id: Mapped[str] = mapped_column(String(ULID_LEN), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(ULID_LEN))
    device_id: Mapped[str] = mapped_column(String(ID_LEN), index=True)
    ts: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(index=True)
    label: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)
    jpeg: Mapped[bytes] = mapped_column(LargeBinary)


class OtaEvent(Base):
    """Per-device OTA history: one row per reported state change."""

    __tablename__ = "ota_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(ULID_LEN), unique=True)
    device_id: Mapped[str] = mapped_column(String(ID_LEN))
    ts: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(index=True)
    rollout_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    state: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    previous_name: Mapped[str | None] = mapped_column(String(128))
    previous_version: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_ota_events_device_ts", "device_id", "ts"),)


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str | None] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[str | None] = mapped_column(String(512))
    variant: Mapped[str | None] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    target: Mapped[dict[str, Any]]
    waves: Mapped[list[Any]]
    success_threshold: Mapped[float] = mapped_column(Float)
    error_threshold: Mapped[float] = mapped_column(Float)
    on_error: Mapped[str] = mapped_column(String(16))
    probation_s: Mapped[float] = mapped_column(Float)
    max_latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    require_telemetry: Mapped[bool] = mapped_column(Boolean)
    auto_rollback: Mapped[bool] = mapped_column(Boolean)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    device_count: Mapped[int] = mapped_column(Integer)
    acknowledged_failures: Mapped[dict[str, Any]] = mapped_column(default=dict)
    message: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def state_enum(self) -> RolloutState:
        return RolloutState(self.state)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(ID_LEN), index=True)
    wave: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16), index=True)
    ota_state: Mapped[str | None] = mapped_column(String(16))
    progress: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    prev_name: Mapped[str | None] = mapped_column(String(128))
    prev_version: Mapped[str | None] = mapped_column(String(64))
    sent_at: Mapped[datetime | None]
    activated_at: Mapped[datetime | None]
    proven_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The exact bytes of the last model/desired for this device (b"" clears it), re-sent after a restart.
    desired_payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    desired_seq: Mapped[int] = mapped_column(Integer, default=0)
    publish_pending: Mapped[bool] = mapped_column(Boolean, default=False, index=True)

    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_rollout_device"),
        Index("ix_rollout_devices_rollout_wave", "rollout_id", "wave", "position"),
    )


class DeviceLock(Base):
    """One active rollout per device: the primary key refuses a second one."""

    __tablename__ = "device_locks"

    device_id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("rollouts.id", ondelete="CASCADE"))


class AuditEntry(Base):
    """Append-only (database triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index("ix_audit_target", "target_type", "target_id"),)
