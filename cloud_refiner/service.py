"""The refiner's core: crop bytes in, `Refinement`s out; no MQTT or HTTP here.

`RefinerService.submit` checks and decodes a crop in the caller's thread (a bad crop raises
CropRejectedError at once and is counted), resizes it for the classifier, and queues it on the
micro-batcher, whose worker classifies whole batches and applies the class conditioning. Crops carrying a
key (the MQTT `det_id`) are answered once: a key seen recently is reported as a duplicate instead of being
queued again (a bounded recent-id cache). Observers hear about everything, off the result path.

    service = RefinerService(classifier, conditioner, batching=BatchingConfig(), limits=LimitsConfig())
    service.start()
    submission = service.submit(jpeg_bytes, "dog", source="http")
    result = submission.future.result()  # RefineResult: refinement, latency, batch size
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum

import cv2
import numpy as np
from PIL import Image as PILImage

from cloud_refiner.batcher import BatchStats, MicroBatcher
from cloud_refiner.classifier import Classifier, ClassifierInfo
from cloud_refiner.conditioning import Conditioner, Refinement
from cloud_refiner.config import BatchingConfig, LimitsConfig

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


class RejectReason(str, Enum):
    """Why a crop was not classified; the values label the drop counters."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_JPEG = "not_jpeg"
    UNSUPPORTED_TYPE = "unsupported_type"
    UNDECODABLE = "undecodable"
    BAD_DIMENSIONS = "bad_dimensions"
    BAD_METADATA = "bad_metadata"  # adapters: missing or invalid MQTT properties
    BAD_RESPONSE_TOPIC = "bad_response_topic"  # adapters: a reply would go somewhere it must not
    OVERLOADED = "overloaded"


class CropRejectedError(ValueError):
    """A crop that is not classified; `reason` says why in one word, the message in a sentence."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sniff_image(data: bytes) -> str | None:
    """The image format named by the leading bytes (`JPEG`, `PNG`, `WEBP`), or None."""
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_crop(data: bytes, limits: LimitsConfig, *, jpeg_only: bool) -> np.ndarray:
    """Untrusted bytes -> BGR image, checking size, type and dimensions before decoding any pixel."""
    if not data:
        raise CropRejectedError(RejectReason.EMPTY, "the crop is empty (0 bytes)")
    if len(data) > limits.max_crop_bytes:
        raise CropRejectedError(
            RejectReason.TOO_LARGE,
            f"the crop is {len(data)} bytes, over the limit of {limits.max_crop_bytes}",
        )
    image_format = sniff_image(data)
    if image_format is None or (jpeg_only and image_format != "JPEG"):
        reason = RejectReason.NOT_JPEG if jpeg_only else RejectReason.UNSUPPORTED_TYPE
        wanted = "a JPEG" if jpeg_only else "a JPEG, PNG or WebP image"
        raise CropRejectedError(reason, f"the crop is not {wanted} (it starts with {data[:8]!r})")
    try:
        with PILImage.open(io.BytesIO(data), formats=[image_format]) as header:
            width, height = header.size
    except Exception as error:  # Pillow raises many types for a malformed header; all mean the same here
        raise CropRejectedError(
            RejectReason.UNDECODABLE, f"cannot read the {image_format} header: {error}"
        ) from error
    if width < 1 or height < 1 or max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise CropRejectedError(
            RejectReason.BAD_DIMENSIONS,
            f"the crop is {width}x{height} pixels; accepted: sides up to {limits.max_side} px and at most "
            f"{limits.max_pixels} pixels",
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CropRejectedError(
            RejectReason.UNDECODABLE, f"the {image_format} data is truncated or corrupt and cannot be decoded"
        )
    return image


@dataclass(frozen=True, slots=True)
class RefineResult:
    """A refined crop."""

    refinement: Refinement
    received_at: float  # time.perf_counter() when the crop arrived
    done_at: float  # time.perf_counter() when its batch finished
    batch_size: int

    @property
    def latency_s(self) -> float:
        return self.done_at - self.received_at


class Admission(str, Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the key was seen recently: nothing was queued


@dataclass(frozen=True, slots=True)
class Submission:
    admission: Admission
    future: Future[RefineResult] | None  # None for a duplicate


class RefinerObserver:
    """Hooks called by the service and its adapters; each must be quick and must not raise. No-ops here."""

    def crop_rejected(self, source: str, reason: RejectReason) -> None:
        """A crop was dropped (MQTT) or refused (HTTP) without being classified."""

    def crop_duplicate(self, source: str) -> None:
        """A crop whose key was answered (or is being answered) already."""

    def batch_done(self, stats: BatchStats) -> None:
        """The classifier ran one batch."""

    def crop_refined(self, source: str, result: RefineResult, data: bytes) -> None:
        """One crop was classified; `data` is its encoded image (for samples)."""

    def reply_sent(self, ok: bool) -> None:
        """An MQTT reply was acknowledged by the broker (`ok`) or could not be delivered."""


class Observers(RefinerObserver):
    """Calls each observer in turn; one that raises is logged and skipped."""

    def __init__(self, observers: Sequence[RefinerObserver]) -> None:
        self.observers = list(observers)

    def _each(self, method: str, *args: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("observer %r failed in %s", observer, method)

    def crop_rejected(self, source: str, reason: RejectReason) -> None:
        self._each("crop_rejected", source, reason)

    def crop_duplicate(self, source: str) -> None:
        self._each("crop_duplicate", source)

    def batch_done(self, stats: BatchStats) -> None:
        self._each("batch_done", stats)

    def crop_refined(self, source: str, result: RefineResult, data: bytes) -> None:
        self._each("crop_refined", source, result, data)

    def reply_sent(self, ok: bool) -> None:
        self._each("reply_sent", ok)


class RecentIds:
    """The last `capacity` keys seen, oldest forgotten first; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str) -> bool:
        """Remember `key`; False if it was already remembered."""
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return False
            self._keys[key] = None
            if len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


