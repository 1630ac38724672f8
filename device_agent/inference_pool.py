"""A fixed set of inference threads with a bounded wait queue that refuses work instead of piling it up.

Threads suit inference because onnxruntime and OpenCV release the GIL while they compute. A job holds one
of `workers + queue_size` slots from submission until it finishes (or is cancelled while still waiting),
so at most `queue_size` jobs ever wait; one more is refused at once with `PoolSaturatedError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class PoolUnavailableError(RuntimeError):
    """The pool cannot take this job now."""


class PoolSaturatedError(PoolUnavailableError):
    """Every worker is busy and the wait queue is full; retry later."""


class PoolClosedError(PoolUnavailableError):
    """The pool has been shut down."""


class InferencePool:
    """Run callables on `workers` threads; at most `queue_size` more may wait for a free thread."""

    def __init__(self, workers: int = 2, queue_size: int = 8, *, name: str = "inference") -> None:
        if workers < 1:
            raise ValueError(f"an inference pool needs at least 1 worker, got {workers}")
        if queue_size < 0:
            raise ValueError(f"queue_size cannot be negative, got {queue_size}")
        self.workers = workers
        self.queue_size = queue_size
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0
        self._running = 0
        self._closed = False

    @property
    def capacity(self) -> int:
        """Jobs the pool holds at most: running plus waiting."""
        return self.workers + self.queue_size

    @property
    def pending(self) -> int:
        """Jobs accepted and not finished yet (running or waiting)."""
        return self._pending

    @property
    def running(self) -> int:
        return self._running

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue `fn(*args, **kwargs)`; PoolSaturatedError when no slot is free, PoolClosedError if closed."""
        if self._closed:
            raise PoolClosedError("the inference pool is shut down")
        if not self._slots.acquire(blocking=False):
            raise PoolSaturatedError(
                f"all {self.workers} inference workers are busy and {self.queue_size} requests are waiting"
            )
        with self._lock:
            self._pending += 1
        try:
            future = self._executor.submit(self._run, fn, *args, **kwargs)
        except RuntimeError as error:  # the executor was shut down between the check above and now
            self._release()
            raise PoolClosedError("the inference pool is shut down") from error
        # A job cancelled while still waiting never runs `_run`, so its slot is given back here instead.
        future.add_done_callback(self._release_if_cancelled)
        return future

    def close(self, wait: bool = True) -> None:
        """Refuse new jobs, cancel the waiting ones and (optionally) wait for the running ones."""
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> InferencePool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._lock:
            self._running += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._running -= 1
            # Released before the future resolves, so a caller that saw the result can submit again at once.
            self._release()

    def _release_if_cancelled(self, future: Future[T]) -> None:
        if future.cancelled():
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
        self._slots.release()
