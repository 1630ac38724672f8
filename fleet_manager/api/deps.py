"""FastAPI dependencies as Annotated types: the service, a database session, the caller and their role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from fleet_manager.models import Role
from fleet_manager.service import FleetService
from fleet_manager.tokens import Principal, authenticate

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token from `edgefleet fleet token create --role viewer|operator|admin`.",
)


def get_service(request: Request) -> FleetService:
    service: FleetService = request.app.state.fleet
    return service


ServiceDep = Annotated[FleetService, Depends(get_service)]


def get_session(service: ServiceDep) -> Iterator[Session]:
    """A read session for the request (rolled back at the end; writes go through the core modules)."""
    with service.db.read() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "send an API token as 'Authorization: Bearer <token>' "
            "(make one with `edgefleet fleet token create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with service.db.read() as session:
        principal = authenticate(session, credentials.credentials)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the token is unknown or revoked",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


class RequireRole:
    """A dependency that lets through principals whose role is at least `role` (device tokens: never)."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def __call__(self, principal: PrincipalDep) -> Principal:
        if not principal.role.allows(self.role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {self.role.value} role; your token has {principal.role.value}",
            )
        return principal


ViewerDep = Annotated[Principal, Depends(RequireRole(Role.VIEWER))]
OperatorDep = Annotated[Principal, Depends(RequireRole(Role.OPERATOR))]
AdminDep = Annotated[Principal, Depends(RequireRole(Role.ADMIN))]