@dataclass(frozen=True, slots=True)
class _Job:
    prepared: np.ndarray
    edge_label: str | None
    source: str
    received_at: float
    data: bytes


class RefinerService:
    """Decode, micro-batch, classify and condition crops; see the module doc."""

    def __init__(
        self,
        classifier: Classifier,
        conditioner: Conditioner,
        *,
        batching: BatchingConfig,
        limits: LimitsConfig,
        observer: RefinerObserver | None = None,
    ) -> None:
        self.classifier = classifier
        self.conditioner = conditioner
        self.limits = limits
        self.observer = observer or RefinerObserver()
        self.recent = RecentIds(limits.recent_ids)
        max_batch = batching.max_batch
        if classifier.info.fixed_batch == 1 and max_batch > 1:
            log.warning("%s takes one image per call: batches run image by image", classifier.info.path)
        self._batcher: MicroBatcher[_Job, RefineResult] = MicroBatcher(
            self._process,
            max_batch=max_batch,
            max_wait_s=batching.max_wait_ms / 1e3,
            queue_size=batching.queue_size,
            on_batch=self.observer.batch_done,
            name="refiner-batcher",
        )

    @property
    def info(self) -> ClassifierInfo:
        return self.classifier.info

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth

    @property
    def queue_capacity(self) -> int:
        return self._batcher.capacity

    @property
    def running(self) -> bool:
        return not self._batcher.closed

    def start(self) -> RefinerService:
        self._batcher.start()
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        self._batcher.close(drain=drain, timeout=timeout)

    def prepare(self, data: bytes, *, source: str, jpeg_only: bool = False) -> np.ndarray:
        """Decode and resize one crop for the classifier; CropRejectedError (counted) if it is unusable."""
        try:
            return self.classifier.prepare(decode_crop(data, self.limits, jpeg_only=jpeg_only))
        except CropRejectedError as error:
            self.observer.crop_rejected(source, error.reason)
            raise

    def submit(
        self,
        data: bytes,
        edge_label: str | None,
        *,
        source: str,
        key: str | None = None,
        received_at: float | None = None,
        timeout: float | None = 0.0,
        jpeg_only: bool = False,
        prepared: np.ndarray | None = None,
    ) -> Submission:
        """Queue one crop; raises CropRejectedError for an unusable crop and QueueFullError when full.

        `key` (a det_id) makes the call idempotent: a key seen among the last `limits.recent_ids` gives
        `Admission.DUPLICATE` and queues nothing. `timeout` is how long to wait for room in the queue.
        """
        received_at = time.perf_counter() if received_at is None else received_at
        if key is not None and key in self.recent:
            self.recent.add(key)  # refresh its place
            self.observer.crop_duplicate(source)
            return Submission(Admission.DUPLICATE, None)
        if prepared is None:
            prepared = self.prepare(data, source=source, jpeg_only=jpeg_only)
        if key is not None and not self.recent.add(key):  # a concurrent twin got in first
            self.observer.crop_duplicate(source)
            return Submission(Admission.DUPLICATE, None)
        job = _Job(prepared, edge_label, source, received_at, data)
        try:
            future = self._batcher.submit(job, timeout=timeout)
        except Exception:
            if key is not None:
                self.recent.discard(key)  # not taken: a redelivery must get through
            self.observer.crop_rejected(source, RejectReason.OVERLOADED)
            raise
        return Submission(Admission.ACCEPTED, future)

    def refine_now(
        self, data: bytes, edge_label: str | None = None, timeout: float | None = 60.0
    ) -> Refinement:
        """Submit one crop and wait for its refinement (for scripts and tests)."""
        submission = self.submit(data, edge_label, source="direct", timeout=timeout)
        assert submission.future is not None
        return submission.future.result(timeout).refinement

    def _process(self, jobs: list[_Job]) -> list[RefineResult]:
        probs = self.classifier.classify([job.prepared for job in jobs])
        done_at = time.perf_counter()
        results = []
        for job, row in zip(jobs, probs, strict=True):
            refinement = self.conditioner.refine(row, job.edge_label)
            result = RefineResult(refinement, job.received_at, done_at, len(jobs))
            self.observer.crop_refined(job.source, result, job.data)
            results.append(result)
        return results
