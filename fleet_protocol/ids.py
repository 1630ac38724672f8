"""Message and detection ids: ULIDs, lexicographically sortable and monotonic within a process.

How monotonicity is kept: one process-wide generator remembers the last id's millisecond and its 80 random
bits, under a lock. An id in a later millisecond draws fresh randomness; an id in the same millisecond (or
after the wall clock stepped back) keeps the last millisecond and adds one to the random bits, so every id
sorts after the previous one. In the astronomically rare case the 80 bits overflow, the timestamp moves
one millisecond ahead. A forked child starts from fresh randomness, so parent and child never collide.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections.abc import Callable

from ulid import ULID

# Canonical ULID text: 26 upper-case Crockford base32 characters, the first at most '7' (48-bit time).
# Upper case only, so each id has exactly one spelling and dedupe keys compare equal.
ULID_PATTERN = r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$"
ULID_LENGTH = 26

_RANDOM_BYTES = 10
_MAX_RANDOM = (1 << (8 * _RANDOM_BYTES)) - 1
_ULID_RE = re.compile(ULID_PATTERN)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class UlidGenerator:
    """Thread-safe monotonic ULIDs; `clock_ms` gives Unix time in ms, `random_bytes(n)` n random bytes."""

    def __init__(
        self, clock_ms: Callable[[], int] = wall_clock_ms, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._clock_ms = clock_ms
        self._random_bytes = random_bytes
        self.reset()
        if hasattr(os, "register_at_fork"):
            this = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _reset_if_alive(this))

    def reset(self) -> None:
        """Forget the last id (a forked child must not continue the parent's sequence)."""
        # A fresh lock too: a child forked while another thread held the lock would inherit it held.
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def next(self) -> ULID:
        now_ms = self._clock_ms()
        # Drawn before taking the lock: os.urandom lets other threads run, and they must not queue on the lock
        # meanwhile. Only when the millisecond moved on (a guess, checked again under the lock).
        fresh = self._fresh_random() if now_ms > self._last_ms else None
        with self._lock:
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                self._last_random = self._fresh_random() if fresh is None else fresh
            elif self._last_random < _MAX_RANDOM:
                self._last_random += 1
            else:
                self._last_ms, self._last_random = self._last_ms + 1, self._fresh_random()
            raw = self._last_ms.to_bytes(6, "big") + self._last_random.to_bytes(_RANDOM_BYTES, "big")
        return ULID.from_bytes(raw)

    def _fresh_random(self) -> int:
        return int.from_bytes(self._random_bytes(_RANDOM_BYTES), "big")


def _reset_if_alive(ref: weakref.ReferenceType[UlidGenerator]) -> None:
    generator = ref()
    if generator is not None:
        generator.reset()


_GENERATOR = UlidGenerator()


def new_msg_id() -> str:
    """A new message id: a ULID that sorts after every id this process made before (thread-safe)."""
    return str(_GENERATOR.next())


def new_det_id() -> str:
    """A new detection id (the crop's correlation data and the refiner's dedupe key); same form as msg ids."""
    return str(_GENERATOR.next())


def is_ulid(value: str) -> bool:
    """True when `value` is a ULID in canonical (upper-case) text form."""
    return _ULID_RE.fullmatch(value) is not None
