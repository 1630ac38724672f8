"""Which frames become detection events, and which detections become crops."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import cv2
from pydantic import BaseModel, Field, model_validator

from device_agent.detector import Image
from device_agent.tracker import TrackedDetection
from fleet_protocol.payloads import MAX_CROP_BYTES

MIN_CROP_LIMIT_BYTES = 4096
# Crops over the byte limit are encoded again at these qualities (those below the configured one), then
# made smaller at the last of them.
FALLBACK_QUALITIES = (70, 50, 35)


class PublishPolicyConfig(BaseModel):
    """When a processed frame is published as a detection event."""

    mode: Literal["every_frame", "on_change", "max_rate"] = Field(
        default="on_change",
        description="every_frame: all frames; on_change: when the set of tracked objects changes; "
        "max_rate: every frame, but at most `max_rate_hz` events per second.",
    )
    max_rate_hz: float = Field(default=2.0, gt=0, le=240, description="Events per second for mode max_rate.")
    publish_empty: bool = Field(default=False, description="Also publish frames with no detections.")


class CropPolicyConfig(BaseModel):
    """Which detections are cut out and sent (as JPEG) for the cloud refiner."""

    enabled: bool = Field(default=True, description="Send crops at all.")
    classes: list[str] | None = Field(
        default=None,
        description="Labels to crop; with `uncertain_band` set too, either selects. Neither: every class.",
    )
    uncertain_band: tuple[float, float] | None = Field(
        default=None,
        description="Also crop any detection whose confidence lies in [low, high), whatever its class.",
    )
    confidence_change: float = Field(
        default=0.2, gt=0, le=1, description="Crop a track again when its confidence moved this much."
    )
    padding: float = Field(
        default=0.1, ge=0, le=1, description="Padding around the box, as a fraction of it."
    )
    max_side: int = Field(default=320, ge=16, le=4096, description="Longest side of a crop in pixels.")
    min_side: int = Field(
        default=16, ge=1, le=1024, description="Boxes smaller than this on a side are not cut."
    )
    jpeg_quality: int = Field(default=85, ge=10, le=100, description="JPEG quality of crops.")
    max_bytes: int = Field(
        default=MAX_CROP_BYTES,
        ge=MIN_CROP_LIMIT_BYTES,
        le=MAX_CROP_BYTES,
        description="Largest crop JPEG. A larger one is encoded again at a lower quality, then smaller (down "
        "to a quarter of max_side), else skipped and counted (telemetry: outbox.dropped.crops_too_large). "
        "At most the contract's 2 MiB; lower it to the broker's message_size_limit if that is smaller: "
        "Mosquitto answers an over-limit publish in a way the client can only retry.",
    )
    bytes_per_second: int = Field(
        default=200_000, ge=1_000, description="Budget for crop bytes; crops over it are not made."
    )

    @model_validator(mode="after")
    def _band_in_order(self) -> CropPolicyConfig:
        if self.uncertain_band is not None and not 0 <= self.uncertain_band[0] < self.uncertain_band[1] <= 1:
            raise ValueError("uncertain_band must be [low, high) with 0 <= low < high <= 1")
        return self


@dataclass
class PublishPolicy:
    config: PublishPolicyConfig
    _last_track_ids: frozenset[int] | None = None
    _last_published_at: float = float("-inf")

    def should_publish(self, tracked: list[TrackedDetection], now: float | None = None) -> bool:
        if not tracked and not self.config.publish_empty and self.config.mode != "on_change":
            return False
        track_ids = frozenset(t.track_id for t in tracked)
        changed, self._last_track_ids = track_ids != self._last_track_ids, track_ids
        if self.config.mode == "every_frame":
            return True
        if self.config.mode == "on_change":
            return changed and (bool(tracked) or self.config.publish_empty)
        now = time.monotonic() if now is None else now
        if now - self._last_published_at < 1.0 / self.config.max_rate_hz:
            return False
        self._last_published_at = now
        return True


@dataclass(frozen=True, slots=True)
class Crop:
    tracked: TrackedDetection
    jpeg: bytes


@dataclass
class CropPolicy:
    config: CropPolicyConfig
    _cropped_confidence: dict[int, float] = field(default_factory=dict)
    _budget: float = 0.0
    _budget_at: float = field(default_factory=time.monotonic)
    crops_over_budget: int = 0
    crops_too_large: int = 0  # no encoding within max_bytes: skipped

    def __post_init__(self) -> None:
        self._budget = float(self.config.bytes_per_second)

    def crops_for(self, image: Image, tracked: list[TrackedDetection]) -> list[Crop]:
        if not self.config.enabled:
            return []
        self._refill_budget()
        crops = []
        for item in tracked:
            if not self._wanted(item):
                continue
            too_large = self.crops_too_large
            jpeg = self._cut(image, item)
            if jpeg is None:
                if self.crops_too_large > too_large:  # not again each frame: only on a confidence change
                    self._cropped_confidence[item.track_id] = item.detection.confidence
                continue
            if len(jpeg) > self._budget:
                self.crops_over_budget += 1
                continue
            self._budget -= len(jpeg)
            self._cropped_confidence[item.track_id] = item.detection.confidence
            crops.append(Crop(item, jpeg))
        self._forget_old_tracks({t.track_id for t in tracked})
        return crops

    def _wanted(self, item: TrackedDetection) -> bool:
        previous = self._cropped_confidence.get(item.track_id)
        changed = (
            previous is None or abs(item.detection.confidence - previous) >= self.config.confidence_change
        )
        return changed and self._selected(item.detection.label, item.detection.confidence)

    def _selected(self, label: str, confidence: float) -> bool:
        classes, band = self.config.classes, self.config.uncertain_band
        if classes is None and band is None:
            return True
        in_classes = classes is not None and label in classes
        in_band = band is not None and band[0] <= confidence < band[1]
        return in_classes or in_band

    def _cut(self, image: Image, item: TrackedDetection) -> bytes | None:
        x1, y1, x2, y2 = item.detection.bbox
        if min(x2 - x1, y2 - y1) < self.config.min_side:
            return None
        pad_x, pad_y = (x2 - x1) * self.config.padding, (y2 - y1) * self.config.padding
        height, width = image.shape[:2]
        left, top = max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y))
        right, bottom = min(width, int(x2 + pad_x + 0.5)), min(height, int(y2 + pad_y + 0.5))
        crop = image[top:bottom, left:right]
        scale = self.config.max_side / max(crop.shape[:2])
        if scale < 1:
            crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return self._encode_within_limit(crop)

    def _encode_within_limit(self, crop: Image) -> bytes | None:
        """JPEG of `crop` of at most `max_bytes`: at the configured quality, else lower ones, else smaller
        (down to a quarter of max_side); None, and counted, if none fits."""
        limit, configured = self.config.max_bytes, self.config.jpeg_quality
        jpeg, quality = b"", configured
        for quality in (configured, *(q for q in FALLBACK_QUALITIES if q < configured)):
            jpeg = _jpeg(crop, quality)
            if len(jpeg) <= limit:
                return jpeg or None
        floor = max(self.config.min_side, self.config.max_side // 4)
        while max(crop.shape[:2]) > floor:
            # JPEG bytes grow about with the pixel count: aim a little under the limit.
            factor = min(0.9, 0.95 * (limit / len(jpeg)) ** 0.5)
            side = max(floor, int(max(crop.shape[:2]) * factor))
            factor = side / max(crop.shape[:2])
            crop = cv2.resize(crop, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
            jpeg = _jpeg(crop, quality)
            if len(jpeg) <= limit:
                return jpeg or None
        self.crops_too_large += 1
        return None

    def _refill_budget(self) -> None:
        now = time.monotonic()
        rate = self.config.bytes_per_second
        # At most one second of budget is banked, so a quiet minute cannot become a burst.
        self._budget = min(float(rate), self._budget + (now - self._budget_at) * rate)
        self._budget_at = now

    def _forget_old_tracks(self, live_track_ids: set[int]) -> None:
        if len(self._cropped_confidence) > 4 * max(len(live_track_ids), 64):
            self._cropped_confidence = {
                k: v for k, v in self._cropped_confidence.items() if k in live_track_ids
            }


def _jpeg(image: Image, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes() if ok else b""
