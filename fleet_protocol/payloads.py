"""The JSON payloads of the MQTT contract v1: pydantic models, `encode`, `decode` and JSON Schema export.

Every payload carries the envelope `schema`, `msg_id`, `device_id` and `ts`. Producers build a model (msg_id
and ts default to a fresh ULID and now) and `encode` it once: the bytes go to the outbox, so a retry carries
the same msg_id. Receivers `decode` with the model class they expect and get one error type, PayloadError.

Unknown fields: constructing a model forbids them (a misspelt optional field in our own code fails loudly),
while `decode` ignores them (a tolerant reader: in a fleet that upgrades gradually, a newer producer may add
optional fields without bumping the schema; a breaking change bumps ``/1`` to ``/2``). Decoding is strict
about types: ``"3"`` is not a class id, ``true`` is not a confidence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.config import JsonDict

from fleet_protocol.errors import PayloadError
from fleet_protocol.ids import ULID_LENGTH, ULID_PATTERN, new_msg_id
from fleet_protocol.topics import DEVICE_ID_PATTERN, TopicKind

MAX_PAYLOAD_BYTES = 256 * 1024
MAX_CROP_BYTES = 2 * 1024 * 1024
MAX_DETECTIONS = 300  # YOLOv8's default max_det; the worst case still encodes under MAX_PAYLOAD_BYTES
CROP_CONTENT_TYPE = "image/jpeg"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_MAX_COUNT = 2**63 - 1  # fits SQLite and PostgreSQL BIGINT
_MAX_MS = 3_600_000.0  # one hour: any stage or link slower than that is a bug, not a measurement
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"  # no control characters (labels also travel as MQTT user properties)
_SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_KEY = r"^[a-z][a-z0-9_]*$"

MsgId = Annotated[str, Field(min_length=ULID_LENGTH, max_length=ULID_LENGTH, pattern=ULID_PATTERN)]
DeviceId = Annotated[str, Field(min_length=1, max_length=64, pattern=DEVICE_ID_PATTERN)]
SafeId = Annotated[str, Field(min_length=1, max_length=64, pattern=_SAFE_NAME)]
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=_SAFE_NAME)]
Version = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]
Label = Annotated[str, Field(min_length=1, max_length=128, pattern=_PRINTABLE)]
Key = Annotated[str, Field(min_length=1, max_length=32, pattern=_KEY)]
Millis = Annotated[float, Field(ge=0.0, le=_MAX_MS)]
Score = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0, le=_MAX_COUNT)]
Pixel = Annotated[float, Field(ge=0.0, le=65535.0)]
BBox = tuple[Pixel, Pixel, Pixel, Pixel]
HardwareValue = Annotated[str, Field(max_length=256)] | int | float | bool


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _wire_json_schema(schema: JsonDict, cls: type[Any]) -> None:
    """What receivers accept: unknown fields are allowed, and the envelope fields are required."""
    schema.pop("additionalProperties", None)
    if issubclass(cls, Envelope):
        required = schema.get("required")
        listed = required if isinstance(required, list) else []
        schema["required"] = [*(key for key in _WIRE_REQUIRED.values() if key not in listed), *listed]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        serialize_by_alias=True,
        validate_by_alias=True,
        validate_by_name=True,
        json_schema_extra=_wire_json_schema,
    )


class ModelRef(_Model):
    """A model by name and version (as the registry names it)."""

    name: ModelName = Field(description="Model name, e.g. 'yolov8n'.")
    version: Version = Field(description="Model version, e.g. '3' or '1.2.0'.")


class Envelope(_Model):
    """The fields every payload carries."""

    schema_name: str = Field(alias="schema", description="Payload schema and major version.")
    msg_id: MsgId = Field(
        default_factory=new_msg_id,
        description="ULID, unique and sortable; the same on every retry, receivers dedupe on it.",
    )
    device_id: DeviceId = Field(description="The device the message is from or about.")
    ts: AwareDatetime = Field(
        default_factory=utc_now, description="When the message was made, RFC 3339, UTC on the wire."
    )

    @field_validator("ts")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(timezone.utc)


# Envelope fields a payload on the wire must carry (python name -> JSON key); defaults are for producers only.
_WIRE_REQUIRED = {"schema_name": "schema", "msg_id": "msg_id", "device_id": "device_id", "ts": "ts"}


class DeviceState(str, Enum):
    """What `status` says about the device agent."""

    ONLINE = "online"
    STOPPING = "stopping"
    OFFLINE = "offline"


class StatusPayload(Envelope):
    """`status` (retained): the device's state; the broker publishes the `offline` one as the will."""

    schema_name: Literal["edgefleet.status/1"] = Field(
        default="edgefleet.status/1", alias="schema", description="Payload schema and major version."
    )
    state: DeviceState = Field(description="online, stopping (clean shutdown) or offline (last will).")
    agent_version: Version = Field(description="Version of the device agent software.")
    active_model: ModelRef | None = Field(default=None, description="The model serving now, if any.")
    providers: list[Annotated[str, Field(min_length=1, max_length=64, pattern=_SAFE_NAME)]] = Field(
        default_factory=list,
        max_length=16,
        description="onnxruntime execution providers in use, preferred first.",
    )
    hardware: dict[Key, HardwareValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Hardware facts, e.g. {'machine': 'aarch64', 'cpu_count': 6, 'gpu': 'Orin'}.",
    )


