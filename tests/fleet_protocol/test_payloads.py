"""Payload models, encode/decode and ids: round-trips, limits, and errors that name the field."""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import pytest
from pydantic import BaseModel, ValidationError
from ulid import ULID

from fleet_protocol.errors import PayloadError
from fleet_protocol.ids import UlidGenerator, is_ulid, new_det_id, new_msg_id
from fleet_protocol.payloads import (
    MAX_DETECTIONS,
    MAX_PAYLOAD_BYTES,
    PAYLOAD_MODEL_OF_SCHEMA,
    PAYLOAD_MODEL_OF_TOPIC,
    PAYLOAD_MODELS,
    CropMeta,
    DetectionEvent,
    DetectionItem,
    DeviceState,
    Envelope,
    LabelScore,
    ModelDesired,
    ModelRef,
    ModelReported,
    OtaState,
    OutboxStats,
    RefinedPayload,
    StageLatency,
    StageTimingMs,
    StatusPayload,
    TelemetryPayload,
    check_crop_jpeg,
    decode,
    decode_model_desired,
    encode,
    schema_of,
)
from fleet_protocol.topics import TopicKind

DEVICE = "cam-01"
YOLO = ModelRef(name="yolov8n_int8", version="3")


def sample_payloads() -> list[Envelope]:
    """One valid payload per model, every optional field filled."""
    det_id = new_det_id()
    return [
        StatusPayload(
            device_id=DEVICE,
            state=DeviceState.ONLINE,
            agent_version="0.1.0",
            active_model=YOLO,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            hardware={"machine": "aarch64", "cpu_count": 6, "gpu": True, "memory_gb": 7.4},
        ),
        TelemetryPayload(
            device_id=DEVICE,
            interval_s=10.0,
            fps=29.7,
            latency_ms={"infer": StageLatency(p50=8.1, p95=11.9), "total": StageLatency(p50=12.0, p95=17.5)},
            outbox=OutboxStats(depth=12, bytes=48_213, dropped={"crops": 3, "detections": 0}),
            cpu_percent=43.5,
            memory_mb=512.25,
            temperature_c=61.0,
            link_rtt_ms=23.4,
            frames_dropped=2,
        ),
        DetectionEvent(
            device_id=DEVICE,
            source="front-door",
            frame_seq=1042,
            model=YOLO,
            width=810,
            height=1080,
            timing_ms=StageTimingMs(pre=2.5, infer=31.0, post=1.25),
            detections=[
                DetectionItem(
                    det_id=det_id,
                    class_id=16,
                    label="dog",
                    confidence=0.91,
                    bbox=(10, 20.5, 300, 400),
                    track_id=7,
                )
            ],
        ),
        CropMeta(
            device_id=DEVICE,
            det_id=det_id,
            label="dog",
            class_id=16,
            confidence=0.91,
            bbox=(10, 20.5, 300, 400),
            model=YOLO,
        ),
        RefinedPayload(
            device_id=DEVICE,
            det_id=det_id,
            edge_label="dog",
            refined_label="golden retriever",
            score=0.83,
            top_k=[
                LabelScore(label="golden retriever", score=0.83),
                LabelScore(label="Labrador retriever", score=0.1),
            ],
            refiner_model=ModelRef(name="efficientnet_b0", version="1"),
            latency_ms=41.5,
        ),
        ModelDesired(
            device_id=DEVICE,
            rollout_id="ro-2024-001",
            name="yolov8n_int8",
            version="4",
            sha256="ab" * 32,
            size=3_400_000,
            url="http://fleet.local:8080/v1/artifacts/yolov8n_int8/4",
            signature="c2lnbmF0dXJl" * 7 + "AA==",
            variant="int8",
        ),
        ModelReported(
            device_id=DEVICE,
            rollout_id="ro-2024-001",
            model=ModelRef(name="yolov8n_int8", version="4"),
            state=OtaState.DOWNLOADING,
            progress=0.4,
            error=None,
            previous_model=YOLO,
        ),
    ]


def test_every_schema_of_the_contract_has_a_model() -> None:
    assert set(PAYLOAD_MODEL_OF_SCHEMA) == {
        "edgefleet.status/1",
        "edgefleet.telemetry/1",
        "edgefleet.detection/1",
        "edgefleet.crop/1",
        "edgefleet.refined/1",
        "edgefleet.model_desired/1",
        "edgefleet.model_reported/1",
    }
    assert {type(p) for p in sample_payloads()} == set(PAYLOAD_MODELS)
    assert set(PAYLOAD_MODEL_OF_TOPIC) == set(TopicKind) - {TopicKind.CMD}


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_round_trip_bytes_and_str(payload: Envelope) -> None:
    data = encode(payload)
    wire = json.loads(data)
    assert data == json.dumps(wire, separators=(",", ":"), ensure_ascii=False).encode()  # compact
    assert wire["schema"] == schema_of(type(payload))
    assert is_ulid(wire["msg_id"])
    assert wire["ts"].endswith("Z")
    assert decode(type(payload), data) == payload
    assert decode(type(payload), data.decode()) == payload


