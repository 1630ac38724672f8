"""The device agent's durable outbox: every detection, crop and event is written here before it is published.

A SQLite database in WAL mode. The pipeline thread `enqueue`s batches; the publisher thread publishes the
oldest rows and deletes each row when the broker's PUBACK arrives (at-least-once, per-device FIFO, `msg_id`
stable across retries). Listeners (the publisher) are handed the rows each `enqueue` committed, with their
`seq`, so the live path never reads back what it just wrote; `peek` reads what was stored before (a backlog
after a restart, or more than a listener keeps in memory). The outbox is bounded by payload bytes and age:
when full it drops the oldest crops first, then (only if configured) the oldest detections and events, and
counts every drop in a table of the same database, so telemetry still reports them after a restart.

Durability: `synchronous=NORMAL` in WAL mode means a commit appends to the WAL file without fsync. A committed
transaction survives the process dying (`kill -9`, OOM killer, segfault): the data is in the OS page cache and
the next open replays the WAL. It does NOT survive the OS crashing or the power going off before the kernel
writes the WAL back: the last transactions since the latest checkpoint may be lost (the database stays
consistent, never corrupt). `synchronous=FULL` fsyncs the WAL on every commit, so a commit also survives power
loss, at the cost of one fsync per `enqueue`/`delete` (a few ms on eMMC/SD cards; batch to amortise it).

Threads: one SQLite connection per thread (created on first use), not one connection behind a lock. In WAL
mode readers never wait for the writer, so the publisher's `peek` runs while the pipeline commits a batch (or
its connection runs an automatic checkpoint, which fsyncs the database file); a lock would queue every call
behind the others. The two writers (`enqueue`, `delete`) are serialised by SQLite itself: each write starts
with `BEGIN IMMEDIATE`, which takes the write lock up front and waits up to the busy timeout, instead of
failing at once with SQLITE_BUSY when a read transaction tries to upgrade to a write.

Files on disk: the database file and its `-wal` file are bounded as `OutboxLimits` states: the WAL is
checkpointed (and truncated) at a size scaled to `max_bytes`, and pages freed by deletes and drops are reused
before the file grows. Each `enqueue` writes as few pages as it can (one row in the table, one entry in the
`created_at` index, crops one more in the crop index, and one totals page), since at one message per
transaction the WAL bytes written per commit, not Python, set the pace.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from fleet_protocol.mqtt import NO_PROPERTIES, MessageProperties

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10 (a supported device runtime) has no StrEnum
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
# The WAL is checkpointed once it holds max_bytes / WAL_FRACTION, within these bounds, and truncated back to
# that size after it grew past it (a batch larger than that must fit in the WAL whole).
# Small pages pack the outbox densely: a message larger than a page keeps a few bytes in its B-tree leaf and
# the rest in overflow pages that it fills, so at most part of one page per message is slack (4 KiB pages
# leave up to half the file empty for messages just over 2 KiB, and for detections left behind when the
# crops between them are dropped). A commit also writes 8x fewer WAL bytes per page it changes.
PAGE_SIZE = 512
# On disk beyond the payload: per message at most (metadata, index entries, slack), and in all (schema).
MESSAGE_OVERHEAD_BYTES = 1536
FIXED_OVERHEAD_BYTES = 16 * 1024
WAL_FRAME_HEADER = 24
MIN_WAL_BYTES = 32 * 1024
MAX_WAL_BYTES = 4 * 1024 * 1024
WAL_FRACTION = 16
# SQLite's default limit on host parameters in one statement is 999 before 3.32.
DELETE_CHUNK = 500
FULL_WARNING_INTERVAL_S = 60.0
Synchronous = Literal["NORMAL", "FULL"]


class MessageKind(StrEnum):
    """What a message carries; when the outbox is full crops go first, detections/events only if allowed."""

    DETECTION = "detection"
    CROP = "crop"
    EVENT = "event"


EXPIRED = "expired"
KEPT_KINDS = (MessageKind.DETECTION.value, MessageKind.EVENT.value)


@lru_cache(maxsize=256)
def properties_to_json(properties: MessageProperties) -> str:
    """The MQTT 5 properties of a row as the JSON stored beside it (bytes as base64)."""
    data: dict[str, Any] = {}
    if properties.content_type is not None:
        data["content_type"] = properties.content_type
    if properties.response_topic is not None:
        data["response_topic"] = properties.response_topic
    if properties.correlation_data is not None:
        data["correlation_data"] = base64.b64encode(properties.correlation_data).decode("ascii")
    if properties.user_properties:
        data["user_properties"] = [list(pair) for pair in properties.user_properties]
    return json.dumps(data, separators=(",", ":")) if data else "{}"


@lru_cache(maxsize=256)  # detections share one properties text: parse it once (the result is immutable)
def properties_from_json(text: str) -> MessageProperties:
    if text == "{}":
        return NO_PROPERTIES
    data = json.loads(text)
    correlation = data.get("correlation_data")
    return MessageProperties(
        content_type=data.get("content_type"),
        response_topic=data.get("response_topic"),
        correlation_data=None if correlation is None else base64.b64decode(correlation),
        user_properties=tuple((str(k), str(v)) for k, v in data.get("user_properties", ())),
    )


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message to publish; `msg_id` is stable across retries (the consumer dedupes on it)."""

    msg_id: str
    topic: str
    payload: bytes
    kind: MessageKind
    qos: int = 1
    properties: MessageProperties = NO_PROPERTIES
    created_at: float = field(default_factory=time.time)  # unix seconds

    def __post_init__(self) -> None:
        if self.kind.__class__ is not MessageKind:
            object.__setattr__(self, "kind", MessageKind(self.kind))  # a plain "crop" string works too
        if self.qos not in (0, 1, 2):
            raise ValueError(f"message {self.msg_id}: qos must be 0, 1 or 2, got {self.qos!r}")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A stored message; `seq` is its FIFO position, assigned by SQLite and never reused."""

    seq: int
    message: OutboxMessage


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """How much the outbox keeps: `max_bytes` of payload, each message at most `max_age_s`.

    On disk, the database file and its WAL together stay within `disk_bound(B, n)`:

        max_bytes + 1.05 x (B + wal_bytes) + 1.5 KiB x n + 16 KiB

    B: the payload bytes of the largest batch enqueued; n: the most messages stored at once plus those of
    that batch. Where it comes from (new files, 512-byte pages, see PAGE_SIZE):
    - the database file holds the payloads, at most `max_bytes` after each commit (drops happen before the
      insert, in the same transaction, and the insert reuses the pages they free, so the file never grows
      past what one commit leaves), and per message its metadata (msg_id, topic, MQTT properties: ~100 B
      for a detection, ~600 B for a crop with its user properties), index entries and at most the unused
      part of one page and of its last overflow page: 1.5 KiB is the worst case, 200-850 B is typical;
      16 KiB covers the schema pages and B-tree interior pages;
    - the WAL is checkpointed once it holds `wal_bytes` (max_bytes / 16, within 32 KiB and 4 MiB) and
      truncated back to that size at its next restart, so it holds at most `wal_bytes` plus the pages of
      the transaction that crossed it; 1.05: each 512-byte page carries a 24-byte frame header in the WAL.
    This assumes checkpoints complete, i.e. no reader keeps a snapshot for long (the outbox's own reads are
    short; a program holding a read transaction open on the file lets the WAL grow until it ends). A file
    created with 4 KiB pages (schema 1) may take up to twice its payload for messages just over 2 KiB.
    """

    max_bytes: int = 256 * 1024 * 1024  # payload bytes kept
    max_age_s: float = 7 * 24 * 3600
    drop_detections_when_full: bool = False  # only if configured (ARCHITECTURE.md, delivery guarantees)

    @property
    def wal_bytes(self) -> int:
        """The WAL size at which it is checkpointed, and to which it is truncated after growing past it."""
        return min(MAX_WAL_BYTES, max(MIN_WAL_BYTES, self.max_bytes // WAL_FRACTION))

    def disk_bound(self, batch_bytes: int, messages: int) -> int:
        """The most bytes the database file and its WAL take together (see the class doc): `batch_bytes`,
        the payload of the largest batch; `messages`, the most stored at once plus those of that batch."""
        wal = math.ceil((batch_bytes + self.wal_bytes) * (1 + WAL_FRAME_HEADER / PAGE_SIZE))
        return self.max_bytes + wal + MESSAGE_OVERHEAD_BYTES * messages + FIXED_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    bytes: int
    oldest_age_s: float | None
    dropped: dict[str, int]  # by kind ("crop", "detection", "event") and "expired"
    waiting: dict[str, int] = field(default_factory=dict)  # depth by kind


class OutboxListener(Protocol):
    """Told what changed, after each commit, in the thread that committed (keep it short).

    `rows_added`: the rows one `enqueue` stored, in seq order. `rows_dropped`: every row of `kinds` with
    `seq <= up_to_seq` is gone (dropped to make room). `rows_expired`: every row created before `cutoff` (unix
    seconds) is gone. The listener forgets what it kept of them. Calls from two threads may arrive out of
    commit order. An exception in a listener is logged; it never fails the outbox call.
    """

    def rows_added(self, rows: Sequence[OutboxRow]) -> None: ...

    def rows_dropped(self, kinds: frozenset[MessageKind], up_to_seq: int) -> None: ...

    def rows_expired(self, cutoff: float) -> None: ...


class OutboxFullError(RuntimeError):
    """Detections or events of a batch did not fit and dropping detections is not configured.

    What fitted was committed; `rejected` holds the messages that were not stored (counted as dropped).
    """

    def __init__(self, message: str, rejected: Sequence[OutboxMessage]) -> None:
        super().__init__(message)
        self.rejected = tuple(rejected)


class _RowsGoneError(Exception):
    """Some rows to acknowledge were already deleted: their kinds and sizes must be read from the table."""


class OutboxFileError(RuntimeError):
    """The file at the outbox path is unusable: not SQLite, not an edgefleet outbox, corrupt or unopenable."""


_SCHEMA = (
    # The small columns first: reading kind, size or created_at never walks a large payload's overflow pages.
    # No AUTOINCREMENT (its sqlite_sequence row costs a page per commit): `totals.last_seq` keeps the highest
    # seq given out, so a seq is never reused, even after every row was deleted (the publisher pages by seq).
    """CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        qos INTEGER NOT NULL,
        created_at REAL NOT NULL,
        size INTEGER NOT NULL,
        msg_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        properties TEXT NOT NULL,
        payload BLOB NOT NULL
    )""",
    # Only crops are indexed by kind: a detection's commit does not touch this index. The queries that use
    # it spell `kind = 'crop'` out (a bound parameter would not let SQLite pick a partial index).
    "CREATE INDEX outbox_crops ON outbox (seq) WHERE kind = 'crop'",
    "CREATE INDEX outbox_created_at ON outbox (created_at)",
    # Running totals per kind, updated in the very transaction that changes `outbox`, so `stats()` and the
    # cap check are O(1): count(*)/sum(size) scan every row (see benchmarks/outbox.py). Updated by
    # the code, not by per-row triggers, which cost ~20% of enqueue throughput. One page, written once per
    # commit together with the highest seq.
    """CREATE TABLE totals (
        kind TEXT PRIMARY KEY,
        depth INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
    "INSERT INTO totals VALUES ('crop', 0, 0, 0), ('detection', 0, 0, 0), ('event', 0, 0, 0)",
    "CREATE TABLE dropped (reason TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "INSERT INTO dropped VALUES ('crop', 0), ('detection', 0), ('event', 0), ('expired', 0)",
)
_V1_COLUMNS = ("seq", "msg_id", "topic", "payload", "kind", "qos", "properties", "created_at", "size")
_COLUMNS = "seq, kind, qos, created_at, size, msg_id, topic, properties, payload"

