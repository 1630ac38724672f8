"""Registry fixtures: one signing key pair and one registry on the session's MLflow store.

Every test registers models under names of its own (`unique_name`), so they share the store safely.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet_protocol.signing import generate_keypair
from model_registry.config import RegistrySettings
from model_registry.registry import ModelRegistry
from tests.mlflow_store import MlflowStore


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_pem: bytes


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    folder = tmp_path_factory.mktemp("registry-keys")
    private_pem, public_pem = generate_keypair()
    private_path = folder / "signing.pem"
    private_path.write_bytes(private_pem)
    private_path.chmod(0o600)
    return KeyPair(private_path, public_pem)


@pytest.fixture(scope="session")
def registry_settings(
    mlflow_store: MlflowStore, signing_keys: KeyPair, tmp_path_factory: pytest.TempPathFactory
) -> RegistrySettings:
    return RegistrySettings(
        data_dir=tmp_path_factory.mktemp("registry-data"),
        mlflow_uri=mlflow_store.tracking_uri,
        artifact_root=str(mlflow_store.artifact_root),
        signing_key=signing_keys.private_path,
    )


@pytest.fixture(scope="session")
def registry(registry_settings: RegistrySettings) -> ModelRegistry:
    return ModelRegistry(registry_settings)


@pytest.fixture
def registry_env(registry_settings: RegistrySettings) -> dict[str, str]:
    """The same registry as `registry`, as the CLI reads it from the environment."""
    return {
        "EDGEFLEET_REGISTRY_DATA_DIR": str(registry_settings.data_dir),
        "EDGEFLEET_REGISTRY_MLFLOW_URI": registry_settings.tracking_uri,
        "EDGEFLEET_REGISTRY_ARTIFACT_ROOT": str(registry_settings.artifact_root),
        "EDGEFLEET_REGISTRY_SIGNING_KEY": str(registry_settings.signing_key),
        "COLUMNS": "200",
    }
