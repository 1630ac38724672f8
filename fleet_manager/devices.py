"""Device queries: list with filters, detail with history, recent detections with refined labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session

from fleet_manager.models import (
    Crop,
    Detection,
    DetectionObject,
    Device,
    DeviceTag,
    OtaEvent,
    Refinement,
    TelemetrySample,
)

MAX_PAGE = 1000


class DeviceNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class DeviceFilter:
    """All given conditions must hold; `tags` must all match; `model` is 'name' or 'name@version'."""

    group: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    state: str | None = None
    model: str | None = None
    search: str | None = None  # device id prefix
    provisioned: bool | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.group is not None:
            query = query.where(Device.group_name == self.group)
        for key, value in self.tags.items():
            query = query.where(
                exists().where(
                    DeviceTag.device_id == Device.id, DeviceTag.key == key, DeviceTag.value == value
                )
            )
        if self.state is not None:
            query = query.where(Device.state == self.state)
        if self.model is not None:
            name, _, version = self.model.partition("@")
            query = query.where(Device.active_model_name == name)
            if version:
                query = query.where(Device.active_model_version == version)
        if self.search:
            escaped = self.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(Device.id.like(f"{escaped}%", escape="\\"))
        if self.provisioned is not None:
            query = query.where(Device.provisioned.is_(self.provisioned))
        return query


def list_devices(
    session: Session, flt: DeviceFilter, *, limit: int = 100, offset: int = 0
) -> tuple[int, list[Device]]:
    total = session.execute(flt.apply(select(func.count()).select_from(Device))).scalar_one()
    rows = session.execute(
        flt.apply(select(Device)).order_by(Device.id).limit(min(limit, MAX_PAGE)).offset(offset)
    ).scalars()
    return int(total), list(rows)


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """What a device list shows of a device (`Device`'s names): no JSON columns, no ORM entity."""

    id: str
    group_name: str | None
    provisioned: bool
    state: str
    last_seen_at: datetime | None
    agent_version: str | None
    active_model_name: str | None
    active_model_version: str | None
    desired_name: str | None
    desired_version: str | None
    ota_state: str | None
    ota_progress: float | None
    ota_error: str | None
    fps: float | None
    latency_p95_ms: float | None
    telemetry_at: datetime | None
    tag_map: dict[str, str]


_SUMMARY_COLUMNS = tuple(
    getattr(Device, name) for name in DeviceSummary.__dataclass_fields__ if name != "tag_map"
)


def list_device_summaries(
    session: Session, flt: DeviceFilter, *, limit: int = 100, offset: int = 0
) -> tuple[int, list[DeviceSummary]]:
    """`list_devices` for the API's list: plain rows of the listed columns and one query for the tags.

    Loading whole `Device` entities (with their telemetry, hardware and providers JSON) cost three times
    what the queries themselves do."""
    connection = session.connection()
    total = connection.execute(flt.apply(select(func.count()).select_from(Device))).scalar_one()
    rows = connection.execute(
        flt.apply(select(*_SUMMARY_COLUMNS)).order_by(Device.id).limit(min(limit, MAX_PAGE)).offset(offset)
    ).all()
    tags: dict[str, dict[str, str]] = {row[0]: {} for row in rows}
    if tags:
        for device_id, key, value in connection.execute(
            select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value).where(DeviceTag.device_id.in_(tags))
        ):
            tags[device_id][key] = value
    return int(total), [DeviceSummary(**row._mapping, tag_map=tags[row.id]) for row in rows]


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise DeviceNotFoundError(f"no device {device_id!r}")
    return device


def require_device(session: Session, device_id: str) -> None:
    """Raise DeviceNotFoundError unless the device exists (without loading it)."""
    found = session.connection().execute(select(Device.id).where(Device.id == device_id)).first()
    if found is None:
        raise DeviceNotFoundError(f"no device {device_id!r}")