_INSERT = f"INSERT INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_TOTALS = "SELECT kind, bytes, last_seq FROM totals"
_ADD_TO_TOTALS = (
    "UPDATE totals SET depth = depth + ?, bytes = bytes + ?, last_seq = max(last_seq, ?) WHERE kind = ?"
)
_SELECT = "SELECT seq, msg_id, topic, payload, kind, qos, properties, created_at FROM outbox"
_CROP = MessageKind.CROP.value
_KIND_IS_CROP = f"kind = '{_CROP}'"
_VALID_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


class Outbox:
    """Durable FIFO of outgoing MQTT messages, bounded by payload bytes and age; thread-safe (module doc)."""

    def __init__(
        self, path: Path, limits: OutboxLimits = OutboxLimits(), *, synchronous: Synchronous = "NORMAL"
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        if limits.max_bytes <= 0 or limits.max_age_s <= 0:
            raise ValueError(f"outbox limits must be positive, got {limits}")
        self.path = Path(path)
        self.limits = limits
        self._synchronous = synchronous
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._registry_lock = threading.Lock()
        self._closed = False
        self._last_full_warning = -FULL_WARNING_INTERVAL_S
        self._listeners: list[OutboxListener] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._initialise(self._conn())
        except BaseException:
            self.close()
            raise

    # ---- public API -------------------------------------------------------------------------------------

    def add_listener(self, listener: OutboxListener) -> None:
        """Tell `listener` about every later enqueue and drop (see `OutboxListener`)."""
        with self._registry_lock:
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: OutboxListener) -> None:
        with self._registry_lock:
            self._listeners = [known for known in self._listeners if known is not listener]

    def enqueue(self, messages: Sequence[OutboxMessage]) -> list[OutboxRow]:
        """Store a batch in one transaction, durable (see module doc) on return; returns the rows stored.

        When the payload bytes would pass `max_bytes`, makes room by dropping stored crops (oldest first),
        then, only if `drop_detections_when_full`, stored detections/events (oldest first, and only to make
        room for new detections/events). What still does not fit is refused and counted as dropped: the
        batch's newest crops first, then its detections/events (the oldest ones if dropping them is allowed;
        otherwise the ones after the longest prefix that fits, and `OutboxFullError` is raised after the
        rest of the batch is committed).
        """
        if not messages:
            return []
        conn = self._conn()
        drops: list[tuple[frozenset[MessageKind], int]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows, refused = self._store(conn, messages, drops)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, corruption)
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            self._raise_file_error(exc)
            raise
        for listener in self._listeners:
            try:
                for kinds, up_to_seq in drops:
                    listener.rows_dropped(kinds, up_to_seq)
                if rows:
                    listener.rows_added(rows)
            except Exception:
                log.exception("outbox listener %r failed", listener)
        if not refused:
            return rows
        self._warn_full(f"refused {len(refused)} new message(s) of a batch")
        rejected = [m for m in refused if m.kind is not MessageKind.CROP]
        if rejected and not self.limits.drop_detections_when_full:
            raise OutboxFullError(
                f"outbox {self.path} is full ({self.limits.max_bytes} payload bytes) and dropping "
                f"detections is not configured: {len(rejected)} detection/event message(s) of this batch "
                f"were not stored (counted as dropped), the first {rejected[0].msg_id}. Restore the broker "
                "link, raise max_bytes or enable drop_detections_when_full.",
                rejected,
            )
        return rows

    def peek(
        self, limit: int, after_seq: int = 0, *, crops: bool | None = None, before_seq: int | None = None
    ) -> list[OutboxRow]:
        """The oldest `limit` rows with `after_seq < seq < before_seq`, oldest first; nothing is removed.

        `crops`: None, every kind; True, crops only; False, everything but crops.
        """
        if limit <= 0:  # SQLite reads a negative LIMIT as "no limit"
            return []
        where = "seq > ?"
        parameters: list[object] = [after_seq]
        if before_seq is not None:
            where += " AND seq < ?"
            parameters.append(before_seq)
        if crops is not None:
            # Crops: walk the partial crop index. The rest: the table in rowid (seq) order.
            where += f" AND {_KIND_IS_CROP}" if crops else f" AND kind != '{_CROP}'"
        conn = self._conn()
        with self._guard():
            rows = conn.execute(
                f"{_SELECT} WHERE {where} ORDER BY seq LIMIT ?", (*parameters, limit)
            ).fetchall()
        return [_to_row(values) for values in rows]

    def acknowledge(self, rows: Sequence[OutboxRow]) -> None:
        """Remove published rows (on their PUBACKs), like `delete`, in one transaction.

        The rows' kinds and sizes are known, so the running totals need no query; if some of the rows are
        gone already (dropped to make room while in flight), falls back to `delete`.
        """
        if not rows:
            return
        by_kind: dict[str, list[int]] = {}
        seqs: list[int] = []
        for row in rows:
            seqs.append(row.seq)
            by_kind.setdefault(row.message.kind.value, [0, 0])
            counts = by_kind[row.message.kind.value]
            counts[0] += 1
            counts[1] += len(row.message.payload)
        seqs.sort()
        if len(set(seqs)) != len(seqs) or len(seqs) > DELETE_CHUNK:
            self.delete(seqs)
            return
        ranges, singles = _runs_of_consecutive(seqs)
        conn = self._conn()
        try:
            with self._guard(), _write_transaction(conn):
                before = conn.total_changes
                for first, last in ranges:  # a range walks the b-trees in order: cheaper than an IN list
                    conn.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
                if singles:
                    conn.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(singles))})", singles)
                if conn.total_changes - before != len(seqs):
                    raise _RowsGoneError  # rolls the transaction back
                for kind, (count, size) in by_kind.items():
                    _add_to_totals(conn, kind, -count, -size)
        except _RowsGoneError:
            self.delete(seqs)

    def delete(self, seqs: Iterable[int]) -> None:
        """Remove rows (on the broker's PUBACK); unknown seqs (already dropped or deleted) are ignored."""
        unique = sorted(set(seqs))
        if not unique:
            return
        conn = self._conn()
        with self._guard(), _write_transaction(conn):
            for start in range(0, len(unique), DELETE_CHUNK):
                chunk = unique[start : start + DELETE_CHUNK]
                _delete_where(conn, f"seq IN ({','.join('?' * len(chunk))})", chunk)

    def expire(self, now: float | None = None) -> int:
        """Drop rows created more than `max_age_s` before `now`; returns how many (counted as "expired")."""
        cutoff = (time.time() if now is None else now) - self.limits.max_age_s
        conn = self._conn()
        with self._guard(), _write_transaction(conn):
            count = _delete_where(conn, "created_at < ?", (cutoff,), index="outbox_created_at")
            _count_drops(conn, EXPIRED, count)
        if count:
            for listener in self._listeners:
                try:
                    listener.rows_expired(cutoff)
                except Exception:
                    log.exception("outbox listener %r failed", listener)
            log.warning(
                "outbox %s: %d message(s) older than %.0f s expired", self.path, count, self.limits.max_age_s
            )
        return count

    def count_dropped(self, reason: str, count: int = 1) -> None:
        """Count messages dropped before they reached the outbox (e.g. "crop_too_large"), beside its own
        drop counters: `stats().dropped` and telemetry report them, after a restart too."""
        if not _VALID_REASON.fullmatch(reason):
            raise ValueError(f"a drop reason is 1-64 of [a-z0-9_], starting with a letter; got {reason!r}")
        if count < 0:
            raise ValueError(f"a drop count cannot be negative, got {count}")
        if count == 0:
            return
        conn = self._conn()
        with self._guard(), _write_transaction(conn):
            conn.execute("INSERT OR IGNORE INTO dropped VALUES (?, 0)", (reason,))
            _count_drops(conn, reason, count)

    def stats(self) -> OutboxStats:
        """Depth, payload bytes, age of the oldest message and drop counters (O(1): running totals)."""
        conn = self._conn()
        with self._guard():
            conn.execute("BEGIN")  # one snapshot for the three reads
            try:
                totals = conn.execute("SELECT kind, depth, bytes FROM totals").fetchall()
                (oldest,) = conn.execute("SELECT min(created_at) FROM outbox").fetchone()
                dropped = dict(conn.execute("SELECT reason, count FROM dropped").fetchall())
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        oldest_age = None if oldest is None else max(0.0, time.time() - oldest)
        return OutboxStats(
            depth=sum(depth for _, depth, _ in totals),
            bytes=sum(size for _, _, size in totals),
            oldest_age_s=oldest_age,
            dropped=dropped,
            waiting={kind: depth for kind, depth, _ in totals},
        )

    def close(self) -> None:
        """Close every thread's connection; call it after the threads using the outbox have stopped."""
        with self._registry_lock:
            self._closed = True
            for _, conn in self._connections:
                conn.close()
            self._connections.clear()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------------------

    def _store(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[OutboxMessage],
        drops: list[tuple[frozenset[MessageKind], int]],
    ) -> tuple[list[OutboxRow], list[OutboxMessage]]:
        """In the write transaction: make room, insert, update the totals; (rows stored, messages refused).

        The usual case (the batch fits) runs four statements: read the totals page, insert, update it, and
        the caller's BEGIN/COMMIT; everything else is kept off that path.
        """
        stored = conn.execute(_TOTALS).fetchall()
        last_seq = max(row[2] for row in stored)
        used = sum(row[1] for row in stored)
        if len(messages) == 1:
            message = messages[0]
            size = len(message.payload)
            if size <= self.limits.max_bytes - used:
                seq = last_seq + 1
                conn.execute(_INSERT, _row_values(seq, message))
                conn.execute(_ADD_TO_TOTALS, (1, size, seq, message.kind.value))
                return [OutboxRow(seq, message)], []
        kept, refused = self._make_room(conn, messages, stored, drops)
        rows = [OutboxRow(seq, m) for seq, m in enumerate(kept, start=last_seq + 1)]
        if not rows:
            return rows, refused
        conn.executemany(_INSERT, [_row_values(row.seq, row.message) for row in rows])
        kinds = {m.kind for m in kept}
        if len(kinds) == 1:
            size = sum(len(m.payload) for m in kept)
            conn.execute(_ADD_TO_TOTALS, (len(kept), size, rows[-1].seq, kept[0].kind.value))
        else:
            for kind in kinds:
                of_kind = [row for row in rows if row.message.kind is kind]
                size = sum(len(row.message.payload) for row in of_kind)
                conn.execute(_ADD_TO_TOTALS, (len(of_kind), size, of_kind[-1].seq, kind.value))
        return rows, refused

    def _make_room(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[OutboxMessage],
        stored: list[tuple[str, int, int]],
        drops: list[tuple[frozenset[MessageKind], int]],
    ) -> tuple[list[OutboxMessage], list[OutboxMessage]]:
        """Refuse what cannot fit, then drop the stored rows the rest needs: (kept, refused)."""
        stored_bytes = {kind: size for kind, size, _ in stored}
        crops = stored_bytes.get(_CROP, 0)
        others = sum(stored_bytes.get(kind, 0) for kind in KEPT_KINDS)
        free = self.limits.max_bytes - crops - others
        allowed = self.limits.drop_detections_when_full
        refused = _choose_refused(messages, free + crops, others if allowed else 0, allowed)
        kept = [m for i, m in enumerate(messages) if i not in refused] if refused else list(messages)
        needed = sum(len(m.payload) for m in kept) - free
        if needed > 0:
            needed -= self._drop_oldest(conn, (_CROP,), needed, drops)
        if needed > 0:  # only reachable when dropping detections is allowed (see _choose_refused)
            self._drop_oldest(conn, KEPT_KINDS, needed, drops)
        for i in refused:
            _count_drops(conn, messages[i].kind.value, 1)
        return kept, [messages[i] for i in sorted(refused)]

    def _drop_oldest(
        self,
        conn: sqlite3.Connection,
        kinds: tuple[str, ...],
        needed: int,
        drops: list[tuple[frozenset[MessageKind], int]],
    ) -> int:
        """Delete the oldest rows of `kinds` until `needed` payload bytes are freed (or none are left)."""
        # Crops: walk the partial crop index. Detections/events: the table in seq order (no stored crop is
        # left by then).
        literals = ",".join(f"'{kind}'" for kind in kinds)
        where = _KIND_IS_CROP if kinds == (_CROP,) else f"kind IN ({literals})"
        cursor = conn.execute(f"SELECT seq, size FROM outbox WHERE {where} ORDER BY seq")
        freed = 0
        last_seq = 0
        for seq, size in cursor:  # stops early: reads only as many rows as it drops
            freed += size
            last_seq = seq
            if freed >= needed:
                break
        cursor.close()
        if last_seq:
            dropped = _group_by_kind(conn, f"{where} AND seq <= ?", (last_seq,))
            conn.execute(f"DELETE FROM outbox WHERE {where} AND seq <= ?", (last_seq,))
            for kind, (count, size) in dropped.items():
                _add_to_totals(conn, kind, -count, -size)
                _count_drops(conn, kind, count)
            drops.append((frozenset(MessageKind(kind) for kind in kinds), last_seq))
            self._warn_full(f"dropped the oldest stored { {k: c for k, (c, _) in dropped.items()} }")
        return freed

    def _warn_full(self, what: str) -> None:
        """Log drops at most once a minute: a full outbox drops on every enqueue; telemetry has the counts."""
        now = time.monotonic()
        if now - self._last_full_warning >= FULL_WARNING_INTERVAL_S:
            self._last_full_warning = now
            log.warning("outbox %s is full (%d payload bytes): %s", self.path, self.limits.max_bytes, what)
        else:
            log.debug("outbox %s is full: %s", self.path, what)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._registry_lock:
            if self._closed:
                raise RuntimeError(f"outbox {self.path} is closed; open a new Outbox to use it again")
            conn = self._connect()
            self._prune_dead_threads()
            self._connections.append((threading.current_thread(), conn))
        self._local.conn = conn
        return conn

    def _prune_dead_threads(self) -> None:
        alive = [(thread, conn) for thread, conn in self._connections if thread.is_alive()]
        for thread, conn in self._connections:
            if not thread.is_alive():
                conn.close()
        self._connections = alive

    def _connect(self) -> sqlite3.Connection:
        with self._guard():
            # isolation_level=None: no implicit transactions; every write is an explicit BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            with self._guard():
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # new files; old ones keep theirs
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                # Each connection checkpoints after its own commits once the WAL holds `wal_bytes`; the
                # first commit after the WAL restarts truncates the file back to that size.
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                wal_bytes = self.limits.wal_bytes
                conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, wal_bytes // page_size)}")
                conn.execute(f"PRAGMA journal_size_limit = {wal_bytes}")
            if str(mode).lower() != "wal":
                raise OutboxFileError(
                    f"outbox {self.path}: SQLite refused WAL mode (got {mode!r}); put it on a local disk"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file; refuse a file that is not an outbox of this schema version."""
        with self._guard(), _write_transaction(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            (objects,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if version == 0 and objects == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1 and self._is_v1(conn):
                self._migrate_from_v1(conn)
            elif version != SCHEMA_VERSION:
                raise self._move_aside_error(
                    f"is a SQLite database but not an edgefleet outbox of schema {SCHEMA_VERSION} "
                    f"(user_version {version}, {objects} schema objects)"
                )

    @staticmethod
    def _is_v1(conn: sqlite3.Connection) -> bool:
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(outbox)"))
        return columns == _V1_COLUMNS

    def _migrate_from_v1(self, conn: sqlite3.Connection) -> None:
        """Schema 1 (AUTOINCREMENT, payload in the middle, a (kind, seq) index) to 2, rows and drop counts
        kept, in the caller's transaction: a crash half-way leaves the file at schema 1."""
        (depth,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
        log.info("outbox %s: upgrading schema 1 to %d (%d message(s) kept)", self.path, SCHEMA_VERSION, depth)
        (last_seq,) = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " coalesce((SELECT max(seq) FROM outbox), 0))"
        ).fetchone()
        conn.execute("ALTER TABLE outbox RENAME TO outbox_v1")
        conn.execute("DROP INDEX IF EXISTS outbox_kind_seq")
        conn.execute("DROP INDEX IF EXISTS outbox_created_at")
        conn.execute("DROP TABLE totals")
        for statement in _SCHEMA[:5]:  # outbox, its indexes and totals; `dropped` is kept as it is
            conn.execute(statement)
        conn.execute(f"INSERT INTO outbox ({_COLUMNS}) SELECT {_COLUMNS} FROM outbox_v1 ORDER BY seq")
        conn.execute("DROP TABLE outbox_v1")
        for kind, count, size in conn.execute(
            "SELECT kind, count(*), total(size) FROM outbox GROUP BY kind"
        ).fetchall():
            conn.execute("INSERT OR IGNORE INTO totals VALUES (?, 0, 0, 0)", (kind,))
            _add_to_totals(conn, kind, count, int(size))
        conn.execute("UPDATE totals SET last_seq = ?", (last_seq,))
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite's "not a database" / "malformed" / "unable to open" into errors that say what to do."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self._raise_file_error(exc)
            raise

    def _raise_file_error(self, exc: sqlite3.DatabaseError) -> None:
        """Raise the OutboxFileError that says what to do if `exc` means the file is unusable."""
        name = getattr(exc, "sqlite_errorname", "")  # Python >= 3.11
        text = str(exc)
        if (
            name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
            or "malformed" in text
            or "not a database" in text
        ):
            raise self._move_aside_error(f"is not a readable SQLite database ({text})") from exc
        if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
            raise OutboxFileError(
                f"outbox {self.path} cannot be opened ({text}): check that its folder exists and that "
                "this user may write there"
            ) from exc

    def _move_aside_error(self, what: str) -> OutboxFileError:
        return OutboxFileError(
            f"outbox {self.path} {what}. Move it aside (e.g. `mv {self.path} {self.path}.broken`, with "
            "its -wal and -shm files) and restart: a new empty outbox is created; unsent messages in the old "
            "file are lost unless recovered by hand."
        )


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front (waiting up to the busy timeout); rolls back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. on SQLITE_FULL or corruption)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _choose_refused(
    messages: Sequence[OutboxMessage], room: int, detection_room: int, drop_oldest: bool
) -> set[int]:
    """Indices of the batch messages refused (see `Outbox.enqueue`).

    `room` is the space free or held by stored crops; `detection_room` is what stored detections/events can
    add, for new detections/events only.
    """
    sizes = [len(m.payload) for m in messages]
    if sum(sizes) <= room:  # the usual case: everything fits without touching stored detections
        return set()
    crops = [i for i, m in enumerate(messages) if m.kind is MessageKind.CROP]
    others = [i for i, m in enumerate(messages) if m.kind is not MessageKind.CROP]
    refused: set[int] = set()
    others_bytes = sum(sizes[i] for i in others)
    # Detections/events: keep the newest ones that fit (dropping allowed) or the longest FIFO prefix.
    for i in others if drop_oldest else reversed(others):
        if others_bytes <= room + detection_room:
            break
        refused.add(i)
        others_bytes -= sizes[i]
    crops_bytes = sum(sizes[i] for i in crops)
    for i in reversed(crops):  # the batch's newest crops go first
        if crops_bytes <= room - others_bytes:
            break
        refused.add(i)
        crops_bytes -= sizes[i]
    return refused


