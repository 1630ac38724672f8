"""The micro-batcher and the service core: batching, backpressure, idempotence, bad crops."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from cloud_refiner.batcher import BatcherClosedError, BatchStats, MicroBatcher, QueueFullError
from cloud_refiner.classifier import Classifier
from cloud_refiner.conditioning import Conditioner, LabelSubsets
from cloud_refiner.config import BatchingConfig, LimitsConfig
from cloud_refiner.service import (
    Admission,
    CropRejectedError,
    RecentIds,
    RefineResult,
    RefinerObserver,
    RefinerService,
    RejectReason,
)
from tests.cloud_refiner.conftest import Crops


class Gate:
    """A batch function that blocks until released, recording the batches it saw."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def __call__(self, values: list[int]) -> list[int]:
        self.release.wait(10)
        self.batches.append(values)
        return [v * 10 for v in values]


def test_items_queued_while_busy_form_one_batch_of_at_most_max_batch() -> None:
    gate = Gate()
    stats: list[BatchStats] = []
    batcher = MicroBatcher(gate, max_batch=4, max_wait_s=0.0, queue_size=16, on_batch=stats.append).start()
    first = batcher.submit(0)
    time.sleep(0.2)  # the worker now holds item 0 and waits on the gate
    futures = [batcher.submit(i) for i in range(1, 7)]
    gate.release.set()
    assert [f.result(10) for f in [first, *futures]] == [0, 10, 20, 30, 40, 50, 60]
    batcher.close()
    assert gate.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert [s.size for s in stats] == [1, 4, 2]


def test_a_lone_item_waits_at_most_max_wait_for_company() -> None:
    gate = Gate()
    gate.release.set()
    batcher = MicroBatcher(gate, max_batch=8, max_wait_s=0.05, queue_size=8).start()
    start = time.perf_counter()
    assert batcher.submit(1).result(5) == 10
    waited = time.perf_counter() - start
    batcher.close()
    assert 0.04 <= waited < 2.0  # generous: CPU is shared with other test runs
    assert gate.batches == [[1]]


def test_full_queue_pushes_back_and_close_drains_or_cancels() -> None:
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=1, max_wait_s=0.0, queue_size=2).start()
    running = batcher.submit(0)
    time.sleep(0.2)
    queued = [batcher.submit(1), batcher.submit(2)]
    with pytest.raises(QueueFullError):
        batcher.submit(3)
    with pytest.raises(QueueFullError):
        batcher.submit(3, timeout=0.1)
    assert batcher.depth == 2
    gate.release.set()
    batcher.close(drain=True)
    assert [f.result(1) for f in [running, *queued]] == [0, 10, 20]
    with pytest.raises(BatcherClosedError):
        batcher.submit(4)

    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=1, max_wait_s=0.0, queue_size=4).start()
    running = batcher.submit(0)
    time.sleep(0.2)
    waiting = batcher.submit(1)
    threading.Timer(0.2, gate.release.set).start()
    batcher.close(drain=False)
    assert running.result(1) == 0
    assert waiting.cancelled()


def test_a_failing_batch_fails_its_futures_and_the_worker_goes_on() -> None:
    calls = []

    def flaky(values: list[int]) -> list[int]:
        calls.append(values)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return values

    batcher = MicroBatcher(flaky, max_batch=4, max_wait_s=0.0, queue_size=4).start()
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(1).result(5)
    assert batcher.submit(2).result(5) == 2
    batcher.close()


def test_recent_ids_forget_the_oldest() -> None:
    recent = RecentIds(3)
    assert all(recent.add(k) for k in "abc")
    assert not recent.add("a")  # refreshed: b is now the oldest
    assert recent.add("d")
    assert "b" not in recent
    assert "a" in recent
    assert len(recent) == 3


class Recorder(RefinerObserver):
    def __init__(self) -> None:
        self.rejected: list[RejectReason] = []
        self.duplicates = 0
        self.refined: list[RefineResult] = []

    def crop_rejected(self, source: str, reason: RejectReason) -> None:
        self.rejected.append(reason)

    def crop_duplicate(self, source: str) -> None:
        self.duplicates += 1

    def crop_refined(self, source: str, result: RefineResult, data: bytes) -> None:
        self.refined.append(result)


@pytest.fixture
def service(mobilenet: Classifier) -> Iterator[RefinerService]:
    conditioner = Conditioner(mobilenet.names, LabelSubsets.load(num_classes=1000))
    svc = RefinerService(
        mobilenet,
        conditioner,
        batching=BatchingConfig(max_batch=8, max_wait_ms=20, queue_size=16),
        limits=LimitsConfig(max_crop_bytes=2_000_000),
        observer=Recorder(),
    ).start()
    yield svc
    svc.stop()


def test_service_refines_batches_and_answers_each_key_once(service: RefinerService, crops: Crops) -> None:
    futures: list[Future[RefineResult]] = []
    for index, (jpeg, label) in enumerate(crops):
        submission = service.submit(jpeg, label, source="test", key=f"det-{index}")
        assert submission.admission is Admission.ACCEPTED
        assert submission.future is not None
        futures.append(submission.future)
    results = [f.result(30) for f in futures]
    bus = results[0].refinement
    assert bus.conditioned
    assert bus.label in {"minibus", "school bus", "trolleybus"}
    person = results[1].refinement
    assert not person.conditioned
    assert person.label == person.top_k[0].label
    assert max(r.batch_size for r in results) > 1  # submitted together, they shared batches
    again = service.submit(crops[0][0], "bus", source="test", key="det-0")
    assert again.admission is Admission.DUPLICATE
    assert again.future is None
    recorder = service.observer
    assert isinstance(recorder, Recorder)
    assert recorder.duplicates == 1
    assert len(recorder.refined) == len(crops)


def test_bad_crops_are_refused_with_a_reason_and_counted(service: RefinerService, crops: Crops) -> None:
    jpeg = crops[0][0]
    png_header = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    cases = [
        (b"", RejectReason.EMPTY, False),
        (b"not an image at all", RejectReason.NOT_JPEG, True),
        (png_header, RejectReason.NOT_JPEG, True),
        (png_header, RejectReason.UNDECODABLE, False),
        (jpeg[: len(jpeg) // 3], RejectReason.UNDECODABLE, False),
        (b"\xff\xd8\xff" + b"\x00" * 3_000_000, RejectReason.TOO_LARGE, False),
    ]
    for data, reason, jpeg_only in cases:
        with pytest.raises(CropRejectedError) as caught:
            service.submit(data, "bus", source="test", key="never-queued", jpeg_only=jpeg_only)
        assert caught.value.reason is reason, (data[:10], caught.value)
    recorder = service.observer
    assert isinstance(recorder, Recorder)
    assert recorder.rejected == [reason for _, reason, _ in cases]
    # Nothing bad was remembered: the same key still gets through with a good crop.
    assert service.refine_now(jpeg, "bus").conditioned
    assert service.submit(jpeg, "bus", source="test", key="never-queued").admission is Admission.ACCEPTED
