"""Drains the durable outbox to MQTT: publish oldest first, delete a row only when its PUBACK arrives.

One background thread publishes while the session is connected and deletes acknowledged rows in batches
(one transaction for up to `delete_batch` rows, or whatever is acknowledged when the thread would otherwise
wait). At most `window` rows are handed to paho and not yet acknowledged (never more than the broker's
Receive Maximum); paho keeps `MqttSettings.max_inflight` of them on the wire and queues the rest, so its own
thread answers each PUBACK with the next PUBLISH. While disconnected it publishes nothing new: rows
accumulate in the outbox.

What is re-sent after a reconnect: rows already handed to paho stay in paho's memory until their PUBACK and
paho re-sends them itself after the next CONNACK, with or without a session on the broker
(`fleet_protocol.mqtt`). Publishing them again would only add duplicates, so the publisher re-publishes a
row only when paho gave up on it: not queued, a QoS 0 message lost with the link, or a PUBACK with a reason
code worth retrying. Rows the broker refuses for good (not authorized, bad topic, bad payload format) are
logged, deleted and counted as `rejected`, so one bad row cannot block the FIFO. After a restart of the
agent, the outbox is published again from its oldest row: duplicates carry the same `msg_id`, nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from device_agent.outbox import Outbox, OutboxRow
from fleet_protocol.mqtt import MqttSession, PublishHandle

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


@dataclass(frozen=True, slots=True)
class PublisherCounters:
    published: int  # publish calls, first sends and re-publishes
    acked: int  # rows acknowledged by the broker and deleted
    resent: int  # rows unacknowledged at a reconnect (paho sends them again) plus rows re-published here
    rejected: int  # rows refused for good by the broker (deleted, not retried)
    inflight: int  # rows handed to paho and not yet acknowledged


class OutboxPublisher:
    """Background drain of an `Outbox` through an `MqttSession`: `start`, `notify`, `flush`, `stop`."""

    def __init__(
        self,
        outbox: Outbox,
        session: MqttSession,
        *,
        window: int = 200,
        poll_interval_s: float = 0.25,
        delete_interval_s: float = 0.005,
        delete_batch: int = 256,
        retry_delay_s: float = 1.0,
        expire_interval_s: float = 60.0,
        on_rtt: Callable[[float], None] | None = None,
        rtt_probe_interval_s: float = 10.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._outbox = outbox
        self._session = session
        self.window = window
        self._poll_interval_s = poll_interval_s
        self._delete_interval_s = delete_interval_s
        self._delete_batch = delete_batch
        self._retry_delay_s = retry_delay_s
        self._expire_interval_s = expire_interval_s
        self._on_rtt = on_rtt
        self._rtt_probe_interval_s = rtt_probe_interval_s

        self._lock = threading.Lock()
        self._drained_changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

        # Guarded by _lock: the drain thread, paho's thread (acks) and callers of notify/flush share them.
        self._window_now = window  # the window, capped by the broker's Receive Maximum
        self._cursor = 0  # highest seq handed to paho; the next peek starts after it
        self._inflight: set[int] = set()
        self._acked: list[int] = []  # acknowledged, to delete in the next batch
        self._retry: set[int] = set()  # to publish again (paho gave up on them)
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
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New rows were enqueued: publish them now instead of at the next poll."""
        with self._lock:
            self._generation += 1
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every row enqueued before this call is acknowledged and deleted; False on timeout."""
        self.notify()
        with self._lock:
            target = self._generation
            return self._drained_changed.wait_for(lambda: self._drained_generation >= target, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the drain thread; unacknowledged rows stay in the outbox for the next run."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("outbox publisher thread did not stop within %.1f s", timeout)
            self._thread = None

    def counters(self) -> PublisherCounters:
        with self._lock:
            return PublisherCounters(
                published=self._published,
                acked=self._acked_total,
                resent=self._resent,
                rejected=self._rejected,
                inflight=len(self._inflight),
            )

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
        for row in rows:
            self._publish(row)
        if not rows:
            self._delete_acked()
            self._note_if_drained(generation)
            return 0
        with self._lock:
            backlog = len(self._acked)
        if backlog >= self._delete_batch:
            self._delete_acked()
        return len(rows)

    def _next_rows(self) -> tuple[int, list[OutboxRow]]:
        with self._lock:
            generation = self._generation
            if self._retry and time.monotonic() >= self._retry_at:
                self._cursor = min(self._cursor, min(self._retry) - 1)
                self._resent += len(self._retry)
                self._retry.clear()
            cursor = self._cursor
            busy = self._inflight | set(self._acked)
            self._window_now = min(self.window, self._session.receive_maximum)
            free = self._window_now - len(self._inflight)
        if free <= 0:
            return generation, []
        skipped = sum(1 for seq in busy if seq > cursor)  # only after a retry rewound the cursor
        rows = [row for row in self._outbox.peek(free + skipped, after_seq=cursor) if row.seq not in busy]
        rows = rows[:free]
        with self._lock:
            if rows:
                self._cursor = max(self._cursor, rows[-1].seq)
            self._inflight.update(row.seq for row in rows)
            self._published += len(rows)
            if rows and self._on_rtt is not None and self._probe is None:
                now = time.monotonic()
                if now >= self._next_probe_at:
                    self._probe = (rows[0].seq, now)
        return generation, rows

    def _publish(self, row: OutboxRow) -> None:
        message = row.message
        try:
            self._session.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                properties=message.properties,
                on_ack=partial(self._on_ack, row.seq, message.msg_id),
            )
        except ValueError as exc:  # paho refuses the topic or payload: re-sending cannot help
            log.error(
                "outbox row %d (msg_id %s) cannot be published: %s; dropped", row.seq, message.msg_id, exc
            )
            self._settle(row.seq, rejected=True)

    def _delete_acked(self) -> None:
        with self._lock:
            seqs, self._acked = self._acked, []
        if seqs:
            self._outbox.delete(seqs)

    def _note_if_drained(self, generation: int) -> None:
        with self._lock:
            if not self._inflight and not self._acked and not self._retry:
                self._drained_generation = max(self._drained_generation, generation)
                self._drained_changed.notify_all()

    def _note_if_empty_while_disconnected(self) -> None:
        """flush() on an empty outbox succeeds without a broker; peeks only when notify() asked."""
        with self._lock:
            generation, cursor = self._generation, self._cursor
            if generation <= self._drained_generation:
                return
        if not self._outbox.peek(1, after_seq=cursor):
            self._note_if_drained(generation)

    def _idle_wait(self) -> float:
        with self._lock:
            if self._acked:
                return self._delete_interval_s
            if self._retry:
                return max(0.0, min(self._poll_interval_s, self._retry_at - time.monotonic()))
        return self._poll_interval_s

    # ---- callbacks (paho's thread, or the drain thread from inside publish) ----------------------------

    def _on_ack(self, seq: int, msg_id: str, handle: PublishHandle) -> None:
        if handle.ok:
            self._settle(seq)
        elif handle.reason_code in PERMANENT_FAILURES:
            log.error(
                "broker refused msg_id %s for good (reason 0x%02x); dropped", msg_id, handle.reason_code
            )
            self._settle(seq, rejected=True)
        else:
            why = handle.error or f"reason 0x{handle.reason_code or 0:02x}"
            log.warning("msg_id %s not accepted (%s); re-publishing it", msg_id, why)
            with self._lock:
                self._inflight.discard(seq)
                self._retry.add(seq)
                if self._probe is not None and self._probe[0] == seq:
                    self._probe = None
                self._retry_at = time.monotonic() + self._retry_delay_s

    def _settle(self, seq: int, *, rejected: bool = False) -> None:
        """The row is done with: delete it in the next batch."""
        rtt_ms = None
        with self._lock:
            self._inflight.discard(seq)
            self._acked.append(seq)
            if rejected:
                self._rejected += 1
            else:
                self._acked_total += 1
            if self._probe is not None and self._probe[0] == seq:
                now = time.monotonic()
                rtt_ms = (now - self._probe[1]) * 1e3
                self._probe, self._next_probe_at = None, now + self._rtt_probe_interval_s
            wake = len(self._acked) >= self._delete_batch or len(self._inflight) <= self._window_now // 2
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
