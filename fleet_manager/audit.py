"""The append-only audit log: who did what, when (the database refuses UPDATE and DELETE on it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_manager.models import AuditEntry, utcnow

CONTROLLER_ACTOR = "controller"


def record(
    session: Session, actor: str, action: str, target_type: str, target_id: str | None, **details: Any
) -> AuditEntry:
    """Add one entry to the caller's transaction (so it commits, or not, with the change it describes)."""
    entry = AuditEntry(
        ts=utcnow(), actor=actor, action=action, target_type=target_type, target_id=target_id, details=details
    )
    session.add(entry)
    return entry


def entries(
    session: Session,
    *,
    target_type: str | None = None,
    target_id: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[AuditEntry]:
    """Newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if target_type is not None:
        query = query.where(AuditEntry.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditEntry.target_id == target_id)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(session.execute(query).scalars())
