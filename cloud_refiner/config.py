"""Everything a cloud refiner can be told, in one settings class.

Values come from (highest first) keyword arguments, `EDGEFLEET_REFINER_*` environment variables (nested with
`__`, e.g. `EDGEFLEET_REFINER_BROKER__PASSWORD`), then the YAML file given to `edgefleet refiner serve
--config`. Environment values merge into the file's sections, so secrets can stay out of the file.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from fleet_protocol.payloads import MAX_CROP_BYTES
from fleet_protocol.settings import ConfigError as ConfigError
from fleet_protocol.settings import YamlFileSettings, load_yaml_settings
from fleet_protocol.topics import DEFAULT_ROOT, DEFAULT_SHARE_GROUP

DEFAULT_MODEL = Path("../shared/models/efficientnet-lite2.onnx")
_SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def default_instance_id() -> str:
    """The host name (the pod name under Kubernetes), made safe for a client id and a run name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_") or "refiner"
    return name[:64]


class BrokerConfig(BaseModel):
    """The MQTT broker the refiner consumes crops from and answers on."""

    enabled: bool = Field(default=True, description="Consume crops over MQTT (false: HTTP API only).")
    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    username: str | None = Field(default=None, description="Broker account of the refiners.")
    password: SecretStr | None = Field(default=None, description="Broker password; prefer the environment.")
    tls_ca: Path | None = Field(default=None, description="CA certificate file; setting it turns TLS on.")
    tls_cert: Path | None = Field(default=None, description="Client certificate for mutual TLS.")
    tls_key: Path | None = Field(default=None, description="Client private key for mutual TLS.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    session_expiry_s: int = Field(
        default=3600,
        ge=0,
        description="How long the broker keeps this replica's session (and the crops routed to it) while "
        "it is away; a restarted replica with the same instance_id receives them.",
    )
    topic_root: str = Field(default=DEFAULT_ROOT, description="Root of the topic tree.")
    share_group: str = Field(
        default=DEFAULT_SHARE_GROUP,
        pattern=_SAFE_ID,
        description="Shared-subscription group: replicas in one group split the crops between them.",
    )
    client_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="MQTT client id; default `refiner-<instance_id>`. It names the persistent session.",
    )
    receive_maximum: int = Field(
        default=32,
        ge=1,
        le=65535,
        description="Crops the broker may send before this replica acknowledges them (MQTT 5 Receive "
        "Maximum). A crop is acknowledged once its answer reached the broker.",
    )


class PreprocessConfig(BaseModel):
    """How a crop becomes the classifier's input: resize, center-crop, normalise. Pixel values are 0-255."""

    resize_shorter: int = Field(ge=1, le=8192, description="Resize so the shorter side has this length.")
    crop: tuple[int, int] = Field(description="Center-crop to [height, width] after resizing.")
    mean: tuple[float, float, float] = Field(
        description="Subtracted per channel, in the model's channel order, pixel units (e.g. 127 or "
        "123.675, 116.28, 103.53)."
    )
    std: tuple[float, float, float] = Field(
        description="Divided per channel after the mean, pixel units (e.g. 128 or 58.395, 57.12, 57.375)."
    )
    channel_order: Literal["RGB", "BGR"] = Field(default="RGB", description="Channel order the model wants.")
    interpolation: Literal["bilinear", "bicubic", "area"] = Field(
        default="bilinear", description="Resampling used for the resize."
    )

    @field_validator("std")
    @classmethod
    def _nonzero(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(value <= 0 for value in std):
            raise ValueError(f"std values must be positive, got {list(std)}")
        return std

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessConfig:
        if min(self.crop) < 1 or max(self.crop) > 8192:
            raise ValueError(f"crop must be [height, width] between 1 and 8192, got {list(self.crop)}")
        return self


class ClassifierConfig(BaseModel):
    """The ImageNet-style classifier that refines the edge labels."""

    path: Path = Field(default=DEFAULT_MODEL, description="ONNX classifier: input [batch, 3, H, W].")
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=128,
        description="Model name in replies and MLflow; default: the file name without `.onnx`.",
    )
    version: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        max_length=64,
        description="Model version in replies and MLflow; default: the first 12 hex digits of its sha256.",
    )
    labels_file: Path | None = Field(
        default=None,
        description="Class names when the model has no `names` metadata: one per line, ImageNet synset "
        "lines (`n01440764 tench, Tinca tinca`) allowed; overrides the metadata when set.",
    )
    preprocess: PreprocessConfig | None = Field(
        default=None,
        description="Preprocessing; default: read from the model's metadata (a `preprocess` JSON entry, or "
        "the reference recipe in its `input` entry). Models without it need this section.",
    )
    output: Literal["auto", "logits", "probabilities"] = Field(
        default="auto",
        description="What the model outputs; auto: probabilities if rows are non-negative and sum to 1.",
    )
    providers: list[str] | None = Field(
        default=None, description="Execution providers, e.g. [cuda, cpu]; default: best available."
    )
    threads: int = Field(
        default=0, ge=0, le=256, description="onnxruntime intra-op threads (0: its default)."
    )
    top_k: int = Field(default=5, ge=1, le=20, description="Unconditioned best labels sent in each reply.")


