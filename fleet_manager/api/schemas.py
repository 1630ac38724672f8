"""Request and response bodies of the HTTP API (what the OpenAPI document shows)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from fleet_manager.devices import DeviceSummary
from fleet_manager.models import (
    ApiToken,
    AuditEntry,
    Device,
    OtaEvent,
    Role,
    Rollout,
    RolloutDevice,
    TelemetrySample,
)
from fleet_manager.rollouts import WaveProgress


def json_response(content: BaseModel | Sequence[BaseModel]) -> Response:
    """`content` (built as the route's `response_model`) serialized once, as the response.

    Returned by the read routes: FastAPI validates a returned model against `response_model` again, on a
    second trip through the worker thread pool, before it serializes it; a Response goes out as it is.
    """
    return Response(to_json(content), media_type="application/json")


class ModelRefOut(BaseModel):
    name: str
    version: str


class DeviceOut(BaseModel):
    id: str
    group: str | None
    tags: dict[str, str]
    provisioned: bool
    state: str = Field(description="online, stopping, offline, or unknown (never heard from).")
    last_seen_at: datetime | None
    agent_version: str | None
    active_model: ModelRefOut | None
    desired_model: ModelRefOut | None
    ota_state: str | None
    ota_progress: float | None
    ota_error: str | None
    fps: float | None
    latency_p95_ms: float | None
    telemetry_at: datetime | None

    @classmethod
    def of(cls, d: Device | DeviceSummary) -> DeviceOut:
        return cls(
            id=d.id,
            group=d.group_name,
            tags=d.tag_map,
            provisioned=d.provisioned,
            state=d.state,
            last_seen_at=d.last_seen_at,
            agent_version=d.agent_version,
            active_model=_ref(d.active_model_name, d.active_model_version),
            desired_model=_ref(d.desired_name, d.desired_version),
            ota_state=d.ota_state,
            ota_progress=d.ota_progress,
            ota_error=d.ota_error,
            fps=d.fps,
            latency_p95_ms=d.latency_p95_ms,
            telemetry_at=d.telemetry_at,
        )


def _ref(name: str | None, version: str | None) -> ModelRefOut | None:
    return ModelRefOut(name=name, version=version) if name and version else None


class DevicePage(BaseModel):
    total: int
    items: list[DeviceOut]


class TelemetrySampleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    ts: datetime
    fps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    cpu_percent: float
    memory_mb: float
    temperature_c: float | None
    link_rtt_ms: float | None
    outbox_depth: int
    outbox_dropped: int
    frames_dropped: int
    latency_ms: dict[str, Any]

    @classmethod
    def of(cls, s: TelemetrySample) -> TelemetrySampleOut:
        return cls.model_validate(s)


class OtaEventOut(BaseModel):
    ts: datetime
    received_at: datetime
    rollout_id: str | None
    state: str
    model: ModelRefOut | None
    previous_model: ModelRefOut | None
    error: str | None

    @classmethod
    def of(cls, e: OtaEvent) -> OtaEventOut:
        return cls(
            ts=e.ts,
            received_at=e.received_at,
            rollout_id=e.rollout_id,
            state=e.state,
            model=_ref(e.model_name, e.model_version),
            previous_model=_ref(e.previous_name, e.previous_version),
            error=e.error,
        )


class DeviceDetail(DeviceOut):
    created_at: datetime
    status_at: datetime | None
    providers: list[Any]
    hardware: dict[str, Any]
    telemetry: dict[str, Any] | None = Field(description="The latest telemetry payload.")
    telemetry_history: list[TelemetrySampleOut]
    ota_history: list[OtaEventOut]


class DetectionObjectOut(BaseModel):
    det_id: str
    class_id: int
    label: str
    confidence: float
    bbox: list[float]
    track_id: int | None
    has_crop: bool = Field(description="A crop JPEG is stored: GET /api/v1/crops/{det_id}.")
    refined: dict[str, Any] | None = Field(description="The cloud refiner's label, when one arrived.")


class DetectionOut(BaseModel):
    msg_id: str
    ts: datetime
    received_at: datetime
    source: str
    frame_seq: int
    model: ModelRefOut
    width: int
    height: int
    timing_ms: dict[str, Any]
    objects: list[DetectionObjectOut]


class ProvisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(description="The new device's id (also its broker username).")
    group: str | None = Field(default=None, description="Device group.")
    tags: dict[str, str] = Field(default_factory=dict, description="Device tags.")
    rotate: bool = Field(default=False, description="Issue new credentials to an already provisioned device.")


class ProvisionOut(BaseModel):
    device_id: str
    broker_username: str
    broker_password: str = Field(description="Shown once; only its hash is stored.")
    artifact_token: str = Field(description="Shown once; only its hash is stored.")
    agent_config: dict[str, Any] = Field(description="The device agent's settings, secrets included.")
    broker_reloaded: bool
    broker_reload_error: str | None


class DeviceUpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str | None = Field(default=None, description="New group ('' removes it).")
    tags: dict[str, str] | None = Field(default=None, description="Replaces all tags.")


class RolloutActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500, description="Why; goes into the audit log.")


class WaveOut(BaseModel):
    index: int
    percent: float
    devices: int
    phases: dict[str, int]
    proven: int
    failures: int

    @classmethod
    def of(cls, w: WaveProgress) -> WaveOut:
        return cls(
            index=w.index,
            percent=w.percent,
            devices=w.devices,
            phases=w.phases,
            proven=w.proven,
            failures=w.failures,
        )


class RolloutOut(BaseModel):
    id: str
    state: str
    model: ModelRefOut
    alias: str | None
    sha256: str
    size: int
    variant: str | None
    signed: bool
    url: str
    target: dict[str, Any]
    waves: list[float]
    current_wave: int = Field(description="0-based index of the wave under way.")
    device_count: int
    success_threshold: float
    error_threshold: float
    on_error: str
    probation_s: float
    max_latency_p95_ms: float | None
    require_telemetry: bool
    auto_rollback: bool
    max_concurrent: int | None
    message: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, r: Rollout) -> RolloutOut:
        return cls(
            id=r.id,
            state=r.state,
            model=ModelRefOut(name=r.model_name, version=r.model_version),
            alias=r.alias,
            sha256=r.sha256,
            size=r.size,
            variant=r.variant,
            signed=r.signature is not None,
            url=r.url,
            target=r.target,
            waves=[float(w) for w in r.waves],
            current_wave=r.current_wave,
            device_count=r.device_count,
            success_threshold=r.success_threshold,
            error_threshold=r.error_threshold,
            on_error=r.on_error,
            probation_s=r.probation_s,
            max_latency_p95_ms=r.max_latency_p95_ms,
            require_telemetry=r.require_telemetry,
            auto_rollback=r.auto_rollback,
            max_concurrent=r.max_concurrent,
            message=r.message,
            created_by=r.created_by,
            created_at=r.created_at,
            updated_at=r.updated_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
        )


class RolloutDeviceOut(BaseModel):
    device_id: str
    wave: int
    phase: str
    ota_state: str | None
    progress: float | None
    error: str | None
    previous_model: ModelRefOut | None
    sent_at: datetime | None
    activated_at: datetime | None
    proven_at: datetime | None

    @classmethod
    def of(cls, row: RolloutDevice) -> RolloutDeviceOut:
        return cls(
            device_id=row.device_id,
            wave=row.wave,
            phase=row.phase,
            ota_state=row.ota_state,
            progress=row.progress,
            error=row.error,
            previous_model=_ref(row.prev_name, row.prev_version),
            sent_at=row.sent_at,
            activated_at=row.activated_at,
            proven_at=row.proven_at,
        )


class RolloutDetail(RolloutOut):
    wave_progress: list[WaveOut]
    devices: list[RolloutDeviceOut]


class TokenCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="Who or what uses it.")
    role: Role = Field(description="viewer, operator or admin (device tokens come with provisioning).")


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    device_id: str | None
    prefix: str = Field(description="The token's first characters, to recognise it.")
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    @classmethod
    def of(cls, t: ApiToken) -> TokenOut:
        return cls(
            id=t.id,
            name=t.name,
            role=t.role,
            device_id=t.device_id,
            prefix=t.prefix,
            created_at=t.created_at,
            created_by=t.created_by,
            revoked_at=t.revoked_at,
        )


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself: shown once, only its hash is stored.")


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    ts: datetime
    actor: str
    action: str
    target_type: str
    target_id: str | None
    details: dict[str, Any]

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        return cls.model_validate(e)


class MeOut(BaseModel):
    token_id: int
    name: str
    role: str
    device_id: str | None


class StatsOut(BaseModel):
    fleet: dict[str, Any]
    active_rollouts: int
    ingest: dict[str, Any]
    mqtt_connected: bool | None
    controller_ticks: int
