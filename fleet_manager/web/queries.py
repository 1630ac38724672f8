"""Read queries the dashboard needs beyond the core's: filter choices, rollout progress in bulk, a device's
rollouts, the fleet's latest figures, and a cached view of the model registry."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_manager.models import (
    ACTIVE_ROLLOUT_STATES,
    Device,
    DevicePhase,
    DeviceTag,
    Rollout,
    RolloutDevice,
    utcnow,
)

FAILED_PHASES = (DevicePhase.FAILED.value, DevicePhase.UNHEALTHY.value)
DEVICE_STATES = ("online", "stopping", "offline", "unknown")


# ---- devices ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterOptions:
    """What the devices table can be filtered by, from the devices that exist."""

    groups: list[str]
    tags: list[str]  # "key=value"
    models: list[str]  # "name@version"
    states: tuple[str, ...] = DEVICE_STATES


def filter_options(session: Session) -> FilterOptions:
    groups = session.execute(
        select(Device.group_name).where(Device.group_name.is_not(None)).distinct().order_by(Device.group_name)
    ).scalars()
    tags = session.execute(
        select(DeviceTag.key, DeviceTag.value).distinct().order_by(DeviceTag.key, DeviceTag.value).limit(500)
    ).all()
    models = session.execute(
        select(Device.active_model_name, Device.active_model_version)
        .where(Device.active_model_name.is_not(None))
        .distinct()
        .order_by(Device.active_model_name, Device.active_model_version)
    ).all()
    return FilterOptions(
        groups=[g for g in groups if g],
        tags=[f"{k}={v}" for k, v in tags],
        models=[f"{n}@{v}" if v else str(n) for n, v in models],
    )


@dataclass(frozen=True)
class DeviceRollout:
    rollout_id: str
    model: str
    rollout_state: str
    wave: int
    phase: str
    error: str | None
    created_at: datetime


def device_rollouts(session: Session, device_id: str, *, limit: int = 20) -> list[DeviceRollout]:
    """The rollouts a device took part in, newest first, with its phase in each."""
    rows = session.execute(
        select(RolloutDevice, Rollout)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(RolloutDevice.device_id == device_id)
        .order_by(Rollout.created_at.desc(), Rollout.id.desc())
        .limit(limit)
    ).all()
    return [
        DeviceRollout(
            rollout_id=r.id,
            model=f"{r.model_name}@{r.model_version}",
            rollout_state=r.state,
            wave=rd.wave,
            phase=rd.phase,
            error=rd.error,
            created_at=r.created_at,
        )
        for rd, r in rows
    ]


@dataclass(frozen=True)
class FleetFigures:
    """The latest throughput and p95 latency of every online device (from its last telemetry)."""

    fps: list[float]
    latency_p95_ms: list[float]


def fleet_figures(session: Session, *, limit: int = 100_000) -> FleetFigures:
    rows = session.execute(
        select(Device.fps, Device.latency_p95_ms).where(Device.state == "online").limit(limit)
    ).all()
    return FleetFigures(
        fps=[fps for fps, _ in rows if fps is not None],
        latency_p95_ms=[p95 for _, p95 in rows if p95 is not None],
    )


# ---- rollouts --------------------------------------------------------------------------------------------


@dataclass
class RolloutSummary:
    """A rollout with its devices counted by phase (over all waves)."""

    rollout: Rollout
    phases: Counter[str] = field(default_factory=Counter)
    proven: int = 0

    @property
    def total(self) -> int:
        return sum(self.phases.values())

    @property
    def failures(self) -> int:
        return sum(self.phases.get(p, 0) for p in FAILED_PHASES)

    @property
    def active(self) -> int:
        return self.phases.get(DevicePhase.ACTIVE.value, 0)

    @property
    def wave_label(self) -> str:
        r = self.rollout
        if r.state in (s.value for s in ACTIVE_ROLLOUT_STATES) and r.started_at is not None:
            return f"{r.current_wave + 1} of {len(r.waves)}"
        return f"{len(r.waves)} wave(s)"


def rollout_summaries(session: Session, rollouts: Iterable[Rollout]) -> list[RolloutSummary]:
    """Phase counts for many rollouts in one query."""
    summaries = {r.id: RolloutSummary(r) for r in rollouts}
    ids = list(summaries)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for rollout_id, phase, count, proven in session.execute(
            select(
                RolloutDevice.rollout_id,
                RolloutDevice.phase,
                func.count(),
                func.count(RolloutDevice.proven_at),
            )
            .where(RolloutDevice.rollout_id.in_(chunk))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.phase)
        ):
            summary = summaries[rollout_id]
            summary.phases[phase] += int(count)
            if phase == DevicePhase.ACTIVE.value:
                summary.proven += int(proven)
    return list(summaries.values())


def list_rollouts(session: Session, *, active_only: bool = False, limit: int = 50) -> list[Rollout]:
    query = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id.desc()).limit(limit)
    if active_only:
        query = query.where(Rollout.state.in_([s.value for s in ACTIVE_ROLLOUT_STATES]))
    return list(session.execute(query).scalars())


# ---- the model registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelView:
    """One registered model: its versions (oldest first), aliases and alias history (newest first)."""

    name: str
    aliases: dict[str, str]
    versions: list[Any]  # model_registry.registry.ModelVersionInfo
    history: list[Any]  # model_registry.registry.AliasMove

    @property
    def refs(self) -> list[str]:
        """What a rollout can name: name@alias, then name@version, newest first."""
        return [f"{self.name}@{a}" for a in sorted(self.aliases)] + [
            f"{self.name}@{v.version}" for v in reversed(self.versions)
        ]


@dataclass(frozen=True)
class RegistrySnapshot:
    """What the registry held when last read; `loading` while a (slow) read is still under way."""

    models: list[ModelView]
    error: str | None
    fetched_at: datetime | None
    loading: bool = False


def registry_of(catalog: object, fallback: Callable[[], Any] | None = None) -> Any:
    """The `model_registry.ModelRegistry` behind the fleet manager's model catalog.

    The catalog protocol only looks versions up; browsing needs the registry itself. `LazyCatalog` opens
    it on demand and `RegistryCatalog` wraps it; any other catalog (a test double) gets `fallback()`.
    """
    opener = getattr(catalog, "_open", None)
    inner = opener() if callable(opener) else catalog
    registry = getattr(inner, "_registry", None)
    if registry is None and all(hasattr(inner, m) for m in ("list_models", "list_versions")):
        registry = inner
    if registry is None and fallback is not None:
        registry = fallback()
    if registry is None:
        raise LookupError("the fleet manager's model catalog cannot list models")
    return registry


def read_registry(registry: Any) -> list[ModelView]:
    views = []
    for model in registry.list_models():
        versions = list(registry.list_versions(model.name))
        history_of = getattr(registry, "alias_history", None)
        history = list(reversed(history_of(model.name))) if callable(history_of) else []
        views.append(ModelView(model.name, dict(sorted(model.aliases.items())), versions, history))
    return views


class RegistryBrowser:
    """The registry's models for the dashboard, read on a thread and cached for `ttl_s`.

    MLflow can take long to answer (a first import, or retries while its server is down), so a page waits
    at most `wait_s` for a read and otherwise shows the last snapshot (or "loading") and refreshes later.
    Failures are cached like successes, so a registry that is down is asked again only every `ttl_s`.
    """

    def __init__(
        self, load: Callable[[], list[ModelView]], *, ttl_s: float = 15.0, wait_s: float = 2.0
    ) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._snapshot: RegistrySnapshot | None = None
        self._read_at = 0.0
        self._loading = False

    def snapshot(self, *, fresh: bool = False, wait_s: float | None = None) -> RegistrySnapshot:
        with self._cond:
            expired = self._snapshot is None or time.monotonic() - self._read_at >= self._ttl_s
            if (expired or fresh) and not self._loading:
                self._loading = True
                threading.Thread(target=self._read, name="dashboard-registry", daemon=True).start()
                # Only the request that started a read waits for it; the others show what there is.
                self._cond.wait_for(lambda: not self._loading, self._wait_s if wait_s is None else wait_s)
            if self._snapshot is None:
                return RegistrySnapshot([], None, None, loading=True)
            return replace(self._snapshot, loading=self._loading)

    def _read(self) -> None:
        try:
            snapshot = RegistrySnapshot(self._load(), None, utcnow())
        except Exception as error:  # shown on the page; the dashboard works without the registry
            with self._cond:
                models = self._snapshot.models if self._snapshot else []
            snapshot = RegistrySnapshot(models, f"the model registry cannot be read: {error}", utcnow())
        with self._cond:
            self._snapshot, self._read_at, self._loading = snapshot, time.monotonic(), False
            self._cond.notify_all()