class StageLatency(_Model):
    """Latency percentiles of one stage over the telemetry interval."""

    p50: Millis = Field(description="Median latency, ms.")
    p95: Millis = Field(description="95th percentile latency, ms.")


class OutboxStats(_Model):
    """The durable outbox: what waits, and what was dropped to stay within its bounds."""

    depth: Count = Field(description="Messages waiting for a broker acknowledgement.")
    bytes: Count = Field(description="Bytes the waiting messages take.")
    dropped: dict[Key, Count] = Field(
        default_factory=dict,
        max_length=16,
        description="Messages dropped since the agent started, by kind ('crops', 'detections').",
    )
    crops_waiting: Count = Field(default=0, description="Crops among the waiting messages.")
    crops_held: bool = Field(
        default=False,
        description="Crops are held back (they wait in the outbox) because the link is down or slow.",
    )


class TelemetryPayload(Envelope):
    """`telemetry` (QoS 0, every N s): throughput, latency and health; counters are since agent start."""

    schema_name: Literal["edgefleet.telemetry/1"] = Field(
        default="edgefleet.telemetry/1", alias="schema", description="Payload schema and major version."
    )
    interval_s: float = Field(gt=0.0, le=86_400.0, description="Seconds this report covers.")
    fps: float = Field(ge=0.0, le=10_000.0, description="Frames processed per second over the interval.")
    latency_ms: dict[Key, StageLatency] = Field(
        default_factory=dict, max_length=16, description="Latency per stage: 'pre', 'infer', 'post', 'total'"
    )
    outbox: OutboxStats = Field(description="Outbox depth, size and drop counts.")
    cpu_percent: float = Field(ge=0.0, le=100.0, description="System-wide CPU use, percent.")
    memory_mb: float = Field(ge=0.0, le=1_048_576.0, description="Resident memory of the agent process, MiB.")
    temperature_c: float | None = Field(
        default=None, ge=-60.0, le=200.0, description="Hottest sensor, degrees Celsius, if readable."
    )
    link_rtt_ms: Millis | None = Field(default=None, description="Round trip to the broker, ms, if measured.")
    frames_dropped: Count = Field(default=0, description="Frames skipped since the agent started.")


class StageTimingMs(_Model):
    """Milliseconds one frame spent in each stage."""

    pre: Millis = Field(description="Preprocessing (decode, letterbox, normalise), ms.")
    infer: Millis = Field(description="onnxruntime inference, ms.")
    post: Millis = Field(description="Postprocessing (decode boxes, NMS), ms.")


class DetectionItem(_Model):
    """One detected object."""

    det_id: MsgId = Field(description="ULID of this detection; a crop's correlation data and refined's key.")
    class_id: int = Field(ge=0, le=65_535, description="Class index in the model's label list.")
    label: Label = Field(description="Class name, e.g. 'dog'.")
    confidence: Score = Field(description="Detection confidence, 0..1.")
    bbox: BBox = Field(description="[x1, y1, x2, y2] in source-image pixels, x1 <= x2, y1 <= y2.")
    track_id: Count | None = Field(default=None, description="Tracker id, stable across frames, if tracked.")

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return _check_bbox(bbox)


