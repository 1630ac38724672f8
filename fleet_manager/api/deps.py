"""FastAPI dependencies as Annotated types: the service, a database session, the caller and their role.

Every sync dependency costs a hop to the worker thread pool (and back to the event loop), and under load
each hop waits its turn for the interpreter lock behind the other workers. So the dependencies that do no
I/O are `async` (they run on the event loop, no hop), the request's read session is created without
connecting (it connects on its first query), and the token lookup shares that session: one hop for
authentication before the endpoint's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import anyio.to_thread
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


async def get_service(request: Request) -> FleetService:
    service: FleetService = request.app.state.fleet
    return service


ServiceDep = Annotated[FleetService, Depends(get_service)]


async def get_session(service: ServiceDep) -> AsyncIterator[Session]:
    """A read session for the request (rolled back at the end; writes go through the core modules).

    Creating it does no I/O; closing it returns its connection (a rollback) on a worker thread, and only
    when it opened one.
    """
    session = service.db.read_session()
    try:
        yield session
    finally:
        if session.in_transaction():
            # Not on the routes' pool: a request holding a connection must never wait for a worker that
            # may itself be waiting for a connection (FastAPI closes its own dependencies the same way).
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "send an API token as 'Authorization: Bearer <token>' "
            "(make one with `edgefleet fleet token create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        principal = authenticate(session, credentials.credentials)
    finally:
        # Give the connection back until the endpoint runs: the request may wait for a worker thread in
        # between, and connections held by waiting requests would leave the busy workers none to take.
        session.rollback()
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

    async def __call__(self, principal: PrincipalDep) -> Principal:
        if not principal.role.allows(self.role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {self.role.value} role; your token has {principal.role.value}",
            )
        return principal


ViewerDep = Annotated[Principal, Depends(RequireRole(Role.VIEWER))]
OperatorDep = Annotated[Principal, Depends(RequireRole(Role.OPERATOR))]
AdminDep = Annotated[Principal, Depends(RequireRole(Role.ADMIN))]
