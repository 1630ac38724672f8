"""Throw a few hundred hostile or odd requests at /v1/detect: none may get a 5xx, and the process lives on.

The corpus is built from a fixed seed, so a failure names a case that reproduces.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.api import ApiSettings, create_app
from device_agent.detector import Detector
from tests.device_agent.test_imaging import crafted_bmp, crafted_png, encode

SEED = 20240611
# Pillow warns (before we refuse them) about crafted headers of 90-180 Mpx; the refusal itself is asserted.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@dataclass
class Case:
    name: str
    body: bytes
    headers: dict[str, str | bytes] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/v1/detect"


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


VALID_PARAMS = {
    "conf": ["0.1", "0.5", "0.99", "1", "0", "1e-9"],
    "iou": ["0.3", "0.7", "1.0", "0"],
    "max_det": ["1", "3", "300", "10000"],
    "classes": ["person", "bus,person", "0", "79", ",,", " ", "person,,bus"],
    "annotate": ["true", "false", "1", "0", "yes", "off"],
}
INVALID_PARAMS = {
    "conf": ["-1", "2", "nan", "inf", "", "abc", "0x10"],
    "iou": ["-0.5", "5", "NaN", "", "[]"],
    "max_det": ["0", "-4", "1.5", "99999999999999999999", ""],
    "classes": ["80", "-1", "unicorn", "\u00e9", "person;bus"],
    "annotate": ["maybe", "", "2"],
}


def random_params(rng: random.Random) -> dict[str, str]:
    """Each parameter present 40% of the time, with a bad value a quarter of those times."""
    return {
        key: rng.choice(INVALID_PARAMS[key] if rng.random() < 0.25 else values)
        for key, values in VALID_PARAMS.items()
        if rng.random() < 0.4
    }


def jpeg_with_size(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 marker claims width x height (scan data is missing)."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def webp_with_canvas(width: int, height: int) -> bytes:
    """An extended-format WebP whose VP8X chunk claims a canvas of width x height."""
    vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    payload = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def multipart(boundary: str, parts: list[tuple[str, bytes]]) -> bytes:
    """Hand-made multipart body: each part is (raw header lines, content)."""
    body = b""
    for headers, content in parts:
        body += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def build_corpus(rng: random.Random, images: dict[str, bytes]) -> list[Case]:
    cases: list[Case] = []
    jpeg, png = images["jpeg"], images["png"]
    cases.append(Case("zero bytes", b""))
    cases.append(Case("over the upload limit", jpeg[:2] + random_bytes(rng, 1_500_000)))
    for i in range(40):
        cases.append(Case(f"random bytes {i}", random_bytes(rng, rng.choice([1, 3, 17, 100, 2048, 40_000]))))
    for i in range(25):
        cases.append(Case(f"truncated jpeg {i}", jpeg[: rng.randrange(1, len(jpeg))]))
        cases.append(Case(f"truncated png {i}", png[: rng.randrange(1, len(png))]))
    for i in range(12):  # a few bytes flipped in the middle: may decode, may not; never a 5xx
        corrupt = bytearray(jpeg)
        for _ in range(rng.randrange(1, 20)):
            corrupt[rng.randrange(200, len(corrupt))] = rng.randrange(256)
        cases.append(Case(f"bit-flipped jpeg {i}", bytes(corrupt)))
    cases += crafted_header_cases()
    cases += wrong_content_type_cases(rng, jpeg)
    cases += garbage_multipart_cases(rng, jpeg)
    for i in range(30):
        image = rng.choice(
            [images["small jpeg"], images["small png"], images["small webp"], images["small bmp"]]
        )
        body = image if rng.random() < 0.5 else b""
        files = None if body else image
        cases.append(valid_image_case(rng, i, body, files))
    for i, (method, path) in enumerate(
        [
            ("GET", "/v1/detect"),
            ("PUT", "/v1/detect"),
            ("POST", "/v1/detect/x"),
            ("POST", "/../../etc/passwd"),
            ("DELETE", "/metrics"),
            ("POST", "/healthz"),
        ]
    ):
        cases.append(Case(f"wrong route {i}", jpeg[:1000], method=method, path=path))
    return cases


def valid_image_case(rng: random.Random, index: int, body: bytes, file_bytes: bytes | None) -> Case:
    params = random_params(rng)
    if file_bytes is None:
        return Case(f"valid image {index}", body, params=params)
    boundary = f"b{rng.randrange(10**9)}"
    content = multipart(
        boundary, [('Content-Disposition: form-data; name="file"; filename="x.img"', file_bytes)]
    )
    return Case(
        f"valid multipart {index}",
        content,
        {"content-type": f"multipart/form-data; boundary={boundary}"},
        params,
    )


def crafted_header_cases() -> list[Case]:
    sizes = [
        (100_000, 1),
        (1, 100_000),
        (60_000, 60_000),
        (0, 0),
        (0, 10),
        (2**31 - 1, 2**31 - 1),
        (16_385, 16_385),
        (20_000, 5_000),
        (9_999, 9_999),
        (3_000, 3_000),
        (65_535, 65_535),
    ]
    cases: list[Case] = []
    for width, height in sizes:
        cases.append(Case(f"png {width}x{height}", crafted_png(width, height)))
        cases.append(
            Case(f"bmp {width}x{height}", crafted_bmp(min(width, 2**31 - 1), -min(height, 2**31 - 1)))
        )
        if width < 65_536 and height < 65_536:
            cases.append(Case(f"jpeg {width}x{height}", jpeg_with_size(width, height)))
        if 0 < width <= 2**24 and 0 < height <= 2**24:
            cases.append(Case(f"webp {width}x{height}", webp_with_canvas(width, height)))
    cases.append(Case("bmp 1 bit/pixel huge", crafted_bmp(16_000, 16_000, bits=1)))
    cases.append(Case("bmp 0 bits/pixel", crafted_bmp(10, 10, bits=0)))
    return cases


def wrong_content_type_cases(rng: random.Random, jpeg: bytes) -> list[Case]:
    types = [
        "text/plain",
        "application/json",
        "image/png",
        "image/gif",
        "video/mp4",
        "application/x-www-form-urlencoded",
        "multipart/mixed",
        "",
        "image/jpeg; charset=utf-8",
        "\u00e9/\u00e8",  # not ASCII: sent as raw latin-1 bytes
    ]
    cases: list[Case] = []
    for i, content_type in enumerate(types):
        body = jpeg if i % 3 == 0 else random_bytes(rng, 500)
        headers: dict[str, str | bytes] = {"content-type": content_type.encode("latin-1")}
        cases.append(Case(f"content type {content_type!r}", body, headers))
    return cases


def garbage_multipart_cases(rng: random.Random, jpeg: bytes) -> list[Case]:
    disposition = 'Content-Disposition: form-data; name="file"; filename="bus.jpg"'
    bodies: list[tuple[str, str, bytes]] = [
        ("no boundary", "multipart/form-data", multipart("x", [(disposition, jpeg[:300])])),
        ("empty boundary", "multipart/form-data; boundary=", b"----\r\n\r\n"),
        (
            "boundary mismatch",
            "multipart/form-data; boundary=aaa",
            multipart("bbb", [(disposition, jpeg[:300])]),
        ),
        (
            "unterminated",
            "multipart/form-data; boundary=z",
            f"--z\r\n{disposition}\r\n\r\n".encode() + jpeg[:5000],
        ),
        (
            "no name",
            "multipart/form-data; boundary=z",
            multipart("z", [("Content-Disposition: form-data", b"abc")]),
        ),
        (
            "no disposition",
            "multipart/form-data; boundary=z",
            multipart("z", [("X-Whatever: 1", jpeg[:100])]),
        ),
        (
            "text file field",
            "multipart/form-data; boundary=z",
            multipart("z", [('Content-Disposition: form-data; name="file"', b"hello")]),
        ),
        (
            "wrong field",
            "multipart/form-data; boundary=z",
            multipart("z", [('Content-Disposition: form-data; name="image"; filename="a.jpg"', jpeg[:2000])]),
        ),
        (
            "two files",
            "multipart/form-data; boundary=z",
            multipart("z", [(disposition, b"1"), (disposition, b"2")]),
        ),
        (
            "many fields",
            "multipart/form-data; boundary=z",
            multipart("z", [(f'Content-Disposition: form-data; name="f{i}"', b"v") for i in range(50)]),
        ),
        (
            "huge boundary",
            "multipart/form-data; boundary=" + "q" * 5000,
            multipart("q" * 5000, [(disposition, b"x")]),
        ),
        ("empty file", "multipart/form-data; boundary=z", multipart("z", [(disposition, b"")])),
        (
            "non-image file",
            "multipart/form-data; boundary=z",
            multipart("z", [(disposition, b"%PDF-1.4 ...")]),
        ),
        (
            "truncated image file",
            "multipart/form-data; boundary=z",
            multipart("z", [(disposition, jpeg[:4000])]),
        ),
        (
            "nul in headers",
            "multipart/form-data; boundary=z",
            b'--z\r\nContent-Disposition: form-data; name="file\x00"; filename="\x00"\r\n\r\n'
            b"abc\r\n--z--\r\n",
        ),
        (
            "bad header line",
            "multipart/form-data; boundary=z",
            b"--z\r\nthis is not a header\r\n\r\nabc\r\n--z--\r\n",
        ),
        (
            "filename unicode",
            "multipart/form-data; boundary=z",
            multipart(
                "z",
                [
                    (
                        "Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%F0%9F%9A%8C.jpg",
                        jpeg[:10],
                    )
                ],
            ),
        ),
    ]
    cases = [
        Case(f"multipart {name}", body, {"content-type": content_type}) for name, content_type, body in bodies
    ]
    for i in range(15):
        boundary = "".join(rng.choice("abcXYZ019-_'()+,./:=? ") for _ in range(rng.randrange(1, 80)))
        body = rng.choice(
            [
                random_bytes(rng, rng.randrange(0, 3000)),
                multipart(boundary, [(disposition, random_bytes(rng, 300))]),
            ]
        )
        cases.append(
            Case(f"random multipart {i}", body, {"content-type": f"multipart/form-data; boundary={boundary}"})
        )
    return cases


@pytest.fixture(scope="module")
def images(bus_jpg: Path) -> dict[str, bytes]:
    bus = cv2.imread(str(bus_jpg))
    assert bus is not None
    small = cv2.resize(bus, (81, 108))
    return {
        "jpeg": bus_jpg.read_bytes(),
        "png": encode(bus, ".png"),
        "small jpeg": encode(small, ".jpg"),
        "small png": encode(small, ".png"),
        "small webp": encode(small, ".webp"),
        "small bmp": encode(small, ".bmp"),
    }


@pytest.fixture(scope="module")
def fuzz_client(int8_detector: Detector) -> Iterator[TestClient]:
    settings = ApiSettings(max_upload_bytes=1_000_000, workers=2, queue_size=4)
    with TestClient(create_app(int8_detector, settings)) as test_client:
        yield test_client


def test_no_request_gets_a_server_error(fuzz_client: TestClient, images: dict[str, bytes]) -> None:
    corpus = build_corpus(random.Random(SEED), images)
    assert len(corpus) >= 200
    statuses: dict[int, int] = {}
    for case in corpus:
        response = fuzz_client.request(
            case.method, case.path, content=case.body, headers=case.headers, params=case.params
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.name}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error", "detail"}, f"{case.name}: {body}"
            assert body["detail"], case.name
        elif response.headers["content-type"] == "image/jpeg":
            assert cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR) is not None
        else:
            assert isinstance(response.json()["detections"], list), case.name
    assert fuzz_client.get("/healthz").status_code == 200
    assert fuzz_client.get("/readyz").status_code == 200
    # The corpus really exercises every layer: refusals of each kind and real detections.
    assert {200, 400, 405, 413, 415, 422} <= set(statuses), statuses
    metrics = fuzz_client.get("/metrics").text
    assert 'edgefleet_api_requests_total{method="POST",route="/v1/detect",status="200"}' in metrics
    assert "edgefleet_api_unhandled_errors_total{" not in metrics
