"""What `edgefleet up` shows: a line per startup step, then one status line about the fleet.

On a terminal the steps have a spinner and the status line updates in place; otherwise (a log, a test) each
step prints when it is done and the status line is printed every `PLAIN_STATUS_EVERY_S` seconds.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from fleet_manager.local_stack.api import ApiError, FleetApi

LIVE_STATUS_EVERY_S = 2.0
PLAIN_STATUS_EVERY_S = 10.0


@dataclass
class Step:
    """A startup step; `detail` is printed after its name when it is done."""

    detail: str = ""


class Steps:
    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def step(self, text: str) -> Iterator[Step]:
        started = time.monotonic()
        step = Step()
        try:
            with self.console.status(text):
                yield step
        except BaseException:
            self.console.print(f"[red]✗[/red] {text}", highlight=False)
            raise
        detail = f": {step.detail}" if step.detail else ""
        took = time.monotonic() - started
        self.console.print(f"[green]✓[/green] {text}{detail} [dim]({took:.1f} s)[/dim]", highlight=False)


@dataclass
class FleetView:
    """The figures of the status line, read through the fleet manager's REST API."""

    device_ids: list[str]
    online: int = 0
    models: Counter[str] = field(default_factory=Counter)
    rollout: dict[str, Any] | None = None
    detections: int = 0
    refined: int = 0

    @classmethod
    def fetch(cls, api: FleetApi, device_ids: list[str], rollout_id: str | None) -> FleetView:
        view = cls(device_ids)
        wanted = set(device_ids)
        page = api.get("/api/v1/devices", group="local", limit=1000)
        for device in page["items"]:
            if device["id"] not in wanted:
                continue
            view.online += device["state"] == "online"
            model = device.get("active_model")
            if model:
                view.models[f"{model['name']}@{model['version']}"] += 1
        if rollout_id is not None:
            view.rollout = api.get(f"/api/v1/rollouts/{rollout_id}")
        stored = api.get("/api/v1/stats")["ingest"]["stored"]
        view.detections = int(stored.get("detections", 0))
        view.refined = int(stored.get("refined", 0))
        return view

    def line(self) -> str:
        models = ", ".join(f"{name} x{count}" for name, count in sorted(self.models.items())) or "-"
        parts = [
            f"devices {self.online}/{len(self.device_ids)} online",
            models,
        ]
        if self.rollout is not None:
            parts.append(f"canary {describe_rollout(self.rollout)}")
        parts.append(f"detections {self.detections:,}")
        parts.append(f"refined {self.refined:,}")
        return " │ ".join(parts)


def describe_rollout(rollout: dict[str, Any]) -> str:
    model = f"{rollout['model']['name']}@{rollout['model']['version']}"
    state = rollout["state"]
    if state in ("running", "paused"):
        waves = rollout["waves"]
        wave = rollout["current_wave"]
        proven = sum(int(w["proven"]) for w in rollout.get("wave_progress", []))
        state = (
            f"{state}, wave {wave + 1}/{len(waves)} ({waves[wave]:g}%), "
            f"{proven}/{rollout['device_count']} proven"
        )
    return f"{model} {state}"


class StatusLine:
    """The periodic status: in place on a terminal, a printed line every so often elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.every_s = LIVE_STATUS_EVERY_S if console.is_terminal else PLAIN_STATUS_EVERY_S
        self._live: Live | None = None
        self._next = 0.0

    def __enter__(self) -> StatusLine:
        if self.console.is_terminal:
            self._live = Live(Text("…"), console=self.console, transient=True, auto_refresh=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def show(self, view: FleetView | None, error: ApiError | None = None) -> None:
        self._next = time.monotonic() + self.every_s
        text = view.line() if view is not None else f"fleet manager not answering ({error})"
        stamped = f"{time.strftime('%H:%M:%S')}  {text}"
        if self._live is not None:
            self._live.update(Text(stamped, style="bold"), refresh=True)
        else:
            self.console.print(stamped, highlight=False)

    def event(self, message: str) -> None:
        """A line that stays (printed above the live line)."""
        self.console.print(f"{time.strftime('%H:%M:%S')}  {message}", highlight=False)
