"""The agent's own routes on the local API: what it is doing, and what it recently saw."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Query

from device_agent.pipeline import RecentEvents


def add_agent_routes(app: FastAPI, status: Callable[[], dict[str, Any]], recent: RecentEvents) -> None:
    @app.get("/v1/status", tags=["agent"], summary="Device, model, broker link, sources and outbox state")
    def get_status() -> dict[str, Any]:
        return status()

    @app.get(
        "/v1/events", tags=["agent"], summary="Recent detection events, newest first, with refined labels"
    )
    def get_events(
        limit: Annotated[int, Query(ge=1, le=1000, description="How many events to return.")] = 50,
    ) -> list[dict[str, object]]:
        return recent.latest(limit)
