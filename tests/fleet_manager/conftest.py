"""Fleet manager fixtures: a fresh database per test on SQLite and on PostgreSQL, a real model registry with
two versions of a model, and an in-process fleet service on the session's Mosquitto.

Every test gets its own topic root (`t<hex>/v1`) and MQTT client id, so tests sharing the session broker
never see each other's retained messages or persistent sessions.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn

from fleet_manager.config import FleetSettings
from fleet_manager.db import Database
from fleet_manager.models import Role
from fleet_manager.registry import RegistryCatalog
from fleet_manager.service import FleetService
from fleet_manager.tokens import create_token
from fleet_protocol.signing import generate_keypair
from fleet_protocol.topics import Topics
from model_registry.config import RegistrySettings
from model_registry.registry import ModelRegistry, ModelVersionInfo
from tests.broker import MosquittoBroker
from tests.mlflow_store import MlflowStore

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgresql"]


def postgres_url(schema: str) -> str:
    return f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy and return it; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's own: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
        return
    schema = f"fm_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield postgres_url(schema)
    finally:
        with admin.connect() as connection:
            # End whatever a killed fleet manager left connected to this schema, then drop it.
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                    "AND query ILIKE :pattern"
                ),
                {"pattern": f"%{schema}%"},
            )
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@dataclass(frozen=True)
class RegisteredModels:
    """One model name with two registered versions; alias `production` points at v2."""

    name: str
    v1: ModelVersionInfo
    v2: ModelVersionInfo
    settings: RegistrySettings
    public_pem: bytes

    @property
    def overrides(self) -> dict[str, Any]:
        """FleetSettings.registry for the same registry."""
        return {
            "data_dir": str(self.settings.data_dir),
            "mlflow_uri": self.settings.tracking_uri,
            "artifact_root": self.settings.artifact_root,
            "signing_key": str(self.settings.signing_key),
        }


@pytest.fixture(scope="session")
def fleet_models(
    mlflow_store: MlflowStore, tmp_path_factory: pytest.TempPathFactory, int8_model: Path, fp32_model: Path
) -> RegisteredModels:
    folder = tmp_path_factory.mktemp("fleet-registry")
    private_pem, public_pem = generate_keypair()
    key = folder / "signing.pem"
    key.write_bytes(private_pem)
    key.chmod(0o600)
    settings = RegistrySettings(
        data_dir=folder / "data",
        mlflow_uri=mlflow_store.tracking_uri,
        artifact_root=str(mlflow_store.artifact_root),
        signing_key=key,
    )
    registry = ModelRegistry(settings)
    name = f"fleet-yolo-{uuid.uuid4().hex[:6]}"
    v1 = registry.register(int8_model, name, variant="int8")
    v2 = registry.register(fp32_model, name, variant="fp32", alias="production")
    return RegisteredModels(name, v1, v2, settings, public_pem)


@pytest.fixture(scope="session")
def fleet_catalog(fleet_models: RegisteredModels) -> RegistryCatalog:
    return RegistryCatalog(ModelRegistry(fleet_models.settings))


def fleet_settings(
    tmp_path: Path,
    database_url: str,
    mqtt_broker: MosquittoBroker | None = None,
    **overrides: Any,
) -> FleetSettings:
    """Settings for a test: its own topic root and client id, quick ticks, every telemetry kept."""
    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "data_dir": tmp_path / "fleet",
        "database_url": database_url,
        "broker": {
            "host": "127.0.0.1",
            "port": mqtt_broker.port if mqtt_broker else 1883,
            "client_id": f"fleet-{suffix}",
            "topic_root": f"t{suffix}/v1",
            "session_expiry_s": 300,
        },
        "ingest": {"telemetry_history_interval_s": 0, "flush_interval_s": 0.01},
        "rollouts": {"tick_s": 0.1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return FleetSettings(**values)


@pytest.fixture
def make_service(
    tmp_path: Path, database_url: str, fleet_catalog: RegistryCatalog
) -> Iterator[Callable[..., FleetService]]:
    """Build (and afterwards stop) fleet services on this test's database."""
    services: list[FleetService] = []

    def make(broker: MosquittoBroker | None = None, *, start: bool = True, **overrides: Any) -> FleetService:
        settings = fleet_settings(tmp_path, database_url, broker, **overrides)
        service = FleetService(settings, catalog=fleet_catalog, mqtt=broker is not None)
        services.append(service)
        if start:
            service.start()
            if service.mqtt is not None:
                assert service.mqtt.wait_connected(10), "the fleet manager could not connect to the broker"
        else:
            service.db.migrate()
        return service

    yield make
    for service in services:
        service.stop()


def topics_of(service: FleetService) -> Topics:
    return service.settings.topics


def make_token(db: Database, role: Role, device_id: str | None = None) -> str:
    with db.write() as session:
        _, plain = create_token(
            session, name=f"test-{role.value}", role=role, created_by="test", device_id=device_id
        )
    return plain


class ServerThread:
    """The fleet manager's app under a real uvicorn on a free port, in a thread."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