def test_every_field_is_described() -> None:
    nested: list[type[BaseModel]] = [ModelRef, StageLatency, OutboxStats, StageTimingMs, DetectionItem]
    nested.append(LabelScore)
    for model in [*PAYLOAD_MODELS, *nested]:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_timestamps_are_normalised_to_utc() -> None:
    local = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    payload = ModelReported(device_id=DEVICE, state=OtaState.IDLE, ts=local)
    assert payload.ts == local
    assert payload.ts.tzinfo == timezone.utc
    assert json.loads(encode(payload))["ts"] == "2024-05-01T12:30:00Z"
    wire = encode(payload).replace(b"2024-05-01T12:30:00Z", b"2024-05-01T14:30:00+02:00")
    assert decode(ModelReported, wire).ts == local
    with pytest.raises(ValidationError, match="timezone"):
        ModelReported(device_id=DEVICE, state=OtaState.IDLE, ts=datetime(2024, 5, 1))


def test_real_detections_travel_intact(int8_detector: Any, bus_jpg: Path) -> None:
    """A detection event built from the real detector's output on bus.jpg survives encode/decode."""
    result = int8_detector.run(cv2.imread(str(bus_jpg)))
    assert result.detections, "the detector should find objects in bus.jpg"
    event = DetectionEvent(
        device_id=DEVICE,
        source="bus.jpg",
        frame_seq=0,
        model=YOLO,
        width=result.width,
        height=result.height,
        timing_ms=StageTimingMs(
            pre=result.timing.pre_ms, infer=result.timing.infer_ms, post=result.timing.post_ms
        ),
        detections=[
            DetectionItem(
                det_id=new_det_id(), class_id=d.class_id, label=d.label, confidence=d.confidence, bbox=d.bbox
            )
            for d in result.detections
        ],
    )
    decoded = decode(DetectionEvent, encode(event))
    assert [(d.label, d.bbox) for d in decoded.detections] == [(d.label, d.bbox) for d in result.detections]
    assert len({d.det_id for d in decoded.detections}) == len(result.detections)


def test_worst_case_detection_event_fits_the_size_cap() -> None:
    longest = "\U0001f600" * 128  # 4 UTF-8 bytes per character
    item = DetectionItem(
        det_id=new_det_id(),
        class_id=65_535,
        label=longest,
        confidence=0.123456789012345,
        bbox=(0.123456789012345, 1.23456789012345, 65534.99999999999, 65534.99999999999),
        track_id=2**63 - 1,
    )
    event = DetectionEvent(
        device_id="d" * 64,
        source=longest,
        frame_seq=2**63 - 1,
        model=ModelRef(name="m" * 128, version="v" * 64),
        width=65_535,
        height=65_535,
        timing_ms=StageTimingMs(pre=1 / 3, infer=1 / 3, post=1 / 3),
        detections=[item.model_copy(update={"det_id": new_det_id()}) for _ in range(MAX_DETECTIONS)],
    )
    assert len(encode(event)) <= MAX_PAYLOAD_BYTES
    with pytest.raises(ValidationError, match="at most 300 items"):
        DetectionEvent.model_validate({**event.model_dump(), "detections": [item] * (MAX_DETECTIONS + 1)})


def test_encode_refuses_an_oversized_payload() -> None:
    event = sample_payloads()[2]
    assert isinstance(event, DetectionEvent)
    # model_construct skips validation, as a buggy producer might; encode still guards the cap.
    huge = DetectionEvent.model_construct(**{**dict(event), "detections": event.detections * 5000})
    with pytest.raises(PayloadError, match="over the 262144-byte cap") as caught:
        encode(huge)
    assert caught.value.schema == "edgefleet.detection/1"


def detection_wire() -> dict[str, Any]:
    payload = sample_payloads()[2]
    return dict(json.loads(encode(payload)))


