"""A micro-batcher: one worker thread runs a batch function on up to `max_batch` queued items at a time.

The first item of a batch waits at most `max_wait_s` (counted from when it was queued) for company; while
the worker is busy, items pile up and the next batch takes them at once. The queue is bounded: `submit`
waits up to `timeout` for room (0: not at all) and then raises QueueFullError, so memory never grows
without limit and callers choose how to push back (MQTT flow control, HTTP 503).

    batcher = MicroBatcher(classify_many, max_batch=16, max_wait_s=0.01, queue_size=64).start()
    future = batcher.submit(item)  # concurrent.futures.Future with the item's result
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherError(RuntimeError):
    """The batcher cannot take this item now."""


class QueueFullError(BatcherError):
    """The queue stayed full for the whole timeout; retry later."""


class BatcherClosedError(BatcherError):
    """The batcher is stopping or stopped."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch took."""

    size: int
    run_s: float  # the batch function alone
    oldest_wait_s: float  # how long its first item waited in the queue


@dataclass(slots=True)
class _Item(Generic[T, R]):
    value: T
    future: Future[R]
    queued_at: float


class _Stop:
    pass


_STOP = _Stop()


class MicroBatcher(Generic[T, R]):
    """Run `process(values) -> results` (one result per value, same order) on batches of queued values."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "micro-batcher",
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch >= 1, queue_size >= 1, max_wait_s >= 0; "
                f"got {max_batch}, {queue_size}, {max_wait_s}"
            )
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.capacity = queue_size
        self._process = process
        self._on_batch = on_batch
        self._queue: queue.Queue[_Item[T, R] | _Stop] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._in_batch = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> MicroBatcher[T, R]:
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not counting the batch being processed)."""
        return self._queue.qsize()

    @property
    def in_batch(self) -> int:
        """Items in the batch being processed now."""
        return self._in_batch

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, value: T, *, timeout: float | None = 0.0) -> Future[R]:
        """Queue `value`; wait up to `timeout` s for room (None: forever), else QueueFullError."""
        if self._closed:
            raise BatcherClosedError("the batcher is stopped and takes no more work")
        future: Future[R] = Future()
        item = _Item(value, future, time.perf_counter())
        try:
            if timeout == 0:
                self._queue.put_nowait(item)
            else:
                self._queue.put(item, timeout=timeout)
        except queue.Full:
            raise QueueFullError(f"all {self.capacity} places in the queue are taken") from None
        return future

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new items; with `drain` finish the queued ones, else cancel them; wait for the worker."""
        if self._closed:
            return
        self._closed = True
        if not drain:
            self._cancel_queued()
        if self._thread.is_alive():
            self._queue.put(_STOP)  # the worker keeps taking items, so there is room soon
            self._thread.join(timeout)

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Item):
                item.future.cancel()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch = [first]
            deadline = first.queued_at + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Item[T, R]]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        self._in_batch = len(live)
        started = time.perf_counter()
        try:
            results = self._process([item.value for item in live])
            if len(results) != len(live):
                raise RuntimeError(
                    f"the batch function returned {len(results)} results for {len(live)} items"
                )
        except Exception as error:
            log.exception("a batch of %d failed", len(live))
            for item in live:
                item.future.set_exception(error)
            return
        finally:
            self._in_batch = 0
        elapsed = time.perf_counter() - started
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)  # runs the item's callbacks here, in the worker thread
        if self._on_batch is not None:
            try:
                self._on_batch(BatchStats(len(live), elapsed, started - live[0].queued_at))
            except Exception:
                log.exception("the batch observer failed")
