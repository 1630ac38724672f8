"""Health, the caller's identity, and fleet-wide figures."""

from __future__ import annotations

from fastapi import APIRouter, Response

from fleet_manager.api.deps import PrincipalDep, ServiceDep, SessionDep, ViewerDep
from fleet_manager.api.schemas import MeOut, StatsOut, json_response
from fleet_manager.devices import fleet_summary
from fleet_manager.rollouts import count_active_rollouts

router = APIRouter(tags=["system"])


@router.get("/healthz", summary="Liveness (no token needed)")
async def healthz(service: ServiceDep) -> dict[str, object]:
    mqtt = service.mqtt
    return {"status": "ok", "mqtt_connected": None if mqtt is None else mqtt.connected}


@router.get("/api/v1/me", response_model=MeOut, summary="Who the token belongs to")
async def me(principal: PrincipalDep) -> Response:
    caller = MeOut(
        token_id=principal.token_id,
        name=principal.name,
        role=principal.role.value,
        device_id=principal.device_id,
    )
    return json_response(caller)


@router.get("/api/v1/stats", response_model=StatsOut, summary="Fleet overview and ingest counters")
def stats(_: ViewerDep, service: ServiceDep, session: SessionDep) -> Response:
    mqtt = service.mqtt
    figures = StatsOut(
        fleet=fleet_summary(session),
        active_rollouts=count_active_rollouts(session),
        ingest=service.ingestor.stats.snapshot(),
        mqtt_connected=None if mqtt is None else mqtt.connected,
        controller_ticks=service.controller.ticks,
    )
    return json_response(figures)
