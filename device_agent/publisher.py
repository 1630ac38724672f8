"""Drains the durable outbox to MQTT: publish oldest first, delete a row only when its PUBACK arrives.

One background thread publishes while the session is connected and deletes acknowledged rows in batches
(one transaction for up to `delete_batch` rows, or whatever is acknowledged when the thread would otherwise
wait). `window` is paho's own (`MqttSettings.max_inflight`): the rows it keeps on the wire awaiting PUBACK.
Two windows are handed to paho: it queues the second, and its own thread answers each PUBACK with the next
PUBLISH while this thread refills a whole window at a time. When the broker's Receive Maximum is below
`window`, no more than that maximum are handed over, so paho cannot exceed it. While disconnected it
publishes nothing new: rows accumulate in the outbox.

Two lanes, each FIFO: detections (and events), and crops, published together in seq order (one FIFO) while
the link is good. Crops are held (they wait in the outbox, within its caps, and local labels stand) while
the link is down or its measured round trip is above `crop_hold_rtt_ms`, until one falls below
`crop_resume_rtt_ms` (hysteresis, so a link near the threshold does not flap); meanwhile detections go on
alone, still FIFO, and once released the held crops go first (they are older). While crops are held and no
detection is going out to measure the link, one crop per probe interval goes out as the probe.

Where rows come from: the publisher listens to the outbox, which hands it the rows each `enqueue` committed
(with their seq), so the live path never reads SQLite back. It keeps at most `memory_rows` / `memory_bytes`
of them per lane; whatever it does not hold (rows stored before it started, or beyond those bounds during
an outage) it reads from the outbox in seq order. Kept rows are a cache: the outbox stays the truth.

What is re-sent after a reconnect: rows already handed to paho stay in paho's memory until their PUBACK and
paho re-sends them itself after the next CONNACK, with or without a session on the broker
(`fleet_protocol.mqtt`). Publishing them again would only add duplicates, so the publisher re-publishes a
row only when paho gave up on it: not queued, a QoS 0 message lost with the link, or a PUBACK with a reason
code worth retrying. Rows the broker refuses for good (not authorized, bad topic, bad payload format) are
logged, deleted and counted as `rejected`, so one bad row cannot block the FIFO; so are rows larger than the
contract allows (MAX_CROP_BYTES, MAX_PAYLOAD_BYTES), which are never handed to paho. After a restart of the
agent, the outbox is published again from its oldest row: duplicates carry the same `msg_id`, nothing is lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter

from device_agent.outbox import DELETE_CHUNK, MessageKind, Outbox, OutboxRow
from fleet_protocol.mqtt import PublishHandle, PublishingSession
from fleet_protocol.payloads import MAX_CROP_BYTES, MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

# PUBACK reason codes that re-sending the same message cannot fix.
PERMANENT_FAILURES = frozenset(
    {
        0x87,  # not authorized
        0x90,  # topic name invalid
        0x95,  # packet too large
        0x99,  # payload format invalid
    }
)
# Rows handed to paho, in windows: paho keeps one window on the wire and sends the next queued row from its
# own thread on each PUBACK, as when a client publishes everything at once; this thread refills a window at
# a time, instead of one row per PUBACK (measured: 5-8% less CPU per message on a backlog drain).
QUEUE_AHEAD = 2
MEMORY_ROWS = 5_000
MEMORY_BYTES = 8 * 1024 * 1024
_BY_SEQ = attrgetter("seq")


@dataclass(frozen=True, slots=True)
class PublisherCounters:
    published: int  # publish calls, first sends and re-publishes
    acked: int  # rows acknowledged by the broker and deleted
    resent: int  # rows unacknowledged at a reconnect (paho sends them again) plus rows re-published here
    rejected: int  # rows refused for good by the broker (deleted, not retried)
    inflight: int  # rows handed to paho and not yet acknowledged
    crops_held: bool = False  # crops wait in the outbox: the link is down or slow


class CropHold:
    """Whether crops wait, judged on each measured round trip: held above `hold_ms`, released below
    `resume_ms` (<= hold_ms; None: the same), unchanged in between. `hold_ms` None: never held."""

    def __init__(self, hold_ms: float | None, resume_ms: float | None = None) -> None:
        resume = hold_ms if resume_ms is None else resume_ms
        if hold_ms is not None and not (
            resume is not None and math.isfinite(hold_ms) and math.isfinite(resume) and 0 <= resume <= hold_ms
        ):
            raise ValueError(
                f"crop hold thresholds must be finite with 0 <= resume <= hold, got hold {hold_ms!r} ms and "
                f"resume {resume_ms!r} ms"
            )
        self.hold_ms, self.resume_ms = hold_ms, resume
        self.held = False

    @property
    def enabled(self) -> bool:
        return self.hold_ms is not None

    def observe(self, rtt_ms: float) -> bool:
        """Judge one round trip; returns whether crops are held now."""
        if self.hold_ms is None or self.resume_ms is None:
            self.held = False
        elif not self.held and rtt_ms > self.hold_ms:
            self.held = True
            log.warning(
                "link round trip %.0f ms is over %.0f ms: crops wait in the outbox until one under %.0f ms",
                rtt_ms,
                self.hold_ms,
                self.resume_ms,
            )
        elif self.held and rtt_ms < self.resume_ms:
            self.held = False
            log.info("link round trip %.0f ms: held crops go out again", rtt_ms)
        return self.held


class _Lane:
    """One FIFO lane: the seq handed out last, and the rows kept in memory for it (a contiguous run)."""

    __slots__ = ("crops", "cursor", "kept", "kept_bytes", "kept_from", "pending")

    def __init__(self, crops: bool) -> None:
        self.crops = crops
        self.cursor = 0  # highest seq of this lane taken (handed to paho or pending), or known not to exist
        self.pending: deque[OutboxRow] = deque()  # taken but put back: the next to hand out, in seq order
        self.kept: deque[OutboxRow] = deque()
        self.kept_bytes = 0
        # Every row of this lane with kept_from <= seq <= the publisher's kept_to is in `kept` (or was taken
        # or dropped); None: nothing is known in memory, read the outbox.
        self.kept_from: int | None = None

    def forget(self, kept_from: int | None) -> None:
        self.kept.clear()
        self.kept_bytes = 0
        self.kept_from = kept_from

    def pop_through(self, seq: int) -> None:
        kept = self.kept
        while kept and kept[0].seq <= seq:
            self.kept_bytes -= len(kept.popleft().message.payload)

    def drop_through(self, seq: int) -> None:
        """Forget the rows up to `seq`: they are gone from the outbox."""
        self.pop_through(seq)
        while self.pending and self.pending[0].seq <= seq:
            self.pending.popleft()

    def drop_created_before(self, cutoff: float) -> None:
        """Forget the rows created before `cutoff`: they expired (the others stay, in order)."""
        if any(row.message.created_at < cutoff for row in self.kept):
            self.kept = deque(row for row in self.kept if row.message.created_at >= cutoff)
            self.kept_bytes = sum(len(row.message.payload) for row in self.kept)
        if any(row.message.created_at < cutoff for row in self.pending):
            self.pending = deque(row for row in self.pending if row.message.created_at >= cutoff)

    def take(self, count: int) -> list[OutboxRow]:
        kept, taken = self.kept, list[OutboxRow]()
        while kept and len(taken) < count:
            row = kept.popleft()
            self.kept_bytes -= len(row.message.payload)
            taken.append(row)
        if taken:
            self.cursor = taken[-1].seq
        return taken


class OutboxPublisher:
    """Background drain of an `Outbox` through a `PublishingSession`: `start`, `notify`, `flush`, `stop`."""

    def __init__(
        self,
        outbox: Outbox,
        session: PublishingSession,
        *,
        window: int = 200,
        poll_interval_s: float = 0.25,
        delete_interval_s: float = 0.005,
        delete_batch: int = 256,
        retry_delay_s: float = 1.0,
        expire_interval_s: float = 60.0,
        on_rtt: Callable[[float], None] | None = None,
        rtt_probe_interval_s: float = 10.0,
        crop_hold_rtt_ms: float | None = None,
        crop_resume_rtt_ms: float | None = None,
        memory_rows: int = MEMORY_ROWS,
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._outbox = outbox
        self._session = session
        self.window = window
        self._poll_interval_s = poll_interval_s
        self._delete_interval_s = delete_interval_s
        self._delete_batch = min(delete_batch, DELETE_CHUNK)
        self._retry_delay_s = retry_delay_s
        self._expire_interval_s = expire_interval_s
        self._on_rtt = on_rtt
        self._rtt_probe_interval_s = rtt_probe_interval_s
        self._crop_hold = CropHold(crop_hold_rtt_ms, crop_resume_rtt_ms)
        self._memory_rows = memory_rows
        self._memory_bytes = memory_bytes

        self._lock = threading.Lock()
        self._drained_changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

        # Guarded by _lock: the drain thread, paho's thread (acks), the enqueuing thread (rows_added) and
        # callers of notify/flush share them.
        self._window_now = window  # the window, capped by the broker's Receive Maximum
        self._main = _Lane(crops=False)
        self._crops = _Lane(crops=True)
        self._kept_to = 0  # highest seq of the contiguous run the lanes keep
        self._max_seen = 0  # highest seq the outbox reported; above _kept_to only after a gap
        self._inflight: dict[int, OutboxRow] = {}
        self._acked: list[OutboxRow] = []  # acknowledged, to delete in the next batch
        self._retry: dict[int, OutboxRow] = {}  # to publish again (paho gave up on them)
        self._retry_at = 0.0
        self._generation = 0  # bumped by notify(); flush() waits for a drain that saw its generation
        self._drained_generation = -1
        self._published = self._acked_total = self._resent = self._rejected = 0
        # Link RTT: publish -> PUBACK of one row per probe interval. It includes the wait behind earlier
        # unacknowledged messages, so it rises when the link is congested, which is what it is used for.
        self._probe: tuple[int, float] | None = None  # (seq, publish time)
        self._next_probe_at = 0.0

        session.add_connect_listener(self._on_connect)

    # ---- public API ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the outbox publisher is already running")
        with self._lock:  # rows enqueued while stopped were not seen: read the outbox until new ones come
            self._main.forget(None)
            self._crops.forget(None)
            self._kept_to = self._max_seen = 0
        self._outbox.add_listener(self)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New rows were enqueued: publish them now instead of at the next poll."""
        with self._lock:
            self._generation += 1
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every row enqueued before this call is acknowledged and deleted; False on timeout.

        Crops held by a slow link do not count: they stay in the outbox for later.
        """
        self.notify()
        with self._lock:
            target = self._generation
            return self._drained_changed.wait_for(lambda: self._drained_generation >= target, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the drain thread; unacknowledged rows stay in the outbox for the next run."""
        self._outbox.remove_listener(self)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("outbox publisher thread did not stop within %.1f s", timeout)
            self._thread = None

    def set_crop_hold(self, hold_ms: float | None, resume_ms: float | None = None) -> None:
        """New crop hold thresholds (None: hold only while disconnected), judged on a round trip measured
        now: the next row published (a held crop if nothing else goes out) is a probe."""
        crop_hold = CropHold(hold_ms, resume_ms)
        with self._lock:
            crop_hold.held = self._crop_hold.held and crop_hold.enabled
            self._crop_hold = crop_hold
            self._next_probe_at = 0.0
        self._wake.set()

    @property
    def crops_held(self) -> bool:
        """Crops wait in the outbox: the link is down, or its last round trip was too slow."""
        return self._crop_hold.held or not self._session.connected

    def counters(self) -> PublisherCounters:
        with self._lock:
            return PublisherCounters(
                published=self._published,
                acked=self._acked_total,
                resent=self._resent,
                rejected=self._rejected,
                inflight=len(self._inflight),
                crops_held=self._crop_hold.held or not self._session.connected,
            )

    # ---- outbox listener (the enqueuing thread) ----------------------------------------------------------

    def rows_added(self, rows: Sequence[OutboxRow]) -> None:
        with self._lock:
            first = rows[0].seq
            main, crops = self._main, self._crops
            for lane in (main, crops):
                # after a gap (rows committed while stopped, or commits reported out of order) memory starts
                # over: the rows below `first` are read from the outbox
                if first != self._kept_to + 1 or lane.kept_from is None:
                    lane.forget(first)
            for row in rows:
                lane = crops if row.message.kind is MessageKind.CROP else main
                lane.kept.append(row)
                lane.kept_bytes += len(row.message.payload)
            self._kept_to = rows[-1].seq
            self._max_seen = max(self._max_seen, self._kept_to)
            for lane in (main, crops):
                if len(lane.kept) > self._memory_rows or lane.kept_bytes > self._memory_bytes:
                    lane.forget(self._kept_to + 1)  # they wait in the outbox; read back when their turn comes
        self._wake.set()

    def rows_dropped(self, kinds: frozenset[MessageKind], up_to_seq: int) -> None:
        with self._lock:
            for lane in (self._main, self._crops):
                if lane.crops == (MessageKind.CROP in kinds):
                    lane.drop_through(up_to_seq)

    def rows_expired(self, cutoff: float) -> None:
        with self._lock:
            self._main.drop_created_before(cutoff)
            self._crops.drop_created_before(cutoff)

    # ---- drain thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        next_expire = time.monotonic() + self._expire_interval_s
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                if time.monotonic() >= next_expire:
                    self._outbox.expire()
                    next_expire = time.monotonic() + self._expire_interval_s
                sent = self._drain_once()
            except Exception:
                # A transient SQLite error (disk full, busy) must not end publishing for good.
                log.exception("outbox publisher: draining failed; retrying in %.1f s", self._poll_interval_s)
                sent = 0
                self._stopping.wait(self._poll_interval_s)
            if sent == 0:
                self._wake.wait(self._idle_wait())
        self._delete_acked()

    def _drain_once(self) -> int:
        """Publish what the window allows, delete acknowledged rows; returns how many rows were published.

        Deletes wait for a full batch while there is publishing to do, else (window full, nothing new,
        disconnected) happen at once: SQLite then works while paho's thread reads the PUBACKs.
        """
        if not self._session.connected:
            self._delete_acked()
            self._note_if_empty_while_disconnected()
            return 0
        generation, rows = self._next_rows()
        publish = self._publish
        for row in rows:
            publish(row)
        if not rows:
            self._delete_acked()
            self._note_if_drained(generation)
            return 0
        if len(self._acked) >= self._delete_batch:
            self._delete_acked()
        return len(rows)

    def _next_rows(self) -> tuple[int, list[OutboxRow]]:
        rows: list[OutboxRow] = []
        with self._lock:
            generation = self._generation
            self._window_now = min(self.window, self._session.receive_maximum)
            free = self._handed_limit() - len(self._inflight)
            if free < self._window_now:
                free = 0  # refill a window at a time: paho's thread sends the queued rows meanwhile
            if free > 0 and self._retry and time.monotonic() >= self._retry_at:
                rows = sorted(self._retry.values(), key=_BY_SEQ)[:free]
                for row in rows:
                    del self._retry[row.seq]
                self._resent += len(rows)
            held = self._crop_hold.held
        if free <= 0:
            return generation, []
        want = free - len(rows)
        main = self._lane_rows(self._main, want)
        if not held:
            crops = self._lane_rows(self._crops, want)
            if crops:  # one FIFO: the oldest `want` of both lanes; the rest waits at the head of its lane
                merged = sorted(main + crops, key=_BY_SEQ)
                main, rest = merged[:want], merged[want:]
                with self._lock:
                    for row in reversed(rest):
                        lane = self._crops if row.message.kind is MessageKind.CROP else self._main
                        lane.pending.appendleft(row)
        rows += main
        if held and not rows and self._probe_due():
            rows = self._lane_rows(self._crops, 1)  # no detection to measure the link with: one crop
        if not rows:
            return generation, rows
        with self._lock:
            for row in rows:
                self._inflight[row.seq] = row
            self._published += len(rows)
            if self._probe is None and (self._on_rtt is not None or self._crop_hold.enabled):
                now = time.monotonic()
                if now >= self._next_probe_at:
                    self._probe = (rows[0].seq, now)
        return generation, rows

    def _handed_limit(self) -> int:
        """How many rows paho may hold unacknowledged: two windows, where paho's own window (`window`) is
        within the broker's Receive Maximum; else no more than that maximum (paho would send them all)."""
        if self.window <= self._session.receive_maximum:
            return QUEUE_AHEAD * self.window
        return self._window_now

    def _probe_due(self) -> bool:
        with self._lock:
            return self._probe is None and time.monotonic() >= self._next_probe_at

    def _lane_rows(self, lane: _Lane, count: int) -> list[OutboxRow]:
        """The next `count` rows of `lane` after its cursor, from memory where it holds them, else SQLite."""
        with self._lock:
            taken = [lane.pending.popleft() for _ in range(min(count, len(lane.pending)))]
        for _ in range(4):  # each round either fills `taken` or moves the cursor up to what memory covers
            if len(taken) >= count:
                break
            with self._lock:
                lane.pop_through(lane.cursor)
                kept_from = lane.kept_from
                if kept_from is not None and lane.cursor >= kept_from - 1:
                    taken += lane.take(count - len(taken))
                    if len(taken) >= count:
                        break
                    lane.cursor = max(lane.cursor, self._kept_to)  # memory held all of the lane up to it
                    if self._max_seen <= self._kept_to:
                        break
                    kept_from = None  # rows above kept_to were reported out of order: read them
                after = lane.cursor
            rows = self._outbox.peek(count - len(taken), after, crops=lane.crops, before_seq=kept_from)
            with self._lock:
                rows = [row for row in rows if row.seq > lane.cursor]
                if rows:
                    taken += rows
                    lane.cursor = rows[-1].seq
                if len(taken) >= count:
                    break
                if kept_from is None:
                    break  # the outbox holds nothing more for this lane
                lane.cursor = max(lane.cursor, kept_from - 1)  # nothing below what memory holds
        return taken

    def _publish(self, row: OutboxRow) -> None:
        message = row.message
        limit = MAX_CROP_BYTES if message.kind is MessageKind.CROP else MAX_PAYLOAD_BYTES
        if len(message.payload) > limit:
            # The pipeline never stores one (an older outbox might): Mosquitto would refuse it in a way
            # paho can only answer by reconnecting and sending it again, forever, blocking the FIFO.
            log.error(
                "outbox row %d (msg_id %s) is %d bytes, over the contract's %d for a %s; dropped",
                row.seq,
                message.msg_id,
                len(message.payload),
                limit,
                message.kind.value,
            )
            self._settle(row, rejected=True)
            return
        try:
            self._session.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                properties=message.properties,
                on_ack=partial(self._on_ack, row),
            )
        except ValueError as exc:  # paho refuses the topic or payload: re-sending cannot help
            log.error(
                "outbox row %d (msg_id %s) cannot be published: %s; dropped", row.seq, message.msg_id, exc
            )
            self._settle(row, rejected=True)

    def _delete_acked(self) -> None:
        with self._lock:
            rows, self._acked = self._acked, []
        for start in range(0, len(rows), DELETE_CHUNK):
            self._outbox.acknowledge(rows[start : start + DELETE_CHUNK])

    def _note_if_drained(self, generation: int) -> None:
        with self._lock:
            if not self._inflight and not self._acked and not self._retry:
                self._drained_generation = max(self._drained_generation, generation)
                self._drained_changed.notify_all()

    def _note_if_empty_while_disconnected(self) -> None:
        """flush() on an empty outbox succeeds without a broker; peeks only when notify() asked."""
        with self._lock:
            generation = self._generation
            if generation <= self._drained_generation or self._main.pending:
                return
            if self._crops.pending and not self._crop_hold.held:
                return
            lanes = [(self._main.cursor, False)]
            if not self._crop_hold.held:
                lanes.append((self._crops.cursor, True))
        if not any(self._outbox.peek(1, after_seq=cursor, crops=crops) for cursor, crops in lanes):
            self._note_if_drained(generation)

    def _idle_wait(self) -> float:
        with self._lock:
            if self._acked:
                return self._delete_interval_s
            if self._retry:
                return max(0.0, min(self._poll_interval_s, self._retry_at - time.monotonic()))
        return self._poll_interval_s

    # ---- callbacks (paho's thread, or the drain thread from inside publish) ----------------------------

    def _on_ack(self, row: OutboxRow, handle: PublishHandle) -> None:
        if handle.ok:
            self._settle(row)
        elif handle.reason_code in PERMANENT_FAILURES:
            log.error(
                "broker refused msg_id %s for good (reason 0x%02x); dropped",
                row.message.msg_id,
                handle.reason_code,
            )
            self._settle(row, rejected=True)
        else:
            why = handle.error or f"reason 0x{handle.reason_code or 0:02x}"
            log.warning("msg_id %s not accepted (%s); re-publishing it", row.message.msg_id, why)
            with self._lock:
                self._inflight.pop(row.seq, None)
                self._retry[row.seq] = row
                if self._probe is not None and self._probe[0] == row.seq:
                    self._probe = None
                self._retry_at = time.monotonic() + self._retry_delay_s

    def _settle(self, row: OutboxRow, *, rejected: bool = False) -> None:
        """The row is done with: delete it in the next batch."""
        rtt_ms = None
        with self._lock:
            self._inflight.pop(row.seq, None)
            self._acked.append(row)
            if rejected:
                self._rejected += 1
            else:
                self._acked_total += 1
            if self._probe is not None and self._probe[0] == row.seq:
                now = time.monotonic()
                rtt_ms = (now - self._probe[1]) * 1e3
                self._probe, self._next_probe_at = None, now + self._rtt_probe_interval_s
                self._crop_hold.observe(rtt_ms)
            wake = len(self._acked) >= self._delete_batch or len(self._inflight) <= self._window_now
        if wake and not self._wake.is_set():  # is_set is a plain read; set() takes a lock
            self._wake.set()
        if rtt_ms is not None and self._on_rtt is not None:
            try:
                self._on_rtt(rtt_ms)
            except Exception:
                log.exception("the link RTT callback failed")

    def _on_connect(self, session_present: bool) -> None:
        with self._lock:
            # paho re-sends these by itself right after this callback (fleet_protocol.mqtt)
            self._resent += len(self._inflight)
            self._probe = None  # its round trip would measure the outage
            if self._inflight:
                log.info(
                    "reconnected (session present: %s): paho re-sends %d unacknowledged message(s)",
                    session_present,
                    len(self._inflight),
                )
        self._wake.set()