def _check_bbox(bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = bbox
    if x1 > x2 or y1 > y2:
        raise ValueError(f"bbox must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {list(bbox)}")
    return bbox


class DetectionEvent(Envelope):
    """`detections`: one event per published frame."""

    schema_name: Literal["edgefleet.detection/1"] = Field(
        default="edgefleet.detection/1", alias="schema", description="Payload schema and major version."
    )
    source: Label = Field(description="Camera or input name (never a URL with credentials).")
    frame_seq: Count = Field(description="Frame number within the source, increasing.")
    model: ModelRef = Field(description="The model that produced the detections.")
    width: int = Field(ge=1, le=65_535, description="Source image width, pixels.")
    height: int = Field(ge=1, le=65_535, description="Source image height, pixels.")
    timing_ms: StageTimingMs = Field(description="Time spent per stage on this frame.")
    detections: list[DetectionItem] = Field(
        default_factory=list, max_length=MAX_DETECTIONS, description="What was detected (may be empty)."
    )

    @field_validator("detections")
    @classmethod
    def _inside_image(cls, detections: list[DetectionItem], info: ValidationInfo) -> list[DetectionItem]:
        width, height = info.data.get("width"), info.data.get("height")
        if width is None or height is None:
            return detections  # already reported as invalid
        for index, item in enumerate(detections):
            if item.bbox[2] > width or item.bbox[3] > height:
                raise ValueError(
                    f"detections.{index}.bbox {list(item.bbox)} lies outside the {width}x{height} image: "
                    "boxes are in source-image pixels"
                )
        return detections


class CropMeta(Envelope):
    """`crops`: the metadata of a JPEG crop; it travels as MQTT 5 user properties beside the JPEG bytes."""

    schema_name: Literal["edgefleet.crop/1"] = Field(
        default="edgefleet.crop/1", alias="schema", description="Payload schema and major version."
    )
    det_id: MsgId = Field(description="The detection this crop shows (also the correlation data).")
    label: Label = Field(description="The edge model's label.")
    class_id: int = Field(ge=0, le=65_535, description="The edge model's class index.")
    confidence: Score = Field(description="The edge model's confidence, 0..1.")
    bbox: BBox = Field(description="[x1, y1, x2, y2] of the crop in source-image pixels.")
    model: ModelRef = Field(description="The edge model that made the detection.")

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return _check_bbox(bbox)

    def to_user_properties(self) -> list[tuple[str, str]]:
        """MQTT 5 user properties: string fields as they are, the others (numbers, bbox, model) as JSON."""
        fields = self.model_dump(mode="json")
        return [
            (key, value if isinstance(value, str) else json.dumps(value, separators=(",", ":")))
            for key, value in fields.items()
        ]

    @classmethod
    def from_user_properties(cls, properties: Iterable[tuple[str, str]]) -> CropMeta:
        """Rebuild from MQTT 5 user properties; unknown keys are ignored, a repeated known key is an error."""
        schema = _schema_of(cls)
        known = {field.alias or name for name, field in cls.model_fields.items()}
        values: dict[str, Any] = {}
        for key, text in properties:
            if key not in known:
                continue
            if key in values:
                message = f"{schema}: user property {key!r} appears twice"
                raise PayloadError(message, schema=schema, fields=(key,))
            values[key] = text if key in _CROP_TEXT_PROPERTIES else _json_property(schema, key, text)
        return _validate(cls, json.dumps(values))


_CROP_TEXT_PROPERTIES = frozenset({"schema", "msg_id", "device_id", "ts", "det_id", "label"})


def _json_property(schema: str, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise PayloadError(
            f"{schema}: user property {key!r} is not JSON: {text[:80]!r}", schema=schema, fields=(key,)
        ) from None


class LabelScore(_Model):
    """One of the refiner's top-k labels."""

    label: Label = Field(description="A refined label, e.g. 'golden retriever'.")
    score: Score = Field(description="The classifier's probability for it, 0..1.")


class RefinedPayload(Envelope):
    """`refined` (to the device): a finer label for one detection, from the cloud refiner."""

    schema_name: Literal["edgefleet.refined/1"] = Field(
        default="edgefleet.refined/1", alias="schema", description="Payload schema and major version."
    )
    det_id: MsgId = Field(description="The detection refined (the crop's correlation data).")
    edge_label: Label = Field(description="The label the edge model gave.")
    refined_label: Label = Field(description="The refiner's best label.")
    score: Score = Field(description="The refiner's probability for refined_label, 0..1.")
    top_k: list[LabelScore] = Field(
        default_factory=list, max_length=20, description="Best labels with scores, highest first."
    )
    refiner_model: ModelRef = Field(description="The classifier that refined the label.")
    latency_ms: Millis = Field(description="From crop received to refined published, ms.")


class ModelDesired(Envelope):
    """`model/desired` (retained, to the device): the model a rollout wants; an empty payload clears it."""

    schema_name: Literal["edgefleet.model_desired/1"] = Field(
        default="edgefleet.model_desired/1", alias="schema", description="Payload schema and major version."
    )
    rollout_id: SafeId = Field(description="The rollout asking for this model.")
    name: ModelName = Field(description="Model name.")
    version: Version = Field(description="Model version.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the .onnx file, lower-case hex.")
    size: int = Field(ge=1, le=2**40, description="Size of the .onnx file, bytes.")
    url: str = Field(
        max_length=2048, pattern=r"^https?://[^\s]+$", description="Where to download the file (HTTP Range)."
    )
    signature: (
        Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9+/_-]+={0,2}$")] | None
    ) = Field(
        default=None,
        description="Ed25519 signature over the canonical manifest {name, version, sha256, size}, base64; "
        "devices refuse an unsigned model unless configured to allow them (development only).",
    )
    variant: Annotated[str, Field(max_length=32, pattern=r"^[a-z0-9][a-z0-9._-]*$")] | None = Field(
        default=None, description="Build variant, e.g. 'int8' or 'fp16'."
    )

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)


