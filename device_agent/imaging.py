"""Image bytes in, BGR arrays out, and boxes drawn back on; no HTTP here.

`decode_image` is the guarded way to turn untrusted bytes into an image: the format is sniffed from magic
bytes, the dimensions are read from the header (Pillow opens lazily) and checked against `ImageLimits`
before anything is decoded, and only then does OpenCV decode the pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage

from device_agent.detector import Detection, Image

SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
# DIB header sizes a real BMP file can carry; "BM" alone is too weak a signature (plain text starts so).
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
# Ultralytics' palette, BGR, so the drawings look like the ones users already know.
_PALETTE_HEX = (
    *("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB"),
    *("2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7"),
)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)) for h in _PALETTE_HEX
)


class ImageError(ValueError):
    """The bytes are not an image this agent accepts; the message says why."""


class UnsupportedImageTypeError(ImageError):
    """Not JPEG, PNG, BMP or WebP (judged by the bytes, not by any declared content type)."""


class InvalidImageError(ImageError):
    """A supported type, but truncated, corrupt, or with dimensions outside the limits."""


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Dimensions an uploaded image may have; checked from the header, before decoding."""

    max_side: int = 16384
    max_pixels: int = 50_000_000
    max_aspect_ratio: float = 20.0


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading magic bytes (`JPEG`, `PNG`, `BMP`, `WEBP`), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return "BMP"
    return None


def read_dimensions(data: bytes, image_format: str) -> tuple[int, int]:
    """`(width, height)` from the image header without decoding the pixels."""
    try:
        with PILImage.open(io.BytesIO(data), formats=[image_format]) as image:
            width, height = image.size
    except PILImage.DecompressionBombError as error:  # Pillow's own cap, far beyond any sane ImageLimits
        raise InvalidImageError(f"the {image_format} header claims an absurd size: {error}") from error
    except Exception as error:  # Pillow's plugins raise many types for a malformed header; all mean the same
        raise InvalidImageError(f"cannot read the {image_format} header: {error}") from error
    return int(width), int(height)


def check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    """Raise InvalidImageError when the dimensions are empty, too large, or too elongated."""
    if width < 1 or height < 1:
        raise InvalidImageError(f"the image header says {width}x{height} pixels; an image needs at least 1x1")
    if max(width, height) > limits.max_side:
        raise InvalidImageError(
            f"{width}x{height} pixels: a side is longer than the limit of {limits.max_side} px"
        )
    if width * height > limits.max_pixels:
        raise InvalidImageError(
            f"{width}x{height} = {width * height} pixels is more than the limit of {limits.max_pixels}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InvalidImageError(
            f"{width}x{height} pixels: aspect ratio {ratio:.1f} is beyond the limit of "
            f"{limits.max_aspect_ratio:g}"
        )


def decode_image(data: bytes, limits: ImageLimits | None = None) -> Image:
    """Decode untrusted bytes into a BGR image, checking type and dimensions first."""
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedImageTypeError(
            f"the data is not a JPEG, PNG, BMP or WebP image (it starts with {data[:8]!r})"
        )
    width, height = read_dimensions(data, image_format)
    check_dimensions(width, height, limits or ImageLimits())
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise InvalidImageError(f"the {image_format} data cannot be decoded: {error}") from error
    if image is None:
        raise InvalidImageError(f"the {image_format} data is truncated or corrupt and cannot be decoded")
    return image


def encode_jpeg(image: Image, quality: int = 90) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return bytes(buffer)


def annotate(image: Image, detections: Sequence[Detection]) -> Image:
    """A copy of `image` with each detection's box and `label confidence` drawn on it."""
    canvas = image.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round((height + width) / 2 * 0.003))
    font_scale = thickness / 3
    for det in detections:
        color = PALETTE[det.class_id % len(PALETTE)]
        x1, y1, x2, y2 = (round(v) for v in det.bbox)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        _draw_label(canvas, f"{det.label} {det.confidence:.2f}", (x1, y1), color, font_scale, thickness)
    return canvas


def _draw_label(
    canvas: Image,
    text: str,
    corner: tuple[int, int],
    color: tuple[int, int, int],
    scale: float,
    thickness: int,
) -> None:
    """Text on a filled box above the corner, or just inside the box when there is no room above."""
    text_thickness = max(1, thickness - 1)
    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, text_thickness)
    x, y = corner
    box_h = text_h + baseline + 2
    top = y - box_h if y - box_h >= 0 else y
    cv2.rectangle(canvas, (x, top), (x + text_w + 2, top + box_h), color, -1, cv2.LINE_AA)
    text_color = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
    origin = (x + 1, top + text_h + 1)
    cv2.putText(
        canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, text_color, text_thickness, cv2.LINE_AA
    )
