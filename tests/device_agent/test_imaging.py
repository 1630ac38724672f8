"""Guarded decoding of untrusted image bytes, and drawing detections back on images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent.detector import Detection, Detector
from device_agent.imaging import (
    PALETTE,
    ImageLimits,
    InvalidImageError,
    UnsupportedImageTypeError,
    annotate,
    decode_image,
    encode_jpeg,
    read_dimensions,
    sniff_format,
)

# cv2 extension -> the format name sniff_format reports; WebP quality 101 means lossless.
ENCODINGS = {".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
ENCODE_FLAGS = {".webp": [cv2.IMWRITE_WEBP_QUALITY, 101]}


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image, ENCODE_FLAGS.get(ext, []))
    assert ok, ext
    return bytes(buffer)


def crafted_png(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) claiming any size, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def crafted_bmp(width: int, height: int, bits: int = 24) -> bytes:
    """A BMP file and info header claiming any size (negative height = top-down), with 16 pixel bytes."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x80" * 16
    file_header = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return file_header + info + pixels


@pytest.fixture(scope="module")
def bus_image(bus_jpg: Path) -> np.ndarray:
    image = cv2.imread(str(bus_jpg))
    assert image is not None
    return image


@pytest.mark.parametrize(("ext", "name"), ENCODINGS.items())
def test_each_supported_encoding_is_sniffed_and_sized_from_its_header(
    bus_image: np.ndarray, ext: str, name: str
) -> None:
    data = encode(bus_image, ext)
    assert sniff_format(data) == name
    assert read_dimensions(data, name) == (bus_image.shape[1], bus_image.shape[0])
    decoded = decode_image(data)
    assert decoded.shape == bus_image.shape
    if ext != ".jpg":  # the lossless encodings give back the very pixels
        assert np.array_equal(decoded, bus_image)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        b"GIF89a\x01\x00\x01\x00",
        b"%PDF-1.7\n",
        b"BMW is a car maker, not a bitmap",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"\xff\xd8",
        b"PK\x03\x04" + bytes(40),
    ],
)
def test_other_bytes_are_not_taken_for_an_image(data: bytes) -> None:
    assert sniff_format(data) is None
    with pytest.raises(UnsupportedImageTypeError, match="not a JPEG, PNG, BMP or WebP"):
        decode_image(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (crafted_png(100_000, 1), "side is longer than the limit of 16384"),
        (crafted_png(1, 100_000), "side is longer than the limit"),
        (crafted_bmp(60_000, 60_000), "claims an absurd size: Image size \\(3600000000 pixels\\)"),
        (crafted_bmp(9_000, -9_000), "81000000 pixels is more than the limit of 50000000"),
        (crafted_png(4_000, 100), "aspect ratio 40.0 is beyond the limit of 20"),
    ],
)
def test_absurd_dimensions_are_refused_from_the_header(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        decode_image(data)


def test_limits_are_configurable() -> None:
    data = crafted_png(1_000, 100)
    with pytest.raises(InvalidImageError, match=r"aspect ratio 10\.0"):
        decode_image(data, ImageLimits(max_aspect_ratio=5))
    with pytest.raises(InvalidImageError, match="limit of 500 px"):
        decode_image(data, ImageLimits(max_side=500))


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
@pytest.mark.parametrize("kept", [0.1, 0.5, 0.99])
def test_truncated_images_are_invalid(bus_image: np.ndarray, ext: str, kept: float) -> None:
    data = encode(bus_image, ext)
    with pytest.raises(InvalidImageError, match=r"truncated or corrupt|cannot read the"):
        decode_image(data[: int(len(data) * kept)])


def test_a_header_claiming_pixels_it_lacks_is_invalid() -> None:
    # 3000x3000 passes every limit, but the file holds 16 bytes of pixels: the decoder must fail, not crash.
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        decode_image(crafted_bmp(3_000, 3_000))


@pytest.mark.parametrize("channels", [1, 4])
def test_gray_and_alpha_images_decode_to_three_channel_bgr(channels: int) -> None:
    source = np.random.default_rng(7).integers(0, 255, (30, 40, channels), dtype=np.uint8)
    decoded = decode_image(encode(source, ".png"))
    assert decoded.shape == (30, 40, 3)
    expected = cv2.cvtColor(source, cv2.COLOR_GRAY2BGR if channels == 1 else cv2.COLOR_BGRA2BGR)
    assert np.array_equal(decoded, expected)


def test_annotate_draws_boxes_and_labels_on_a_copy() -> None:
    image = np.full((500, 600, 3), 40, np.uint8)
    original = image.copy()
    bus = Detection(5, "bus", 0.82, (100.0, 200.0, 300.0, 400.0))
    drawn = annotate(image, [bus])
    assert np.array_equal(image, original), "annotate must not draw on its input"
    assert drawn.shape == image.shape
    assert tuple(drawn[300, 100]) == PALETTE[5], "the left edge of the box has the class colour"
    assert tuple(drawn[300, 200]) == (40, 40, 40), "the inside of the box is untouched"
    assert (drawn[180:200, 100:160] != 40).any(), "the label sits above the box"


def test_annotate_copes_with_boxes_at_and_beyond_the_edges() -> None:
    image = np.zeros((100, 120, 3), np.uint8)
    detections = [
        Detection(0, "person", 0.9, (0.0, 0.0, 50.0, 50.0)),
        Detection(79, "toothbrush", 0.3, (100.0, 80.0, 400.0, 300.0)),
    ]
    drawn = annotate(image, detections)
    assert drawn.shape == image.shape
    assert (drawn[0:12, 0:40] != 0).any(), "a box at the top edge gets its label inside"
    assert np.array_equal(annotate(image, []), image)


def test_annotated_detections_encode_as_jpeg_of_the_same_size(
    bus_image: np.ndarray, int8_detector: Detector
) -> None:
    detections = int8_detector.detect(bus_image)
    jpeg = encode_jpeg(annotate(bus_image, detections), quality=80)
    assert sniff_format(jpeg) == "JPEG"
    decoded = decode_image(jpeg)
    assert decoded.shape == bus_image.shape
    assert np.abs(decoded.astype(int) - bus_image.astype(int)).mean() > 1, "boxes were drawn"