class OtaState(str, Enum):
    """The device-side OTA state machine."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class ModelReported(Envelope):
    """`model/reported` (retained): where the device is in the OTA state machine."""

    schema_name: Literal["edgefleet.model_reported/1"] = Field(
        default="edgefleet.model_reported/1", alias="schema", description="Payload schema and major version."
    )
    rollout_id: SafeId | None = Field(default=None, description="The rollout being applied, if any.")
    model: ModelRef | None = Field(default=None, description="The model this state is about.")
    state: OtaState = Field(description="OTA state.")
    progress: Score = Field(default=0.0, description="Progress of the current step, 0..1.")
    error: str | None = Field(default=None, max_length=2048, description="Why it failed or rolled back.")
    previous_model: ModelRef | None = Field(default=None, description="The model active before this one.")


PAYLOAD_MODELS: tuple[type[Envelope], ...] = (
    StatusPayload,
    TelemetryPayload,
    DetectionEvent,
    CropMeta,
    RefinedPayload,
    ModelDesired,
    ModelReported,
)
# What arrives on each device topic (crops: the metadata in the user properties; cmd: not JSON-typed yet).
PAYLOAD_MODEL_OF_TOPIC: Mapping[TopicKind, type[Envelope]] = MappingProxyType(
    {
        TopicKind.STATUS: StatusPayload,
        TopicKind.TELEMETRY: TelemetryPayload,
        TopicKind.DETECTIONS: DetectionEvent,
        TopicKind.CROPS: CropMeta,
        TopicKind.REFINED: RefinedPayload,
        TopicKind.MODEL_DESIRED: ModelDesired,
        TopicKind.MODEL_REPORTED: ModelReported,
    }
)

P = TypeVar("P", bound=Envelope)


def _schema_of(model_cls: type[Envelope]) -> str:
    default = model_cls.model_fields["schema_name"].default
    if not isinstance(default, str):
        raise TypeError(f"{model_cls.__name__} is not a payload model of the contract")
    return default


PAYLOAD_MODEL_OF_SCHEMA: Mapping[str, type[Envelope]] = MappingProxyType(
    {_schema_of(model): model for model in PAYLOAD_MODELS}
)


def schema_of(model_cls: type[Envelope]) -> str:
    """The schema string of a payload model, e.g. ``edgefleet.detection/1``."""
    return _schema_of(model_cls)


def encode(payload: Envelope) -> bytes:
    """Compact UTF-8 JSON of `payload`; PayloadError if it exceeds MAX_PAYLOAD_BYTES."""
    data = payload.model_dump_json().encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES:
        schema = payload.schema_name
        raise PayloadError(
            f"{schema}: encoded payload is {len(data)} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap: "
            "send fewer detections or shorter fields",
            schema=schema,
        )
    return data


def decode(model_cls: type[P], data: bytes | str) -> P:
    """Validate a received payload as `model_cls`; PayloadError names the schema and the offending fields."""
    schema = _schema_of(model_cls)
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"{schema}: payload is {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap", schema=schema
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PayloadError(
            f"{schema}: payload is not UTF-8 (bad byte at offset {error.start}): send UTF-8 JSON",
            schema=schema,
        ) from None
    return _validate(model_cls, text)


def decode_model_desired(data: bytes | str) -> ModelDesired | None:
    """`model/desired` payload, or None for the empty retained payload that clears the desired model."""
    return None if len(data) == 0 else decode(ModelDesired, data)


def _validate(model_cls: type[P], text: str) -> P:
    schema = _schema_of(model_cls)
    try:
        payload = model_cls.model_validate_json(text, strict=True, extra="ignore")
    except ValidationError as error:
        raise _payload_error(schema, error) from None
    missing = [key for name, key in _WIRE_REQUIRED.items() if name not in payload.model_fields_set]
    if missing:
        raise PayloadError(
            f"{schema}: missing field(s) {', '.join(missing)}: every payload carries the envelope",
            schema=schema,
            fields=tuple(missing),
        )
    return payload


_MAX_LISTED_ERRORS = 8


def _payload_error(schema: str, error: ValidationError) -> PayloadError:
    problems = error.errors(include_url=False)
    wrong_schema = [p for p in problems if p["loc"] == ("schema",) and p["type"] == "literal_error"]
    if wrong_schema:
        return _wrong_schema_error(schema, wrong_schema[0]["input"])
    if problems and problems[0]["type"] == "json_invalid":
        return PayloadError(f"{schema}: payload is not valid JSON: {problems[0]['msg']}", schema=schema)
    fields = tuple(".".join(str(part) for part in p["loc"]) or "(payload)" for p in problems)
    lines = [f"{field}: {_describe(problem)}" for field, problem in zip(fields, problems, strict=True)]
    more = len(lines) - _MAX_LISTED_ERRORS
    listed = "; ".join(lines[:_MAX_LISTED_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    return PayloadError(f"invalid {schema} payload: {listed}", schema=schema, fields=fields)


def _describe(problem: Any) -> str:
    if problem["type"] == "value_error":  # our own validators: the message already shows the value
        return str(problem["ctx"]["error"])
    if problem["type"] == "model_type" and not problem["loc"]:
        return "the payload must be a JSON object"
    value = problem.get("input")
    if problem["type"] == "missing" or not isinstance(value, (str, int, float, bool)):
        return str(problem["msg"])
    return f"{problem['msg']} (got {str(value)[:60]!r})"


def _wrong_schema_error(expected: str, got: Any) -> PayloadError:
    hint = ""
    if isinstance(got, str) and got in PAYLOAD_MODEL_OF_SCHEMA:
        hint = f": decode it as {PAYLOAD_MODEL_OF_SCHEMA[got].__name__}"
    return PayloadError(
        f"schema: expected {expected!r}, got {str(got)[:80]!r}{hint}", schema=expected, fields=("schema",)
    )


def check_crop_jpeg(data: bytes) -> bytes:
    """Return `data` if it looks like a JPEG within MAX_CROP_BYTES, else raise PayloadError."""
    schema = _schema_of(CropMeta)
    if len(data) > MAX_CROP_BYTES:
        raise PayloadError(f"{schema}: crop is {len(data)} bytes, over {MAX_CROP_BYTES}", schema=schema)
    if not data.startswith(b"\xff\xd8\xff"):
        raise PayloadError(f"{schema}: crop is not a JPEG (content type {CROP_CONTENT_TYPE})", schema=schema)
    return data


def json_schema_file_name(model_cls: type[Envelope]) -> str:
    """``edgefleet.detection/1`` -> ``edgefleet.detection.v1.schema.json``."""
    name, _, major = _schema_of(model_cls).partition("/")
    return f"{name}.v{major}.schema.json"


def json_schema(model_cls: type[Envelope]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of what receivers accept for `model_cls`."""
    schema = {"$schema": JSON_SCHEMA_DIALECT, **model_cls.model_json_schema(mode="validation")}
    _constrain_key_patterns(schema)
    return schema


def _constrain_key_patterns(node: Any) -> None:
    """pydantic puts a dict's key pattern in patternProperties only, which lets other keys through; the
    models refuse such keys, so the pattern also goes into propertyNames."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1:
            node.setdefault("propertyNames", {})["pattern"] = next(iter(patterns))
        for child in node.values():
            _constrain_key_patterns(child)
    elif isinstance(node, list):
        for child in node:
            _constrain_key_patterns(child)


def write_json_schemas(out_dir: Path) -> list[Path]:
    """Write one ``<schema-name>.schema.json`` per payload into `out_dir` (created) and return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for model_cls in PAYLOAD_MODELS:
        path = out_dir / json_schema_file_name(model_cls)
        path.write_text(json.dumps(json_schema(model_cls), indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
