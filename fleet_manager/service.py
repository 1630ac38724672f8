"""The fleet manager process: database, ingest, MQTT, rollout controller, retention and field tracking.

`FleetService(settings).start()` migrates the database, rewrites the broker files, and starts the
background parts; `create_app(service)` (fleet_manager.api.main) serves the HTTP API over it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from fleet_manager.config import FleetSettings
from fleet_manager.db import Database
from fleet_manager.field_tracking import FieldTracker
from fleet_manager.ingest import Ingestor
from fleet_manager.mqtt import FleetMqtt
from fleet_manager.provisioning import sync_broker
from fleet_manager.registry import (
    ModelCatalog,
    ModelInfo,
    RegistryCatalog,
    RegistryUnavailableError,
)
from fleet_manager.rollouts import RolloutController

log = logging.getLogger(__name__)


class LazyCatalog:
    """Opens the model registry on first use, so the service starts even while MLflow is unreachable."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self._overrides = overrides
        self._catalog: ModelCatalog | None = None
        self._lock = threading.Lock()

    def _open(self) -> ModelCatalog:
        with self._lock:
            if self._catalog is None:
                try:
                    self._catalog = RegistryCatalog.from_settings(self._overrides)
                except ImportError as error:
                    raise RegistryUnavailableError(
                        f"the model registry is not installed ({error}): pip install 'edgefleet[fleet]'"
                    ) from error
                except Exception as error:
                    raise RegistryUnavailableError(f"cannot open the model registry: {error}") from error
            return self._catalog

    def preload(self) -> None:
        """Open the registry and import MLflow (seconds) on a thread, so the first rollout does not wait."""

        def load() -> None:
            try:
                self._open()
                import mlflow  # noqa: F401
            except Exception as error:
                log.warning("model registry not available yet: %s", error)

        threading.Thread(target=load, name="fleet-registry-preload", daemon=True).start()

    def get(self, name: str, version: str) -> ModelInfo:
        return self._open().get(name, version)

    def resolve(self, name: str, alias: str) -> ModelInfo:
        return self._open().resolve(name, alias)

    def local_file(self, name: str, version: str) -> Path:
        return self._open().local_file(name, version)


class FleetService:
    """Everything `edgefleet fleet serve` runs besides the HTTP server."""

    def __init__(
        self, settings: FleetSettings, *, catalog: ModelCatalog | None = None, mqtt: bool = True
    ) -> None:
        self.settings = settings
        self.db = Database(settings.resolved_database_url)
        self.catalog: ModelCatalog = catalog or LazyCatalog(settings.registry)
        self.ingestor = Ingestor(self.db, settings.topics, settings.ingest)
        self.mqtt = (
            FleetMqtt(settings.broker, self.ingestor, receive_maximum=settings.ingest.queue_max)
            if mqtt
            else None
        )
        self.controller = RolloutController(
            self.db, self.catalog, public_url=settings.api.public_url, publisher=self.mqtt
        )
        self.field_tracker = (
            FieldTracker.from_settings(self.db, settings) if settings.field_tracking.enabled else None
        )
        self.ingestor.add_listener(self._on_ingested)
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        self.started = False

    def _on_ingested(self, kinds: frozenset[str]) -> None:
        if "model/reported" in kinds or "status" in kinds:
            self.controller.wake()

    def start(self, *, migrate: bool = True, broker_files: bool = True) -> None:
        if self.started:
            return
        if migrate:
            self.db.migrate()
        if broker_files:
            sync_broker(self.db, self.settings)
        self.ingestor.start()
        if self.mqtt is not None:
            self.mqtt.start()
        self.controller.start(self.settings.rollouts.tick_s)
        self._stop.clear()
        self._maintenance = threading.Thread(target=self._maintain, name="fleet-retention", daemon=True)
        self._maintenance.start()
        if self.field_tracker is not None:
            self.field_tracker.start()
        if isinstance(self.catalog, LazyCatalog):
            self.catalog.preload()
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        self._stop.set()
        if self.field_tracker is not None:
            self.field_tracker.stop()
        self.controller.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.ingestor.stop()
        if self._maintenance is not None:
            self._maintenance.join(5)
        self.db.dispose()
        self.started = False

    def _maintain(self) -> None:
        while not self._stop.wait(self.settings.retention.interval_s):
            try:
                deleted = self.ingestor.purge(self.settings.retention)
                if any(deleted.values()):
                    log.info("retention: deleted %s", {k: v for k, v in deleted.items() if v})
            except Exception:
                log.exception("retention pass failed; will retry")
