"""The audit log (read-only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from fleet_manager import audit
from fleet_manager.api.deps import SessionDep, ViewerDep
from fleet_manager.api.schemas import AuditOut, json_response

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=list[AuditOut], summary="Audit log, newest first")
def audit_log(
    _: ViewerDep,
    session: SessionDep,
    target_type: Annotated[str | None, Query(description="rollout, device, token, broker_account.")] = None,
    target_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(description="Page: entries older than this id.")] = None,
) -> Response:
    rows = audit.entries(
        session, target_type=target_type, target_id=target_id, limit=limit, before_id=before_id
    )
    return json_response([AuditOut.of(e) for e in rows])
