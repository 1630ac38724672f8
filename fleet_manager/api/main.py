"""The FastAPI application: API routes, the artifact endpoint, error mapping, OpenAPI.

`create_app(service)` serves an existing `FleetService`; with `manage_service=True` (what `edgefleet fleet
serve` uses) the app's lifespan starts and stops it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from fleet_manager.api.routes import audit, devices, rollouts, system, tokens
from fleet_manager.artifacts import ArtifactAuthorizer, ArtifactFile, ArtifactLookup, artifact_router
from fleet_manager.models import Device, Role
from fleet_manager.registry import ModelNotFoundError, RegistryUnavailableError
from fleet_manager.rollouts import (
    RolloutConflictError,
    RolloutNotFoundError,
    RolloutStateError,
    RolloutValidationError,
)
from fleet_manager.service import FleetService
from fleet_manager.tokens import authenticate
from fleet_protocol import __version__

log = logging.getLogger(__name__)

DESCRIPTION = """\
The edgefleet fleet manager: devices, staged model rollouts, the audit log, and model artifacts.

Every `/api/v1` route takes a bearer token (`Authorization: Bearer <token>`); make one with
`edgefleet fleet token create --role viewer|operator|admin`. Roles: **viewer** reads, **operator** also
creates and steers rollouts and edits devices, **admin** also provisions devices and manages tokens.
Device tokens (from provisioning) may only download the artifact of their own desired model.
"""


def create_app(service: FleetService, *, manage_service: bool = False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_service:
            service.start()
        try:
            yield
        finally:
            if manage_service:
                service.stop()

    app = FastAPI(
        title="edgefleet fleet manager",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pages load their scripts from a CDN; nothing is fetched from one at run
        # time, so only the OpenAPI document is served (/openapi.json; open it in any OpenAPI viewer).
        docs_url=None,
        redoc_url=None,
    )
    app.state.fleet = service
    for module in (system, devices, rollouts, tokens, audit):
        app.include_router(module.router)
    app.include_router(artifact_router(_artifact_lookup(service), _artifact_authorizer(service)))
    _error_handlers(app)
    _mount_dashboard(app)
    return app


def _mount_dashboard(app: FastAPI) -> None:
    """The web dashboard, when the package ships one: `fleet_manager.web.mount(app)` adds its routes."""
    if importlib.util.find_spec("fleet_manager.web") is None:
        return
    dashboard = importlib.import_module("fleet_manager.web")
    mount = getattr(dashboard, "mount", None)
    if callable(mount):
        mount(app)


def _artifact_lookup(service: FleetService) -> ArtifactLookup:
    def lookup(name: str, version: str) -> ArtifactFile | None:
        try:
            info = service.catalog.get(name, version)
            path = service.catalog.local_file(name, version)
        except ModelNotFoundError:
            return None
        except RegistryUnavailableError as error:
            raise HTTPException(503, f"the model registry is unavailable: {error}") from None
        return ArtifactFile(path=path, sha256=info.sha256, size=info.size)

    return lookup


def _artifact_authorizer(service: FleetService) -> ArtifactAuthorizer:
    def authorize(token: str, name: str, version: str) -> bool:
        """Operators and admins may fetch any artifact; a device only the model it is told to run."""
        with service.db.read() as session:
            principal = authenticate(session, token)
            if principal is None:
                return False
            if principal.role is Role.DEVICE:
                device = session.get(Device, principal.device_id) if principal.device_id else None
                return device is not None and (device.desired_name, device.desired_version) == (name, version)
            return principal.role.allows(Role.OPERATOR)

    return authorize


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RolloutNotFoundError)
    async def _not_found(request: Request, error: RolloutNotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(RolloutConflictError)
    async def _conflict(request: Request, error: RolloutConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(error), "conflicts": error.conflicts}, status_code=409)

    @app.exception_handler(RolloutStateError)
    async def _state(request: Request, error: RolloutStateError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(RolloutValidationError)
    async def _invalid(request: Request, error: RolloutValidationError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(RegistryUnavailableError)
    async def _registry(request: Request, error: RegistryUnavailableError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503)