def _runs_of_consecutive(
    seqs: list[int], min_run: int = 4, max_runs: int = 8
) -> tuple[list[tuple[int, int]], list[int]]:
    """Sorted unique `seqs` as ranges of consecutive seqs (at most `max_runs`, each of `min_run` or more) and
    the seqs left over. Only whole runs of consecutive integers: a range never covers a seq not asked for."""
    ranges: list[tuple[int, int]] = []
    singles: list[int] = []
    start = 0
    for i in range(1, len(seqs) + 1):
        if i == len(seqs) or seqs[i] != seqs[i - 1] + 1:
            if i - start >= min_run and len(ranges) < max_runs:
                ranges.append((seqs[start], seqs[i - 1]))
            else:
                singles.extend(seqs[start:i])
            start = i
    return ranges, singles


def _delete_where(
    conn: sqlite3.Connection, where: str, parameters: Sequence[object], index: str | None = None
) -> int:
    """Delete matching rows, keeping the totals right; returns how many."""
    deleted = _group_by_kind(conn, where, parameters, index)
    conn.execute(f"DELETE FROM outbox WHERE {where}", parameters)
    for kind, (count, size) in deleted.items():
        _add_to_totals(conn, kind, -count, -size)
    return sum(count for count, _ in deleted.values())


def _group_by_kind(
    conn: sqlite3.Connection, where: str, parameters: Sequence[object], index: str | None = None
) -> dict[str, tuple[int, int]]:
    """Count and payload bytes of the matching rows by kind. `index` overrides the planner, which may
    rather scan the whole table in rowid order than search the index the WHERE needs."""
    source = f"outbox INDEXED BY {index}" if index else "outbox"
    rows = conn.execute(
        f"SELECT kind, count(*), total(size) FROM {source} WHERE {where} GROUP BY kind", parameters
    )
    return {kind: (count, int(size)) for kind, count, size in rows}


def _add_to_totals(conn: sqlite3.Connection, kind: str, depth: int, size: int) -> None:
    conn.execute(_ADD_TO_TOTALS, (depth, size, 0, kind))


def _count_drops(conn: sqlite3.Connection, reason: str, count: int) -> None:
    if count:
        conn.execute("UPDATE dropped SET count = count + ? WHERE reason = ?", (count, reason))


def _row_values(seq: int, message: OutboxMessage) -> tuple[object, ...]:
    payload = message.payload
    return (
        seq,
        message.kind.value,
        message.qos,
        message.created_at,
        len(payload),
        message.msg_id,
        message.topic,
        properties_to_json(message.properties),
        payload,
    )


_KIND_OF = {kind.value: kind for kind in MessageKind}


def _to_row(values: tuple[Any, ...]) -> OutboxRow:
    seq, msg_id, topic, payload, kind, qos, properties, created_at = values
    message = OutboxMessage(
        msg_id, topic, payload, _KIND_OF[kind], qos, properties_from_json(properties), created_at
    )
    return OutboxRow(seq, message)
