"""Everything the model registry can be told, in one settings class.

Values come from (highest first) keyword arguments, then `EDGEFLEET_REGISTRY_*` environment variables.
By default the registry needs no server: MLflow keeps its metadata in a SQLite file and the model files in
a folder, both under `data_dir`. Point `mlflow_uri` at an MLflow tracking server for production.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("data/registry")
DEFAULT_EXPERIMENT = "edgefleet-registry"
# The URI schemes MLflow stores metadata in a local database for; their artifacts go under data_dir.
LOCAL_DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")


class RegistrySettings(BaseSettings):
    """Settings of the model registry (CLI and the fleet manager's Python API alike)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_REGISTRY_", extra="forbid")

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Local state: the default MLflow SQLite store and artifacts, the download cache, and "
        "the default place of the signing key.",
    )
    mlflow_uri: str | None = Field(
        default=None,
        description="MLflow tracking and registry URI (e.g. http://mlflow:5000 or "
        "postgresql://user@db/mlflow); default: sqlite:///<data_dir>/mlflow.db, no server.",
    )
    artifact_root: str | None = Field(
        default=None,
        description="Where a new registry experiment stores model files when MLflow uses a database "
        "directly (a folder or an object-store URI such as s3://bucket/models); default: "
        "<data_dir>/artifacts. Ignored with a tracking server, which decides itself.",
    )
    experiment: str = Field(
        default=DEFAULT_EXPERIMENT,
        min_length=1,
        description="MLflow experiment whose runs hold the registered model files.",
    )
    signing_key: Path | None = Field(
        default=None,
        description="PEM Ed25519 private key that signs registered versions; default: the PEM text in "
        "$EDGEFLEET_SIGNING_KEY, else <data_dir>/keys/signing.pem. Keep it out of any repository.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where downloaded model files are cached, verified by sha256 on every use; "
        "default: <data_dir>/cache.",
    )

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{self.data_dir.resolve() / 'mlflow.db'}"

    @property
    def uses_server(self) -> bool:
        """Whether MLflow is reached through a tracking server (which then owns artifact locations)."""
        return not self.tracking_uri.startswith(LOCAL_DB_SCHEMES)

    @property
    def artifact_location(self) -> str | None:
        """The artifact location for a new experiment, or None to let the tracking server choose."""
        if self.uses_server:
            return None
        if self.artifact_root is None:
            return (self.data_dir.resolve() / "artifacts").as_uri()
        if "://" in self.artifact_root:
            return self.artifact_root
        return Path(self.artifact_root).resolve().as_uri()

    @property
    def default_key_path(self) -> Path:
        return self.data_dir / "keys" / "signing.pem"

    @property
    def download_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"