class ConditioningConfig(BaseModel):
    """Class-conditioned refinement: restrict the classifier to the ImageNet classes of the edge label."""

    enabled: bool = Field(
        default=True, description="Restrict the softmax to the edge label's subset when it has one."
    )
    mapping_file: Path | None = Field(
        default=None,
        description="JSON mapping of edge labels to ImageNet class indices; default: the packaged "
        "`cloud_refiner/data/coco_to_imagenet.json`.",
    )


class BatchingConfig(BaseModel):
    """The micro-batcher between intake (MQTT, HTTP) and the classifier."""

    max_batch: int = Field(default=16, ge=1, le=1024, description="Most crops per classifier call.")
    max_wait_ms: float = Field(
        default=10.0,
        ge=0.0,
        le=10_000.0,
        description="How long the first crop of a batch waits for company before the batch runs anyway.",
    )
    queue_size: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Crops waiting for the classifier at most; must hold broker.receive_maximum + "
        "api.max_pending.",
    )


class LimitsConfig(BaseModel):
    """What a crop may be; anything else is dropped (MQTT, counted) or refused (HTTP)."""

    max_crop_bytes: int = Field(
        default=MAX_CROP_BYTES, ge=1024, le=256 * 1024 * 1024, description="Largest accepted crop, bytes."
    )
    max_side: int = Field(default=4096, ge=16, le=65535, description="Longest accepted crop side, pixels.")
    max_pixels: int = Field(
        default=16_000_000, ge=256, description="Most pixels (width x height) a crop may have."
    )
    recent_ids: int = Field(
        default=100_000,
        ge=16,
        le=10_000_000,
        description="det_ids remembered to answer each crop once (a resent crop is acked, not re-answered).",
    )


class ApiConfig(BaseModel):
    """The HTTP API: POST /v1/refine, /healthz, /readyz, /metrics."""

    enabled: bool = Field(default=True, description="Serve the HTTP API.")
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 in a container).")
    port: int = Field(default=8090, ge=1, le=65535, description="Port to listen on.")
    max_upload_bytes: int = Field(
        default=20_000_000, ge=1024, description="Largest accepted request body (all images), bytes."
    )
    max_images: int = Field(
        default=32, ge=1, le=1024, description="Most images in one request (and never more than max_pending)."
    )
    max_pending: int = Field(
        default=32,
        ge=1,
        le=100_000,
        description="HTTP crops that may wait for the classifier at once; more get 503 + Retry-After.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Seconds a client is told to wait after a 503.")


class TrackingConfig(BaseModel):
    """MLflow logging, batched on a background thread: one run per refiner instance."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (e.g. sqlite:///mlflow.db or http://mlflow:5000); unset: "
        "MLFLOW_TRACKING_URI if set, else no MLflow logging.",
    )
    experiment: str = Field(default="edgefleet-refiner", description="MLflow experiment of the runs.")
    artifact_location: str | None = Field(
        default=None, description="Artifact location when the experiment is created (URI or folder)."
    )
    flush_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="Seconds between metric flushes to MLflow."
    )
    sample_every: int = Field(
        default=50, ge=1, description="Keep every n-th refined crop (with its labels) as a sample artifact."
    )
    max_samples: int = Field(default=100, ge=0, description="Sample crops logged per run at most.")
    queue_size: int = Field(
        default=10_000, ge=10, description="Events buffered for the logger; beyond it they are counted."
    )


class RefinerSettings(YamlFileSettings):
    """Settings of one cloud refiner replica."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_REFINER_")

    instance_id: str = Field(
        default_factory=default_instance_id,
        pattern=_SAFE_ID,
        description="Names this replica (MQTT client id `refiner-<id>`, MLflow run); stable across restarts "
        "so a restarted replica resumes its session. Default: the host name.",
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The MQTT broker.")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="The classifier.")
    conditioning: ConditioningConfig = Field(
        default_factory=ConditioningConfig, description="Class-conditioned refinement."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="The micro-batcher.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Crop limits and dedupe.")
    api: ApiConfig = Field(default_factory=ApiConfig, description="The HTTP API.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow logging.")
    drain_timeout_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="On SIGTERM: seconds to keep answering crops already received after unsubscribing.",
    )

    @model_validator(mode="after")
    def _queue_holds_everything_admitted(self) -> RefinerSettings:
        needed = (self.broker.receive_maximum if self.broker.enabled else 0) + (
            self.api.max_pending if self.api.enabled else 0
        )
        if self.batching.queue_size < needed:
            raise ValueError(
                f"batching.queue_size ({self.batching.queue_size}) must be at least broker.receive_maximum + "
                f"api.max_pending ({needed}): raise it or lower those"
            )
        return self

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"refiner-{self.instance_id}"


def load_settings(path: Path | None = None, **overrides: Any) -> RefinerSettings:
    """Settings from `path` (YAML), the environment and `overrides`; ConfigError names each bad field."""
    return load_yaml_settings(RefinerSettings, path, overrides, component="refiner")
