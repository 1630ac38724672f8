"""Devices: list with filters, detail with history, detections, crops; provisioning and revocation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from fleet_manager import audit
from fleet_manager.api.deps import AdminDep, OperatorDep, ServiceDep, SessionDep, ViewerDep
from fleet_manager.api.schemas import (
    DetectionObjectOut,
    DetectionOut,
    DeviceDetail,
    DeviceOut,
    DevicePage,
    DeviceUpdateIn,
    ModelRefOut,
    OtaEventOut,
    ProvisionIn,
    ProvisionOut,
    TelemetrySampleOut,
    json_response,
)
from fleet_manager.devices import (
    DeviceFilter,
    DeviceNotFoundError,
    get_crop,
    get_device,
    list_device_summaries,
    ota_history,
    recent_detections,
    require_device,
    telemetry_history,
)
from fleet_manager.models import Device
from fleet_manager.provisioning import (
    ProvisioningError,
    agent_config,
    parse_tags,
    provision_device,
    revoke_device,
    set_device_tags,
)

router = APIRouter(prefix="/api/v1", tags=["devices"])


@router.get("/devices", response_model=DevicePage, summary="List devices, filtered")
def devices_list(
    _: ViewerDep,
    session: SessionDep,
    group: Annotated[str | None, Query(description="Only this group.")] = None,
    tag: Annotated[
        list[str] | None, Query(description="key=value; repeat for several (all must match).")
    ] = None,
    state: Annotated[str | None, Query(description="online, stopping, offline or unknown.")] = None,
    model: Annotated[str | None, Query(description="Active model: name or name@version.")] = None,
    q: Annotated[str | None, Query(max_length=64, description="Device id prefix.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    try:
        tags = parse_tags(tag or [])
    except ProvisioningError as error:
        raise HTTPException(422, str(error)) from None
    flt = DeviceFilter(group=group, tags=tags, state=state, model=model, search=q)
    total, rows = list_device_summaries(session, flt, limit=limit, offset=offset)
    return json_response(DevicePage(total=total, items=[DeviceOut.of(d) for d in rows]))


@router.get("/devices/{device_id}", response_model=DeviceDetail, summary="One device with its history")
def device_detail(
    _: ViewerDep,
    session: SessionDep,
    device_id: str,
    since: Annotated[datetime | None, Query(description="Telemetry history from this time.")] = None,
    history: Annotated[int, Query(ge=0, le=10_000, description="Most telemetry samples.")] = 500,
) -> Response:
    device = _device(session, device_id)
    base = DeviceOut.of(device).model_dump()
    detail = DeviceDetail(
        **base,
        created_at=device.created_at,
        status_at=device.status_at,
        providers=device.providers,
        hardware=device.hardware,
        telemetry=device.telemetry,
        telemetry_history=[
            TelemetrySampleOut.of(s)
            for s in telemetry_history(session, device_id, since=since, limit=history)
        ],
        ota_history=[OtaEventOut.of(e) for e in ota_history(session, device_id)],
    )
    return json_response(detail)


@router.get("/devices/{device_id}/detections", response_model=list[DetectionOut], summary="Recent detections")
def device_detections(
    _: ViewerDep, session: SessionDep, device_id: str, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> Response:
    try:
        require_device(session, device_id)
    except DeviceNotFoundError as error:
        raise HTTPException(404, str(error)) from None
    detections = [
        DetectionOut(
            msg_id=v.event.msg_id,
            ts=v.event.ts,
            received_at=v.event.received_at,
            source=v.event.source,
            frame_seq=v.event.frame_seq,
            model=ModelRefOut(name=v.event.model_name, version=v.event.model_version),
            width=v.event.width,
            height=v.event.height,
            timing_ms=v.event.timing_ms,
            objects=[
                DetectionObjectOut.model_construct(**o) for o in v.objects
            ],  # typed columns: no validation
        )
        for v in recent_detections(session, device_id, limit=limit)
    ]
    return json_response(detections)


@router.get(
    "/crops/{det_id}",
    summary="A crop JPEG by detection id",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "No crop stored."}},
)
def crop(_: ViewerDep, session: SessionDep, det_id: str) -> Response:
    row = get_crop(session, det_id)
    if row is None:
        raise HTTPException(404, f"no crop for detection {det_id}")
    return Response(row.jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.post(
    "/devices",
    response_model=ProvisionOut,
    status_code=status.HTTP_201_CREATED,
    summary="Provision a device: broker account, ACL, artifact token, agent config",
)
def provision(body: ProvisionIn, principal: AdminDep, service: ServiceDep) -> ProvisionOut:
    try:
        result = provision_device(
            service.db,
            service.settings,
            body.device_id,
            group=body.group,
            tags=parse_tags([f"{k}={v}" for k, v in body.tags.items()]),
            actor=principal.actor,
            rotate=body.rotate,
        )
    except ProvisioningError as error:
        raise HTTPException(409 if "already" in str(error) else 422, str(error)) from None
    return ProvisionOut(
        device_id=result.device_id,
        broker_username=result.broker_username,
        broker_password=result.broker_password,
        artifact_token=result.artifact_token,
        agent_config=agent_config(
            service.settings, result.device_id, password=result.broker_password, token=result.artifact_token
        ),
        broker_reloaded=result.reloaded,
        broker_reload_error=result.reload_error,
    )


@router.patch("/devices/{device_id}", response_model=DeviceOut, summary="Change a device's group or tags")
def update_device(
    device_id: str, body: DeviceUpdateIn, principal: OperatorDep, service: ServiceDep
) -> DeviceOut:
    try:
        tags = parse_tags([f"{k}={v}" for k, v in body.tags.items()]) if body.tags is not None else None
    except ProvisioningError as error:
        raise HTTPException(422, str(error)) from None
    with service.db.write() as session:
        device = _device(session, device_id)
        if body.group is not None:
            device.group_name = body.group or None
        if tags is not None:
            set_device_tags(session, device, tags)
        audit.record(
            session, principal.actor, "device.update", "device", device_id, group=body.group, tags=body.tags
        )
        session.flush()
        return DeviceOut.of(device)


@router.delete(
    "/devices/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a device: account, ACL entries, tokens, registration",
)
def revoke(device_id: str, principal: AdminDep, service: ServiceDep) -> Response:
    try:
        revoke_device(service.db, service.settings, device_id, actor=principal.actor)
    except ProvisioningError as error:
        raise HTTPException(404 if "no device" in str(error) else 422, str(error)) from None
    if service.mqtt is not None:
        service.mqtt.clear_retained(device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _device(session: Session, device_id: str) -> Device:
    try:
        return get_device(session, device_id)
    except DeviceNotFoundError as error:
        raise HTTPException(404, str(error)) from None
