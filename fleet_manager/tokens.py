"""API bearer tokens: create, list, revoke, and resolve a presented token to a principal."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from fleet_manager import audit
from fleet_manager.models import ApiToken, Role, utcnow
from fleet_manager.security import hash_token, new_token, token_display_prefix


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, name and role (and its device, for device tokens)."""

    token_id: int
    name: str
    role: Role
    device_id: str | None = None

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}:{self.name}"


class TokenNotFoundError(LookupError):
    pass


def create_token(
    session: Session, *, name: str, role: Role, created_by: str, device_id: str | None = None
) -> tuple[ApiToken, str]:
    """A new token; the plain text is returned once and never stored."""
    if (role is Role.DEVICE) != (device_id is not None):
        raise ValueError("device tokens, and only they, belong to a device")
    plain = new_token()
    row = ApiToken(
        name=name,
        role=role.value,
        device_id=device_id,
        token_hash=hash_token(plain),
        prefix=token_display_prefix(plain),
        created_at=utcnow(),
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    audit.record(session, created_by, "token.create", "token", str(row.id), name=name, role=role.value)
    return row, plain


def revoke_token(session: Session, token_id: int, actor: str) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        raise TokenNotFoundError(f"no active token with id {token_id}")
    row.revoked_at = utcnow()
    audit.record(session, actor, "token.revoke", "token", str(token_id), name=row.name, role=row.role)
    return row


def list_tokens(session: Session, *, include_revoked: bool = False) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(session.execute(query).scalars())


# Built once, run on the session's connection as a plain Core query: every API request runs it, and the
# ORM path (statement construction, entity loading) cost three times the query itself.
_ACTIVE_TOKEN = select(ApiToken.id, ApiToken.name, ApiToken.role, ApiToken.device_id).where(
    ApiToken.token_hash == bindparam("token_hash"), ApiToken.revoked_at.is_(None)
)


def authenticate(session: Session, plain: str) -> Principal | None:
    """The principal of an active token, or None (checked in the database every time: revocation is
    immediate, also when another process revoked it)."""
    if not plain or len(plain) > 256:
        return None
    row = session.connection().execute(_ACTIVE_TOKEN, {"token_hash": hash_token(plain)}).one_or_none()
    if row is None:
        return None
    token_id, name, role, device_id = row
    return Principal(token_id=token_id, name=name, role=Role(role), device_id=device_id)
