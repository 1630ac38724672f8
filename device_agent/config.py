"""Everything the device agent can be told, in one settings class.

Values come from (highest first) keyword arguments, `EDGEFLEET_AGENT_*` environment variables (nested with
`__`, e.g. `EDGEFLEET_AGENT_BROKER__PASSWORD`), then the YAML file given to `edgefleet agent run --config`.
Environment values merge into the file's sections, so secrets can stay out of the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from device_agent.policies import CropPolicyConfig, PublishPolicyConfig
from device_agent.sources import SourceConfig
from fleet_protocol.settings import ConfigError as ConfigError
from fleet_protocol.settings import YamlFileSettings, load_yaml_settings
from fleet_protocol.topics import DEFAULT_ROOT, validate_device_id


class BrokerConfig(BaseModel):
    """The MQTT broker the agent publishes to."""

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    username: str | None = Field(default=None, description="Broker account; by convention the device id.")
    password: SecretStr | None = Field(default=None, description="Broker password; prefer the environment.")
    tls_ca: Path | None = Field(default=None, description="CA certificate file; setting it turns TLS on.")
    tls_cert: Path | None = Field(default=None, description="Client certificate for mutual TLS.")
    tls_key: Path | None = Field(default=None, description="Client private key for mutual TLS.")
    keepalive_s: int = Field(
        default=30, ge=5, le=3600, description="MQTT keepalive; the will fires after ~1.5x."
    )
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="How long the broker keeps this device's session while it is away.",
    )
    topic_root: str = Field(default=DEFAULT_ROOT, description="Root of the topic tree.")
    reconnect_min_s: float = Field(
        default=0.5, gt=0, le=3600, description="First delay before reconnecting (jittered, doubles)."
    )
    reconnect_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest delay between reconnect attempts."
    )

    @model_validator(mode="after")
    def _backoff_in_order(self) -> BrokerConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self


class ModelConfig(BaseModel):
    """The detector model and its thresholds."""

    path: Path = Field(description="YOLOv8/YOLO11-layout ONNX detector to start with.")
    names_file: Path | None = Field(default=None, description="Class names, if the model lacks them.")
    providers: list[str] | None = Field(
        default=None, description="Execution providers; default: best available."
    )
    threads: int = Field(
        default=0, ge=0, le=256, description="onnxruntime intra-op threads (0 = its default)."
    )
    conf: float = Field(default=0.25, ge=0, le=1, description="Confidence threshold.")
    iou: float = Field(default=0.45, ge=0, le=1, description="NMS IoU threshold.")
    max_det: int = Field(default=100, ge=1, le=1000, description="Most detections per frame.")
    classes: list[str] | None = Field(default=None, description="Detect only these classes (None: all).")


class OutboxConfig(BaseModel):
    """The durable queue between detection and the network."""

    path: Path | None = Field(default=None, description="SQLite file; default: <data_dir>/outbox.sqlite3.")
    max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=64 * 1024,
        description="Bytes on disk kept at most: database file + WAL (one batch more while it is written).",
    )
    max_age_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="Older messages are dropped (and counted)."
    )
    drop_detections_when_full: bool = Field(
        default=False, description="When crops are gone and it is still full, drop oldest detections too."
    )
    inflight: int = Field(default=100, ge=1, le=65535, description="Messages awaiting PUBACK at once.")


class LinkConfig(BaseModel):
    """How the link to the broker is watched, and when crops wait for a better one."""

    rtt_probe_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often the publish-to-PUBACK round trip is measured.",
    )
    crop_hold_rtt_ms: float | None = Field(
        default=1500.0,
        ge=0,
        le=3_600_000,
        description="Above this round trip, crops wait in the outbox (within its caps) while detections go "
        "on; they also wait while the link is down. None: hold crops only while the link is down.",
    )
    crop_resume_rtt_ms: float | None = Field(
        default=500.0,
        ge=0,
        le=3_600_000,
        description="Held crops go out again once a round trip is under this (at most crop_hold_rtt_ms; the "
        "gap keeps a link near the threshold from flapping). None: the same as crop_hold_rtt_ms.",
    )

    @model_validator(mode="after")
    def _resume_not_above_hold(self) -> LinkConfig:
        hold, resume = self.crop_hold_rtt_ms, self.crop_resume_rtt_ms
        if hold is not None and resume is not None and resume > hold:
            raise ValueError(f"crop_resume_rtt_ms ({resume}) must not be above crop_hold_rtt_ms ({hold})")
        return self


class LocalApiConfig(BaseModel):
    """The local HTTP API (POST /v1/detect, /v1/status, /v1/events, /metrics)."""

    enabled: bool = Field(default=True, description="Serve the local API.")
    host: str = Field(
        default="127.0.0.1", description="Address to listen on (0.0.0.0 exposes it on the LAN)."
    )
    port: int = Field(default=8080, ge=1, le=65535, description="Port to listen on.")
    workers: int = Field(default=1, ge=1, le=64, description="Inference workers for API requests.")
    queue_size: int = Field(default=8, ge=0, le=1024, description="Requests that may wait before a 503.")
    max_upload_bytes: int = Field(default=20_000_000, ge=1_000, description="Largest accepted upload.")


OtaHoldState = Literal["downloading", "verifying", "staging", "activating"]


class OtaConfig(BaseModel):
    """Over-the-air model updates: where models live, whom to trust, and how a new model is judged."""

    enabled: bool = Field(
        default=True, description="Follow model/desired (false: keep the configured model)."
    )
    models_dir: Path | None = Field(
        default=None, description="Model files and the OTA record; default: <data_dir>/models."
    )
    trust_store: Path | None = Field(
        default=None,
        description="Folder of the registry's Ed25519 public keys (*.pub, *.pem); default: <data_dir>/trust.",
    )
    allow_unsigned: bool = Field(
        default=False, description="Accept models without a signature. Development only: never in a fleet."
    )
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token for the artifact server; prefer the environment or token_file.",
    )
    token_file: Path | None = Field(
        default=None, description="File holding the bearer token (read on every download; mode 0600)."
    )
    tls_ca: Path | None = Field(default=None, description="CA bundle for https URLs (default: the system's).")
    download_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Connect and read timeout of one download attempt."
    )
    retry_min_s: float = Field(
        default=1.0, gt=0, le=3600, description="First delay before retrying a download."
    )
    retry_max_s: float = Field(default=60.0, gt=0, le=86_400, description="Longest delay between retries.")
    give_up_after_s: float = Field(
        default=6 * 3600, gt=0, description="Report failed when a download has not succeeded for this long."
    )
    latency_budget_ms: float = Field(
        default=1000.0,
        gt=0,
        le=3_600_000,
        description="Per-frame latency (pre + infer + post) a model must keep: the smoke inference must be "
        "within it; in probation the p95 must stay within it x rollback_factor. Set it for the device.",
    )
    smoke_runs: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Timed smoke inferences when staging; the fastest must be within latency_budget_ms.",
    )
    probation_s: float = Field(
        default=60.0, ge=0, le=86_400, description="Seconds a new model is watched before it is committed."
    )
    probation_frames: int = Field(
        default=20, ge=0, le=1_000_000, description="Frames a new model must infer before it is committed."
    )
    rollback_factor: float = Field(
        default=1.5, ge=1.0, le=100, description="Roll back when the probation p95 exceeds budget x this."
    )
    probation_max_errors: int = Field(
        default=0, ge=0, description="Inference errors tolerated in probation; one more rolls back."
    )
    max_restarts: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Agent crashes tolerated while one update is under way (a model that crashes the agent "
        "must not crash it forever); one more fails the update, or rolls it back in probation.",
    )
    test_hold_s: dict[OtaHoldState, float] = Field(
        default_factory=dict,
        description="Fault-injection aid for tests: stay this many seconds in a state after persisting and "
        "reporting it, e.g. {verifying: 30}. Never set this on a device.",
    )

    @model_validator(mode="after")
    def _retry_in_order(self) -> OtaConfig:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be at least retry_min_s")
        return self


AzureAuth = Literal["edge", "connection_string", "symmetric_key", "x509"]


class AzureConfig(BaseModel):
    """Azure IoT Hub / IoT Edge, used with `transport: azure` (needs `pip install 'edgefleet[azure]'`).

    Secrets never go in a file: the connection string and the shared access key come from the environment
    (EDGEFLEET_AGENT_AZURE__CONNECTION_STRING, EDGEFLEET_AGENT_AZURE__SHARED_ACCESS_KEY); in an IoT Edge
    module (auth: edge) the edge runtime provides the identity and nothing is configured.
    """

    auth: AzureAuth = Field(
        default="edge",
        description="edge: the IoT Edge module identity the edge runtime provides (IOTEDGE_* variables; for "
        "local development EdgeHubConnectionString + EdgeModuleCACertificateFile); connection_string: a "
        "device or module connection string; symmetric_key: hostname + device id + shared access key; "
        "x509: hostname + device id (+ module id) + client certificate.",
    )
    connection_string: SecretStr | None = Field(
        default=None,
        description="Device or module connection string (auth: connection_string); set it with "
        "EDGEFLEET_AGENT_AZURE__CONNECTION_STRING, never in the file.",
    )
    hostname: str | None = Field(
        default=None, description="IoT Hub host name, e.g. my-hub.azure-devices.net (symmetric_key, x509)."
    )
    device_id: str | None = Field(
        default=None,
        description="The IoT Hub device identity (symmetric_key, x509); default: the agent's device_id.",
    )
    module_id: str | None = Field(
        default=None,
        description="A module identity of that device (x509 only; module connection strings name their own).",
    )
    shared_access_key: SecretStr | None = Field(
        default=None,
        description="The device's shared access key (auth: symmetric_key); set it with "
        "EDGEFLEET_AGENT_AZURE__SHARED_ACCESS_KEY, never in the file.",
    )
    x509_cert: Path | None = Field(default=None, description="Client certificate (chain) file (auth: x509).")
    x509_key: Path | None = Field(default=None, description="Its private key file (auth: x509).")
    x509_pass_phrase: SecretStr | None = Field(
        default=None, description="Pass phrase of the private key, if it has one; prefer the environment."
    )
    gateway_hostname: str | None = Field(
        default=None,
        description="Connect through this IoT Edge gateway instead of the hub (a downstream device; "
        "symmetric_key, x509). Connection strings carry it as GatewayHostName.",
    )
    server_ca: Path | None = Field(
        default=None,
        description="CA certificate to trust for the hub's or gateway's TLS certificate (e.g. an IoT Edge "
        "gateway's root CA); default: the system's CAs. auth: edge gets it from the edge runtime.",
    )
    websockets: bool = Field(
        default=False, description="MQTT over WebSockets on port 443 instead of MQTT on 8883 (firewalls)."
    )
    keepalive_s: int = Field(
        default=60, ge=5, le=1740, description="MQTT keepalive with the hub (IoT Hub allows at most 1740 s)."
    )
    retry_interval_s: int = Field(
        default=10,
        ge=1,
        le=3600,
        description="Seconds between reconnect attempts after the link to the hub drops.",
    )
    sastoken_ttl_s: int = Field(
        default=3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the SAS tokens made from a key (renewed before they expire).",
    )

    @model_validator(mode="after")
    def _auth_has_what_it_needs(self) -> AzureConfig:
        needs: dict[str, list[str]] = {
            "edge": [],
            "connection_string": ["connection_string"],
            "symmetric_key": ["hostname", "shared_access_key"],
            "x509": ["hostname", "x509_cert", "x509_key"],
        }
        missing = [name for name in needs[self.auth] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"azure.auth {self.auth!r} needs azure.{', azure.'.join(missing)}")
        if self.module_id is not None and self.auth != "x509":
            raise ValueError("azure.module_id is for auth 'x509'; a module connection string has ModuleId")
        return self


class AgentSettings(YamlFileSettings):
    """Settings of one device agent."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_")

    device_id: str = Field(
        description="This device's id: letters, digits, '-', '_', '.'; unique in the fleet. An IoT Edge "
        "module (transport: azure) without one takes the edge device's id (IOTEDGE_DEVICEID)."
    )
    data_dir: Path = Field(
        default=Path("edgefleet-data"), description="Outbox, models and OTA state live here."
    )
    transport: Literal["mqtt", "azure"] = Field(
        default="mqtt",
        description="mqtt: the edgefleet MQTT contract through `broker`; azure: Azure IoT Hub / IoT Edge "
        "through `azure` (detections as device-to-cloud messages, the desired model from the twin's desired "
        "properties, OTA state and status as reported properties; needs `pip install 'edgefleet[azure]'`).",
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The MQTT broker.")
    azure: AzureConfig = Field(
        default_factory=AzureConfig, description="Azure IoT Hub / IoT Edge (with transport: azure)."
    )
    model: ModelConfig = Field(description="The detector model.")
    sources: list[SourceConfig] = Field(min_length=1, max_length=16, description="Cameras, streams, files.")
    publish: PublishPolicyConfig = Field(
        default_factory=PublishPolicyConfig, description="Which frames publish."
    )
    crops: CropPolicyConfig = Field(
        default_factory=CropPolicyConfig, description="Which detections are cropped."
    )
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="The durable outbox.")
    link: LinkConfig = Field(default_factory=LinkConfig, description="Link measurement.")
    api: LocalApiConfig = Field(default_factory=LocalApiConfig, description="The local HTTP API.")
    ota: OtaConfig = Field(default_factory=OtaConfig, description="Over-the-air model updates.")
    telemetry_interval_s: float = Field(
        default=10.0, ge=0.5, le=3600, description="Seconds between telemetry."
    )
    recent_events: int = Field(default=200, ge=1, le=100_000, description="Events kept for GET /v1/events.")
    produced_log: Path | None = Field(
        default=None,
        description="Append the msg_id of every message committed to the outbox to this file (an audit trail "
        "to compare with what consumers received).",
    )

    @model_validator(mode="before")
    @classmethod
    def _edge_device_id(cls, data: Any) -> Any:
        """As an IoT Edge module (transport: azure) the device id defaults to the edge device's own."""
        edge_device = os.environ.get("IOTEDGE_DEVICEID")
        as_edge_module = isinstance(data, dict) and data.get("transport") == "azure" and edge_device
        if as_edge_module and "device_id" not in data:
            return {**data, "device_id": edge_device}
        return data

    @field_validator("device_id")
    @classmethod
    def _valid_device_id(cls, value: str) -> str:
        return validate_device_id(value)

    @field_validator("sources")
    @classmethod
    def _unique_source_ids(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        ids = [s.id for s in sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"source ids must be unique, got {ids}")
        return sources

    @property
    def outbox_path(self) -> Path:
        return self.outbox.path or self.data_dir / "outbox.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.ota.models_dir or self.data_dir / "models"

    @property
    def trust_store(self) -> Path:
        return self.ota.trust_store or self.data_dir / "trust"


def load_settings(path: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from `path` (YAML), the environment and `overrides`; ConfigError names each bad field."""
    return load_yaml_settings(AgentSettings, path, overrides, component="agent")
