"""Rollouts: create, list, inspect, pause, resume, abort, roll back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from fleet_manager.api.deps import OperatorDep, ServiceDep, ViewerDep
from fleet_manager.api.schemas import (
    RolloutActionIn,
    RolloutDetail,
    RolloutDeviceOut,
    RolloutOut,
    WaveOut,
    json_response,
)
from fleet_manager.rollouts import RolloutController, RolloutSpec

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"description": "No such rollout."},
    409: {
        "description": "Not possible in the rollout's state, or devices already in another active rollout."
    },
}


@router.get("", response_model=list[RolloutOut], summary="List rollouts, newest first")
def list_rollouts(
    _: ViewerDep,
    service: ServiceDep,
    state: Annotated[list[str] | None, Query(description="Only these states; repeat for several.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    rollouts = service.controller.list_rollouts(states=state, limit=limit, offset=offset)
    return json_response([RolloutOut.of(r) for r in rollouts])


@router.post(
    "",
    response_model=RolloutOut,
    status_code=status.HTTP_201_CREATED,
    summary="Create a rollout (it starts on the controller's next tick)",
    responses={
        409: {"description": "Some target devices are already in an active rollout (listed)."},
        422: {"description": "Invalid request, unknown model version or alias, or no device matches."},
        503: {"description": "The model registry is unreachable."},
    },
)
def create_rollout(spec: RolloutSpec, principal: OperatorDep, service: ServiceDep) -> RolloutOut:
    return RolloutOut.of(service.controller.create(spec, principal.actor))


@router.get(
    "/{rollout_id}", response_model=RolloutDetail, responses=_ERRORS, summary="A rollout with its waves"
)
def get_rollout(rollout_id: str, _: ViewerDep, service: ServiceDep) -> Response:
    rollout, rows = service.controller.get(rollout_id)
    detail = RolloutDetail(
        **RolloutOut.of(rollout).model_dump(),
        wave_progress=[WaveOut.of(w) for w in RolloutController.progress(rollout, rows)],
        devices=[RolloutDeviceOut.of(r) for r in rows],
    )
    return json_response(detail)


@router.post("/{rollout_id}/pause", response_model=RolloutOut, responses=_ERRORS, summary="Pause")
def pause(
    rollout_id: str, principal: OperatorDep, service: ServiceDep, body: RolloutActionIn | None = None
) -> RolloutOut:
    reason = body.reason if body else None
    return RolloutOut.of(service.controller.pause(rollout_id, principal.actor, reason))


@router.post("/{rollout_id}/resume", response_model=RolloutOut, responses=_ERRORS, summary="Resume")
def resume(rollout_id: str, principal: OperatorDep, service: ServiceDep) -> RolloutOut:
    return RolloutOut.of(service.controller.resume(rollout_id, principal.actor))


@router.post("/{rollout_id}/abort", response_model=RolloutOut, responses=_ERRORS, summary="Abort")
def abort(
    rollout_id: str, principal: OperatorDep, service: ServiceDep, body: RolloutActionIn | None = None
) -> RolloutOut:
    reason = body.reason if body else None
    return RolloutOut.of(service.controller.abort(rollout_id, principal.actor, reason))


@router.post(
    "/{rollout_id}/rollback",
    response_model=RolloutOut,
    responses=_ERRORS,
    summary="Roll the rollout's devices back to their previous model",
)
def rollback(
    rollout_id: str, principal: OperatorDep, service: ServiceDep, body: RolloutActionIn | None = None
) -> RolloutOut:
    reason = body.reason if body else None
    return RolloutOut.of(service.controller.rollback(rollout_id, principal.actor, reason))