def with_change(path: str, value: Any) -> bytes:
    wire = detection_wire()
    node: Any = wire
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return json.dumps(wire).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("device_id", "cam/1", "device_id"),
        ("msg_id", "not-a-ulid", "msg_id"),
        ("msg_id", new_msg_id().lower(), "msg_id"),
        ("ts", "2024-05-01T12:30:00", "ts"),
        ("ts", "yesterday", "ts"),
        ("frame_seq", "1042", "frame_seq"),
        ("frame_seq", -1, "frame_seq"),
        ("width", 0, "width"),
        ("model", _DELETE, "model"),
        ("model.version", "", "model.version"),
        ("timing_ms.infer", -0.5, "timing_ms.infer"),
        ("detections.0.confidence", 1.5, "detections.0.confidence"),
        ("detections.0.confidence", True, "detections.0.confidence"),
        ("detections.0.class_id", 16.5, "detections.0.class_id"),
        ("detections.0.label", "", "detections.0.label"),
        ("detections.0.label", "dog\n", "detections.0.label"),
        ("detections.0.bbox", [1, 2, 3], "detections.0.bbox"),
        ("detections.0.bbox", [300, 20, 10, 400], "detections.0.bbox"),
        ("detections.0.bbox", [10, 20, 900, 400], "detections"),
        ("detections.0.det_id", _DELETE, "detections.0.det_id"),
    ],
)
def test_invalid_fields_are_named(path: str, value: Any, field: str) -> None:
    with pytest.raises(PayloadError) as caught:
        decode(DetectionEvent, with_change(path, value))
    assert caught.value.schema == "edgefleet.detection/1"
    assert any(f == field or f.startswith(f"{field}.") for f in caught.value.fields)
    assert str(caught.value).startswith("invalid edgefleet.detection/1 payload: ")
    assert field in str(caught.value)


@pytest.mark.parametrize("key", ["schema", "msg_id", "device_id", "ts"])
def test_envelope_fields_are_required_on_the_wire(key: str) -> None:
    with pytest.raises(PayloadError, match=key) as caught:
        decode(DetectionEvent, with_change(key, _DELETE))
    assert caught.value.fields == (key,)


def test_wrong_schema_names_the_model_to_use() -> None:
    status = encode(sample_payloads()[0])
    with pytest.raises(PayloadError) as caught:
        decode(DetectionEvent, status)
    message = str(caught.value)
    assert "expected 'edgefleet.detection/1', got 'edgefleet.status/1'" in message
    assert "StatusPayload" in message
    assert caught.value.fields == ("schema",)
    with pytest.raises(PayloadError, match=re.escape("got 'edgefleet.detection/2'")):
        decode(DetectionEvent, with_change("schema", "edgefleet.detection/2"))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "over the 262144-byte cap"),
    ],
)
def test_malformed_payloads_raise_payload_error(data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason) as caught:
        decode(TelemetryPayload, data)
    assert "edgefleet.telemetry/1" in str(caught.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    text = detection_wire_text().replace('"infer":31.0', f'"infer":{literal}')
    with pytest.raises(PayloadError, match="finite") as caught:
        decode(DetectionEvent, text)
    assert caught.value.fields == ("timing_ms.infer",)


def detection_wire_text() -> str:
    return json.dumps(detection_wire(), separators=(",", ":"))


def test_unknown_fields_are_ignored_on_decode_but_refused_at_construction() -> None:
    plain = detection_wire()
    wire = json.loads(json.dumps(plain))
    wire["added_in_a_later_agent"] = {"x": 1}
    wire["detections"][0]["mask"] = [1, 2, 3]
    assert decode(DetectionEvent, json.dumps(wire)) == decode(DetectionEvent, json.dumps(plain))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelReported(device_id=DEVICE, state=OtaState.IDLE, progres=0.5)  # type: ignore[call-arg]


def test_payloads_are_immutable() -> None:
    payload = sample_payloads()[0]
    with pytest.raises(ValidationError, match="frozen"):
        payload.device_id = "other"


def test_crop_metadata_round_trips_through_user_properties() -> None:
    crop = sample_payloads()[3]
    assert isinstance(crop, CropMeta)
    properties = crop.to_user_properties()
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in properties)
    as_dict = dict(properties)
    assert {"msg_id", "det_id", "label", "class_id", "confidence", "bbox", "model"} <= set(as_dict)
    assert as_dict["label"] == "dog"
    assert as_dict["det_id"] == crop.det_id
    assert json.loads(as_dict["bbox"]) == [10.0, 20.5, 300.0, 400.0]
    # Brokers and other clients may add properties of their own: ignored.
    assert CropMeta.from_user_properties([*properties, ("x-trace", "abc")]) == crop