def telemetry_history(
    session: Session, device_id: str, *, since: datetime | None = None, limit: int = 500
) -> list[TelemetrySample]:
    """Newest `limit` samples (since `since`), oldest first."""
    query = select(TelemetrySample).where(TelemetrySample.device_id == device_id)
    if since is not None:
        query = query.where(TelemetrySample.ts >= since)
    rows = list(session.execute(query.order_by(TelemetrySample.ts.desc()).limit(limit)).scalars())
    rows.reverse()
    return rows


def ota_history(session: Session, device_id: str, *, limit: int = 100) -> list[OtaEvent]:
    """Newest first."""
    return list(
        session.execute(
            select(OtaEvent)
            .where(OtaEvent.device_id == device_id)
            .order_by(OtaEvent.received_at.desc(), OtaEvent.id.desc())
            .limit(limit)
        ).scalars()
    )


@dataclass
class DetectionView:
    event: Detection
    objects: list[dict[str, Any]]


def recent_detections(session: Session, device_id: str, *, limit: int = 50) -> list[DetectionView]:
    """Newest events first; each object with its refined label (if any) and whether a crop is stored."""
    events = list(
        session.execute(
            select(Detection)
            .where(Detection.device_id == device_id)
            .order_by(Detection.ts.desc(), Detection.msg_id.desc())
            .limit(limit)
        ).scalars()
    )
    if not events:
        return []
    msg_ids = [e.msg_id for e in events]
    # Plain rows, not entities: forty objects and their refinements as ORM entities cost most of the call.
    rows = (
        session.connection()
        .execute(
            select(
                DetectionObject.msg_id,
                DetectionObject.det_id,
                DetectionObject.class_id,
                DetectionObject.label,
                DetectionObject.confidence,
                DetectionObject.x1,
                DetectionObject.y1,
                DetectionObject.x2,
                DetectionObject.y2,
                DetectionObject.track_id,
                Crop.det_id,
                Refinement.det_id,
                Refinement.refined_label,
                Refinement.score,
                Refinement.top_k,
                Refinement.refiner_name,
                Refinement.refiner_version,
                Refinement.latency_ms,
            )
            .outerjoin(Refinement, Refinement.det_id == DetectionObject.det_id)
            .outerjoin(Crop, Crop.det_id == DetectionObject.det_id)
            .where(DetectionObject.msg_id.in_(msg_ids))
            .order_by(DetectionObject.det_id)
        )
        .all()
    )
    by_msg: dict[str, list[dict[str, Any]]] = {m: [] for m in msg_ids}
    for (
        msg_id,
        det_id,
        class_id,
        label,
        confidence,
        x1,
        y1,
        x2,
        y2,
        track_id,
        crop_id,
        refined_id,
        refined_label,
        score,
        top_k,
        refiner_name,
        refiner_version,
        latency_ms,
    ) in rows:
        by_msg[msg_id].append(
            {
                "det_id": det_id,
                "class_id": class_id,
                "label": label,
                "confidence": confidence,
                "bbox": [x1, y1, x2, y2],
                "track_id": track_id,
                "has_crop": crop_id is not None,
                "refined": None
                if refined_id is None
                else {
                    "label": refined_label,
                    "score": score,
                    "top_k": top_k,
                    "refiner": f"{refiner_name}@{refiner_version}",
                    "latency_ms": latency_ms,
                },
            }
        )
    return [DetectionView(e, by_msg[e.msg_id]) for e in events]


def get_crop(session: Session, det_id: str) -> Crop | None:
    return session.get(Crop, det_id)


def fleet_summary(session: Session) -> dict[str, Any]:
    """Counts for the overview: devices by state and by active model."""
    by_state: dict[str, int] = {
        state: int(count)
        for state, count in session.execute(select(Device.state, func.count()).group_by(Device.state))
    }
    by_model = [
        {"name": name, "version": version, "devices": count}
        for name, version, count in session.execute(
            select(Device.active_model_name, Device.active_model_version, func.count())
            .group_by(Device.active_model_name, Device.active_model_version)
            .order_by(func.count().desc())
        )
    ]
    return {"devices": sum(by_state.values()), "by_state": by_state, "by_model": by_model}
