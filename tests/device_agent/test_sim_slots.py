"""The simulator's download slots: granted in the order asked, and a waiter whose job was superseded leaves
as soon as its device wakes it (no polling)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from device_agent.sim import DownloadSlots


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_slots_are_granted_in_order_and_a_superseded_waiter_leaves_when_woken() -> None:
    slots = DownloadSlots(1)
    assert slots.acquire(threading.Event(), lambda: False)  # a free slot: at once
    outcomes: list[tuple[str, bool]] = []
    turns = {"first": threading.Event(), "superseded": threading.Event(), "third": threading.Event()}
    superseded = threading.Event()

    def ask(name: str) -> None:
        cancelled = superseded.is_set if name == "superseded" else (lambda: False)
        outcomes.append((name, slots.acquire(turns[name], cancelled)))

    threads = {name: threading.Thread(target=ask, args=(name,)) for name in turns}
    for count, thread in enumerate(threads.values(), start=1):
        thread.start()
        wait_for(lambda: slots.waiting == count)  # noqa: B023 - called before count changes
    turns["third"].set()  # a wake that is not a grant nor a cancel: it keeps its place
    superseded.set()
    turns["superseded"].set()  # what SimDevice does on a new model/desired
    threads["superseded"].join(2.0)  # far sooner than DownloadSlots.RECHECK_S
    assert outcomes == [("superseded", False)]
    assert slots.waiting == 2
    slots.release()
    threads["first"].join(2.0)
    slots.release()
    threads["third"].join(2.0)
    assert outcomes == [("superseded", False), ("first", True), ("third", True)]
    slots.release()
    assert slots.acquire(threading.Event(), lambda: False)  # the slot came back free
