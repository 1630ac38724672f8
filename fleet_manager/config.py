"""Everything the fleet manager can be told, in one settings class.

Values come from (highest first) keyword arguments, `EDGEFLEET_FLEET_*` environment variables (nested with
`__`, e.g. `EDGEFLEET_FLEET_BROKER__PASSWORD`), then the YAML file given with `--config`. The model registry
keeps its own settings (`EDGEFLEET_REGISTRY_*`); `registry` here only overrides some of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from fleet_protocol.mqtt import MqttSettings, session_settings
from fleet_protocol.settings import ConfigError as ConfigError
from fleet_protocol.settings import YamlFileSettings, load_yaml_settings
from fleet_protocol.topics import DEFAULT_ROOT, Topics

DEFAULT_FLEET_USERNAME = "edgefleet-fleet"


class BrokerSettings(BaseModel):
    """How the fleet manager reaches the MQTT broker."""

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    username: str | None = Field(
        default=None, description="The fleet manager's broker account (see `edgefleet fleet broker-account`)."
    )
    password: SecretStr | None = Field(default=None, description="Its password; prefer the environment.")
    tls_ca: Path | None = Field(default=None, description="CA certificate file; setting it turns TLS on.")
    tls_cert: Path | None = Field(default=None, description="Client certificate for mutual TLS.")
    tls_key: Path | None = Field(default=None, description="Client private key for mutual TLS.")
    client_id: str = Field(
        default="edgefleet-fleet", min_length=1, description="MQTT client id; one per fleet manager."
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="How long the broker queues messages for the fleet manager while it is down.",
    )
    topic_root: str = Field(default=DEFAULT_ROOT, description="Root of the topic tree.")

    @field_validator("topic_root")
    @classmethod
    def _valid_root(cls, value: str) -> str:
        Topics(value)  # raises TopicError (a ValueError) with the reason
        return value

    def mqtt_settings(self) -> MqttSettings:
        return session_settings(self, self.client_id)


class MosquittoSettings(BaseModel):
    """The Mosquitto password and ACL files the fleet manager generates from its database."""

    password_file: Path | None = Field(
        default=None, description="Mosquitto `password_file`; default: <data_dir>/mosquitto/passwd."
    )
    acl_file: Path | None = Field(
        default=None, description="Mosquitto `acl_file`; default: <data_dir>/mosquitto/acl."
    )
    pid_file: Path | None = Field(
        default=None,
        description="Mosquitto's `pid_file`: after the files change it gets SIGHUP to reload them. "
        "None: reload it yourself (e.g. `systemctl reload mosquitto`).",
    )


class ProvisioningSettings(BaseModel):
    """What goes into the agent configuration printed by `edgefleet fleet provision`."""

    broker_host: str | None = Field(
        default=None, description="Broker address as devices see it; default: broker.host."
    )
    broker_port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port as devices see it; default: broker.port."
    )
    broker_tls_ca: Path | None = Field(
        default=None, description="CA file path on the device (turns TLS on in the agent config)."
    )
    device_data_dir: str = Field(
        default="/var/lib/edgefleet", description="The agent's data_dir on the device."
    )
    initial_model_path: str = Field(
        default="/var/lib/edgefleet/models/yolov8n.onnx",
        description="The model the agent starts with, before its first OTA update.",
    )


class IngestSettings(BaseModel):
    """How MQTT messages are written to the database."""

    batch_max: int = Field(default=2000, ge=1, le=100_000, description="Most messages written per batch.")
    flush_interval_s: float = Field(
        default=0.2, gt=0, le=10, description="Longest a received message waits before its batch is written."
    )
    queue_max: int = Field(
        default=50_000,
        ge=100,
        description="Messages waiting to be written; when full, receiving pauses (the broker keeps them).",
    )
    telemetry_history_interval_s: float = Field(
        default=60.0, ge=0, description="Keep at most one telemetry sample per device per this many seconds."
    )
    store_crops: bool = Field(default=True, description="Keep crop JPEGs (for the dashboard thumbnails).")


class RetentionSettings(BaseModel):
    """How long ingested data is kept (the audit log is kept forever)."""

    detections_days: float = Field(default=7.0, gt=0, description="Detections and refined labels.")
    crops_days: float = Field(default=1.0, gt=0, description="Crop JPEGs.")
    telemetry_days: float = Field(default=30.0, gt=0, description="Telemetry history samples.")
    ota_events_days: float = Field(default=180.0, gt=0, description="Per-device OTA history.")
    interval_s: float = Field(default=300.0, gt=0, description="How often old rows are deleted.")


class RolloutSettings(BaseModel):
    """The rollout controller."""

    tick_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the controller looks at every active rollout."
    )


class FieldTrackingSettings(BaseModel):
    """MLflow runs of how each model version performs on the devices (docs/field-tracking.md)."""

    enabled: bool = Field(
        default=False,
        description="Log field metrics to MLflow; turn it on in one fleet manager replica only (each replica "
        "would log the same buckets again).",
    )
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default: the model registry's (`registry.mlflow_uri`, else its "
        "local SQLite store), so the runs sit beside the registered versions they describe.",
    )
    artifact_root: str | None = Field(
        default=None,
        description="Where new field experiments keep artifacts when MLflow uses a database directly (folder "
        "or URI); default: the registry's artifact root. Ignored with a tracking server.",
    )
    experiment_prefix: str = Field(
        default="edgefleet-field/",
        min_length=1,
        description="One experiment per model name: this prefix followed by the model name.",
    )
    interval_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Bucket length, s: each model version's run gets one point per metric and bucket.",
    )
    settle_s: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="A bucket is logged this long after it ends, so messages still being written count.",
    )
    max_catch_up_s: float = Field(
        default=86_400.0,
        gt=0,
        description="After a restart, buckets missed while down are logged back to at most this far.",
    )
    max_device_metrics: int = Field(
        default=100,
        ge=0,
        le=10_000,
        description="Per-device metrics for at most this many devices per version (by device id); the "
        "fleet-wide aggregates always count every device.",
    )
    samples_per_bucket: int = Field(
        default=4, ge=0, le=100, description="Crop JPEGs logged per version and bucket, one per device first."
    )
    max_samples: int = Field(default=200, ge=0, description="Crop JPEGs logged per run at most.")
    detections_per_bucket: int = Field(
        default=20,
        ge=0,
        le=1000,
        description="Most recent detection events (JSON, with their objects) logged per version and bucket.",
    )


class ApiSettings(BaseModel):
    """The HTTP server."""

    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(default=8000, ge=1, le=65535, description="Port to listen on.")
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        pattern=r"^https?://[^\s]+$",
        description="Base URL devices reach this server at; model/desired artifact URLs start with it.",
    )

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


class FleetSettings(YamlFileSettings):
    """Settings of the fleet manager."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_")

    data_dir: Path = Field(
        default=Path("edgefleet-data/fleet"), description="The SQLite database and broker files live here."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite in data_dir.",
    )
    broker: BrokerSettings = Field(default_factory=BrokerSettings, description="The MQTT broker.")
    mosquitto: MosquittoSettings = Field(
        default_factory=MosquittoSettings, description="Generated Mosquitto password and ACL files."
    )
    provisioning: ProvisioningSettings = Field(
        default_factory=ProvisioningSettings, description="The agent config `provision` prints."
    )
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="MQTT ingest.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings, description="Data retention.")
    rollouts: RolloutSettings = Field(default_factory=RolloutSettings, description="Rollout controller.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="HTTP server and public URL.")
    field_tracking: FieldTrackingSettings = Field(
        default_factory=FieldTrackingSettings, description="Per model version field metrics in MLflow."
    )
    registry: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides for the model registry's settings (RegistrySettings fields, e.g. mlflow_uri).",
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.sqlite3'}"

    @property
    def password_file(self) -> Path:
        return self.mosquitto.password_file or self.data_dir / "mosquitto" / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.mosquitto.acl_file or self.data_dir / "mosquitto" / "acl"

    @property
    def topics(self) -> Topics:
        return Topics(self.broker.topic_root)

    @property
    def fleet_username(self) -> str:
        return self.broker.username or DEFAULT_FLEET_USERNAME


def load_settings(path: Path | None = None, **overrides: Any) -> FleetSettings:
    """Settings from `path` (YAML), the environment and `overrides`; ConfigError names each bad field."""
    return load_yaml_settings(FleetSettings, path, overrides, component="fleet manager")