def test_crop_user_property_errors_name_the_property() -> None:
    properties = sample_payloads()[3]
    assert isinstance(properties, CropMeta)
    props = properties.to_user_properties()
    with pytest.raises(PayloadError, match="'label' appears twice"):
        CropMeta.from_user_properties([*props, ("label", "cat")])
    with pytest.raises(PayloadError, match="'bbox' is not JSON") as caught:
        CropMeta.from_user_properties([(k, "1,2,3,4" if k == "bbox" else v) for k, v in props])
    assert caught.value.fields == ("bbox",)
    with pytest.raises(PayloadError, match="confidence") as caught:
        CropMeta.from_user_properties([(k, v) for k, v in props if k != "confidence"])
    assert caught.value.fields == ("confidence",)
    with pytest.raises(PayloadError, match="class_id"):
        CropMeta.from_user_properties([(k, '"16"' if k == "class_id" else v) for k, v in props])


def test_crop_jpeg_check(bus_jpg: Path) -> None:
    image = cv2.imread(str(bus_jpg))
    assert image is not None
    ok, jpeg = cv2.imencode(".jpg", image[100:300, 50:250])
    assert ok
    assert check_crop_jpeg(jpeg.tobytes()) == jpeg.tobytes()
    with pytest.raises(PayloadError, match="not a JPEG"):
        check_crop_jpeg(cv2.imencode(".png", image[:10, :10])[1].tobytes())


def test_empty_desired_model_clears() -> None:
    desired = sample_payloads()[5]
    assert decode_model_desired(b"") is None
    assert decode_model_desired(encode(desired)) == desired
    assert isinstance(desired, ModelDesired)
    assert desired.model_ref == ModelRef(name="yolov8n_int8", version="4")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sha256", "AB" * 32),
        ("sha256", "ab" * 31),
        ("size", 0),
        ("url", "ftp://fleet/model.onnx"),
        ("url", "http://fleet/a b"),
        ("signature", "not base64!"),
        ("rollout_id", "../etc"),
        ("name", "a/b"),
    ],
)
def test_desired_model_limits(field: str, value: Any) -> None:
    wire = json.loads(encode(sample_payloads()[5]))
    wire[field] = value
    with pytest.raises(PayloadError) as caught:
        decode(ModelDesired, json.dumps(wire))
    assert caught.value.fields == (field,)


def test_reported_state_must_be_an_ota_state() -> None:
    wire = json.loads(encode(sample_payloads()[6]))
    assert {state.value for state in OtaState} == {
        "idle",
        "downloading",
        "verifying",
        "staging",
        "activating",
        "active",
        "failed",
        "rolled_back",
    }
    wire["state"] = "exploded"
    with pytest.raises(PayloadError, match="state: Input should be 'idle'"):
        decode(ModelReported, json.dumps(wire))


def test_many_errors_are_summarised() -> None:
    wire = json.loads(encode(sample_payloads()[1]))
    for key in (
        "interval_s",
        "fps",
        "cpu_percent",
        "memory_mb",
        "temperature_c",
        "link_rtt_ms",
        "frames_dropped",
    ):
        wire[key] = -1e9
    wire["outbox"] = {"depth": -1, "bytes": -1, "dropped": {"Crops!": -1}}
    with pytest.raises(PayloadError, match=r"and [0-9]+ more") as caught:
        decode(TelemetryPayload, json.dumps(wire))
    assert len(caught.value.fields) > 8
    assert "outbox.dropped.Crops!.[key]" in caught.value.fields


# --- ids ---


def test_msg_ids_in_a_tight_loop_are_unique_and_sorted() -> None:
    ids = [new_msg_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_ulid(i) for i in ids)
    assert ULID.from_str(ids[0]).datetime <= ULID.from_str(ids[-1]).datetime
    assert abs(ULID.from_str(ids[-1]).datetime - datetime.now(timezone.utc)) < timedelta(seconds=5)


def test_ids_are_unique_across_threads() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_det_id() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({i for out in results for i in out}) == 20_000
    assert all(out == sorted(out) for out in results)


def test_ids_stay_sorted_when_the_clock_stands_still_or_steps_back() -> None:
    clock = iter([5_000] * 100 + [4_000] * 100 + [5_001] * 100)
    generator = UlidGenerator(clock_ms=lambda: next(clock))
    ids = [str(generator.next()) for _ in range(300)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 300
    assert {ULID.from_str(i).milliseconds for i in ids} == {5_000, 5_001}


def test_randomness_overflow_moves_to_the_next_millisecond() -> None:
    generator = UlidGenerator(clock_ms=lambda: 7_000, random_bytes=lambda n: b"\xff" * n)
    first, second = generator.next(), generator.next()
    assert (first.milliseconds, second.milliseconds) == (7_000, 7_001)
    assert str(first) < str(second)


def test_forked_child_does_not_continue_the_parents_sequence() -> None:
    generator = UlidGenerator(clock_ms=lambda: 9_000)  # one frozen millisecond: only randomness differs
    generator.next()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write_end, str(generator.next()).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    assert status == 0
    assert is_ulid(child_id)
    assert child_id != str(generator.next())
