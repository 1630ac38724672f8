"""API tokens (admin only)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from fleet_manager.api.deps import AdminDep, ServiceDep, SessionDep
from fleet_manager.api.schemas import TokenCreated, TokenCreateIn, TokenOut
from fleet_manager.models import Role
from fleet_manager.tokens import TokenNotFoundError, create_token, list_tokens, revoke_token

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


@router.get("", response_model=list[TokenOut], summary="List active tokens")
def tokens_list(_: AdminDep, session: SessionDep, include_revoked: bool = False) -> list[TokenOut]:
    return [TokenOut.of(t) for t in list_tokens(session, include_revoked=include_revoked)]


@router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED, summary="Create a token")
def tokens_create(body: TokenCreateIn, principal: AdminDep, service: ServiceDep) -> TokenCreated:
    if body.role is Role.DEVICE:
        raise HTTPException(422, "device tokens come with provisioning (POST /api/v1/devices)")
    with service.db.write() as session:
        row, plain = create_token(session, name=body.name, role=body.role, created_by=principal.actor)
        session.flush()
        return TokenCreated(**TokenOut.of(row).model_dump(), token=plain)


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke a token")
def tokens_revoke(token_id: int, principal: AdminDep, service: ServiceDep) -> None:
    try:
        with service.db.write() as session:
            revoke_token(session, token_id, principal.actor)
    except TokenNotFoundError as error:
        raise HTTPException(404, str(error)) from None
