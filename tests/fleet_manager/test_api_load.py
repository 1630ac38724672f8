"""The API under more concurrent requests than its database pool has connections, on SQLite and PostgreSQL:
every request is answered, none waits out the pool's timeout (a request never holds a connection while it
waits for a worker thread), and the read routes answer what their response models say."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from fleet_manager.api.main import create_app
from fleet_manager.api.schemas import DevicePage, RolloutOut
from fleet_manager.models import Role
from fleet_manager.service import FleetService
from tests.fleet_manager.conftest import make_token

PATHS = ("/api/v1/devices?limit=5", "/api/v1/rollouts", "/api/v1/stats", "/api/v1/me")


async def _burst(service: FleetService, token: str, count: int) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=create_app(service))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet", timeout=60) as client:
        return await asyncio.gather(
            *(client.get(PATHS[i % len(PATHS)], headers=headers) for i in range(count))
        )


def test_more_concurrent_requests_than_connections(make_service: Callable[..., FleetService]) -> None:
    service = make_service(None)
    token = make_token(service.db, Role.VIEWER)
    pool = service.db.engine.pool
    connections = pool.size() + pool._max_overflow  # type: ignore[attr-defined]
    # Six times the pool (and over the 40 worker threads): enough to starve it when a request holds a
    # connection while it waits for a thread (measured: the burst then hung until the pool's 30 s timeout).
    count = 6 * connections

    started = time.monotonic()
    responses = asyncio.run(asyncio.wait_for(_burst(service, token, count), 25))
    elapsed = time.monotonic() - started

    assert [r.status_code for r in responses] == [200] * count, {r.text for r in responses}
    assert elapsed < 20, f"{count} requests took {elapsed:.1f} s: some waited for a connection"
    page = DevicePage.model_validate_json(responses[0].content)
    assert page.total == len(page.items)
    assert responses[0].headers["content-type"] == "application/json"
    assert [RolloutOut.model_validate(r) for r in responses[1].json()] == []
    assert responses[3].json()["role"] == "viewer"
