"""The device agent's durable outbox: every detection, crop and event is written here before it is published.

A SQLite database in WAL mode. The pipeline thread `enqueue`s batches; the publisher thread publishes the
oldest rows and deletes each row when the broker's PUBACK arrives (at-least-once, per-device FIFO, `msg_id`
stable across retries). Listeners (the publisher) are handed the rows each `enqueue` committed, with their
`seq`, so the live path never reads back what it just wrote; `peek` reads what was stored before (a backlog
after a restart, or more than a listener keeps in memory). The outbox is bounded by its size on disk and by
age: when full it drops the oldest crops first, then (only if configured) the oldest detections and events,
and counts every drop in a table of the same database, so telemetry still reports them after a restart.

Durability: `synchronous=NORMAL` in WAL mode means a commit appends to the WAL file without fsync. A committed
transaction survives the process dying (`kill -9`, OOM killer, segfault): the data is in the OS page cache and
the next open replays the WAL. It does NOT survive the OS crashing or the power going off before the kernel
writes the WAL back: the last transactions since the latest checkpoint may be lost (the database stays
consistent, never corrupt). `synchronous=FULL` fsyncs the WAL on every commit, so a commit also survives power
loss, at the cost of one fsync per `enqueue`/`delete` (a few ms on eMMC/SD cards; batch to amortise it).

Threads: one SQLite connection per thread (created on first use), not one connection behind a lock. In WAL
mode readers never wait for the writer, so the publisher's `peek` runs while the pipeline commits a batch;
a lock would queue every call behind the others. The writers (`enqueue`, `acknowledge`, `delete`, ...) hold
one lock of this process from the WAL check before the write to its commit (see below), and each write starts
with `BEGIN IMMEDIATE`, which takes SQLite's write lock up front and waits up to the busy timeout, instead of
failing at once with SQLITE_BUSY when a read transaction tries to upgrade to a write.

Files on disk: the database file and its `-wal` file together stay within `max_bytes`, beyond it by at most
the batch being enqueued (`OutboxLimits` says how). The database file never holds more than its share of
pages: before each `enqueue` commits, SQLite's own page count is checked to stay within it (read whenever an
upper bound of it could pass), and the outbox drops (or refuses) until the batch fits; pages freed by deletes
and drops are reused before the file grows. The WAL is checkpointed (copied into the database file, which
fsyncs it) and truncated by the outbox itself, before a write that could take it past its share: SQLite's
automatic checkpoints are off. Each `enqueue` writes as
few pages as it can (one row in the table, one entry in the `created_at` index, crops one more in the crop
index, and one totals page), since at one message per transaction the WAL bytes written per commit, not
Python, set the pace.
"""

from __future__ import annotations

import base64
import json
import logging
import os
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
# Small pages pack the outbox densely: a message larger than a page keeps a few bytes in its B-tree leaf and
# the rest in overflow pages that it fills, so at most part of one page per message is slack (4 KiB pages
# leave up to half the file empty for messages just over 2 KiB, and for detections left behind when the
# crops between them are dropped). A commit also writes 8x fewer WAL bytes per page it changes.
PAGE_SIZE = 512
# The database file's pages that hold no message: the schema (11 pages in a new file) and room for more drop
# reasons in `dropped`.
FIXED_BYTES = 8 * 1024
# The WAL's share of max_bytes: max_bytes / WAL_FRACTION within these bounds. The outbox checkpoints and
# truncates the WAL before a write would take it past its share.
MIN_WAL_BYTES = 16 * 1024
MAX_WAL_BYTES = 4 * 1024 * 1024
WAL_FRACTION = 16
WAL_FRAME_HEADER = 24
WAL_AUTOCHECKPOINT_SHARE = 3  # quarters of the WAL's share after which SQLite checkpoints on its own
MIN_ROOM_BYTES = 4 * 1024  # for messages, at the smallest max_bytes
MIN_MAX_BYTES = MIN_WAL_BYTES + FIXED_BYTES + MIN_ROOM_BYTES
# A message on disk, beyond its payload and metadata (msg_id, topic, MQTT properties): the record header and
# the small columns, its cell in a table leaf (pointer, rowid, length) and its index entries.
RECORD_BYTES = 40
CELL_BYTES = 14
INDEX_BYTES = {"crop": 40}  # created_at entry and crop index entry; the other kinds, the first only
CREATED_AT_INDEX_BYTES = 24
# What a batch needs in the database file: its rows' footprints and this many pages (a new table leaf).
# An estimate: a plan that falls short (a split of an index page, leaf space that a drop freed but new rows
# cannot use) is rolled back and made again with more room (Outbox._store_within_cap).
PAGES_PER_BATCH = 1
# The most pages an insert adds beyond its overflow pages and three times its leaf bytes (splits of leaf
# and interior pages of the table and both indexes): while the page count plus these bounds stays under the
# limit, `enqueue` need not read the page count.
GROWTH_SLACK_PAGES = 16
# Left free for deletes: deleting a key from an index's interior page moves a leaf's key up, which may be
# longer (a rowid's varint) and split the page, the one way a delete can add a page.
DELETE_GROWTH_PAGES = 2
# Pages a write changes beyond those of its new rows (B-tree paths, totals, freelist trunk, header), for the
# WAL check before it.
TOUCHED_PAGES = 16
STORE_ATTEMPTS = 8
WAL_STAT_EVERY = 32
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
_INDEX_BYTES_OF = {kind: INDEX_BYTES.get(kind.value, CREATED_AT_INDEX_BYTES) for kind in MessageKind}
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
    """A stored message; `seq` is its FIFO position, assigned by SQLite and never reused; `footprint`, what
    it takes in the database file as counted when it was stored (see `message_footprint`)."""

    seq: int
    message: OutboxMessage
    footprint: int


def message_footprint(message: OutboxMessage, page_size: int = PAGE_SIZE) -> int:
    """Bytes `message` takes in a database file of `page_size` pages, about what deleting it frees: its
    overflow pages, whole, and its cell in a table leaf with its index entries (SQLite's record layout)."""
    overflow, leaf = _footprint(message, page_size)
    return overflow + leaf


def _footprint(message: OutboxMessage, page_size: int) -> tuple[int, int]:
    """(overflow page bytes, leaf bytes) of `message` stored in pages of `page_size` (no reserved bytes)."""
    msg_id, topic = message.msg_id, message.topic
    content = (
        len(message.payload)
        + len(properties_to_json(message.properties))  # JSON with ensure_ascii: ASCII
        + (len(msg_id) if msg_id.isascii() else len(msg_id.encode()))
        + (len(topic) if topic.isascii() else len(topic.encode()))
    )
    return _record_footprint(content, _INDEX_BYTES_OF[message.kind], page_size)


def _record_footprint(content: int, index: int, page_size: int) -> tuple[int, int]:
    """`_footprint` of a row whose payload and metadata take `content` bytes and its index entries
    `index`."""
    record = RECORD_BYTES + content
    max_local = page_size - 35  # SQLite's btree.c: what a table leaf cell keeps, the rest in overflow pages
    if record <= max_local:
        local, overflow_pages = record, 0
    else:
        min_local = (page_size - 12) * 32 // 255 - 23
        local = min_local + (record - min_local) % (page_size - 4)
        if local > max_local:
            local = min_local
        overflow_pages = -(-(record - local) // (page_size - 4))
    return overflow_pages * page_size, local + CELL_BYTES + index


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """How much the outbox keeps: `max_bytes` on disk, each message at most `max_age_s`.

    On disk means the database file and its `-wal` file together (the `-shm` file is SQLite's index of the
    WAL, mapped into memory: 32 KiB for every 4,000 or so WAL pages, so a few KiB here, and not counted).
    They stay within `max_bytes`, and within `max_bytes` plus the payload of the batch being enqueued while
    that batch is in the WAL and, after a checkpoint, in the database file too:
    - the database file holds at most `db_bytes` = `max_bytes - wal_bytes`: before `enqueue` commits, SQLite's
      page count (free pages included) is checked to stay within `db_bytes` less DELETE_GROWTH_PAGES (left
      for deletes, which may split an index page), else the transaction is rolled back and made again with
      room made first: drops, then refusals. Pages freed by deletes are reused before the file grows;
    - the WAL holds at most `wal_bytes` (max_bytes / 16, within 16 KiB and 4 MiB): before each write the
      outbox checkpoints and truncates the WAL if that write could take it past `wal_bytes`, by an estimate
      of the pages it writes (its new pages, their leaf cells twice over, TOUCHED_PAGES more; 3 per deleted
      row). A batch larger than that goes into an empty WAL, which then holds only it: at most its payload
      plus `wal_bytes` (its metadata, the unused part of its last pages, the 24-byte header of each 512-byte
      page and the pages around its rows: ~1 KiB per crop, ~150 B per detection).
    Of `db_bytes`, FIXED_BYTES hold the schema; the rest, `room_bytes`, holds the messages, each with its
    metadata and its share of the B-tree pages. This assumes no other program keeps a read transaction open
    on the file (the WAL cannot be truncated under it) and a file created by this version (512-byte pages;
    a schema 1 file keeps its 4 KiB pages, counted as such).
    """

    max_bytes: int = 256 * 1024 * 1024  # database file + WAL
    max_age_s: float = 7 * 24 * 3600
    drop_detections_when_full: bool = False  # only if configured (ARCHITECTURE.md, delivery guarantees)

    def __post_init__(self) -> None:
        if self.max_bytes < MIN_MAX_BYTES:
            raise ValueError(
                f"outbox max_bytes must be at least {MIN_MAX_BYTES} ({MIN_MAX_BYTES // 1024} KiB: "
                f"{MIN_WAL_BYTES // 1024} KiB of WAL, {FIXED_BYTES // 1024} KiB of schema and "
                f"{MIN_ROOM_BYTES // 1024} KiB for messages), got {self.max_bytes}; raise it"
            )
        if not self.max_age_s > 0:
            raise ValueError(f"outbox max_age_s must be positive, got {self.max_age_s}")

    @property
    def wal_bytes(self) -> int:
        """The WAL's share of `max_bytes`: it is checkpointed and truncated before a write takes it past."""
        return min(MAX_WAL_BYTES, max(MIN_WAL_BYTES, self.max_bytes // WAL_FRACTION))

    @property
    def db_bytes(self) -> int:
        """The most the database file takes (its pages, free ones included)."""
        return self.max_bytes - self.wal_bytes

    @property
    def room_bytes(self) -> int:
        """What the messages may take in the database file: each its `message_footprint`."""
        return self.db_bytes - FIXED_BYTES


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    bytes: int  # payload bytes stored
    oldest_age_s: float | None
    dropped: dict[str, int]  # by kind ("crop", "detection", "event") and "expired"
    waiting: dict[str, int] = field(default_factory=dict)  # depth by kind
    disk_bytes: int = 0  # the database file and its WAL, what `OutboxLimits.max_bytes` bounds


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
        footprint INTEGER NOT NULL,
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
    # commit together with the highest seq. `bytes`: payload; `footprint`: the rows' `message_footprint`.
    """CREATE TABLE totals (
        kind TEXT PRIMARY KEY,
        depth INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        footprint INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
    "INSERT INTO totals VALUES ('crop', 0, 0, 0, 0), ('detection', 0, 0, 0, 0), ('event', 0, 0, 0, 0)",
    "CREATE TABLE dropped (reason TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "INSERT INTO dropped VALUES ('crop', 0), ('detection', 0), ('event', 0), ('expired', 0)",
)
_V1_COLUMNS = ("seq", "msg_id", "topic", "payload", "kind", "qos", "properties", "created_at", "size")
_COLUMNS = "seq, kind, qos, created_at, size, footprint, msg_id, topic, properties, payload"

_INSERT = f"INSERT INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_TOTALS = "SELECT kind, footprint, last_seq FROM totals"
_ADD_TO_TOTALS = (
    "UPDATE totals SET depth = depth + ?, bytes = bytes + ?, footprint = footprint + ?,"
    " last_seq = max(last_seq, ?) WHERE kind = ?"
)
_SELECT = "SELECT seq, msg_id, topic, payload, kind, qos, properties, created_at, footprint FROM outbox"
_CROP = MessageKind.CROP.value
_KIND_IS_CROP = f"kind = '{_CROP}'"
_VALID_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


class Outbox:
    """Durable FIFO of outgoing MQTT messages, bounded by bytes on disk and age; thread-safe (module doc)."""

    def __init__(
        self, path: Path, limits: OutboxLimits = OutboxLimits(), *, synchronous: Synchronous = "NORMAL"
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self._wal_path = Path(f"{self.path}-wal")
        self.limits = limits
        self._synchronous = synchronous
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._registry_lock = threading.Lock()
        self._closed = False
        self._last_full_warning = -FULL_WARNING_INTERVAL_S
        self._listeners: list[OutboxListener] = []
        # One writer at a time in this process: the WAL check before a write holds until its commit.
        self._write_lock = threading.Lock()
        self._page_size = PAGE_SIZE  # this file's, read below
        self._page_limit = limits.db_bytes // PAGE_SIZE - DELETE_GROWTH_PAGES
        self._page_bound = 0  # at least SQLite's page count now: measured, plus what writes since may add
        self._near_full = False  # the last enqueue had to make room: plan room before inserting
        self._wal_bound = 0  # at least the WAL's size now: read, plus what writes since may add
        self._writes_since_stat = WAL_STAT_EVERY  # the first write reads it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._conn()
            self._initialise(conn)
            with self._guard():
                (self._page_size,) = conn.execute("PRAGMA page_size").fetchone()
                self._page_limit = limits.db_bytes // self._page_size - DELETE_GROWTH_PAGES
                self._shrink_if_over(conn)
                (self._page_bound,) = conn.execute("PRAGMA page_count").fetchone()
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

        When the database file would pass its share of `max_bytes` (`OutboxLimits`), makes room by dropping
        stored crops (oldest first), then, only if `drop_detections_when_full`, stored detections/events
        (oldest first, and only to make room for new detections/events). What still does not fit is refused
        and counted as dropped: the batch's newest crops first, then its detections/events (the oldest ones
        if dropping them is allowed; otherwise the ones after the longest prefix that fits, and
        `OutboxFullError` is raised after the rest of the batch is committed). One transaction is committed;
        it may be tried again (rolled back) when SQLite's page count says the first plan was not enough.
        """
        if not messages:
            return []
        conn = self._conn()
        page_size = self._page_size
        footprints = [_footprint(m, page_size) for m in messages]
        overflow = sum(footprint[0] for footprint in footprints)
        leaf = sum(footprint[1] for footprint in footprints)
        # The WAL gets the batch's pages whole: its overflow pages, and its leaf cells in pages that a split
        # may leave half full.
        new_pages = (overflow + 2 * leaf) // page_size
        try:
            wal_bytes = (new_pages + PAGES_PER_BATCH + TOUCHED_PAGES) * (page_size + WAL_FRAME_HEADER)
            with self._write_lock:
                self._make_wal_room(conn, wal_bytes)
                # At most the pages the batch can add: overflow, leaf pages at least a third full, splits.
                grows = (overflow + 3 * leaf) // page_size + GROWTH_SLACK_PAGES
                rows, refused, drops = self._store_within_cap(conn, messages, footprints, grows)
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
                f"outbox {self.path} is full ({self.limits.max_bytes} bytes on disk) and dropping "
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
            counts = by_kind.setdefault(row.message.kind.value, [0, 0, 0])
            counts[0] += 1
            counts[1] += len(row.message.payload)
            counts[2] += row.footprint
        seqs.sort()
        if len(set(seqs)) != len(seqs) or len(seqs) > DELETE_CHUNK:
            self.delete(seqs)
            return
        ranges, singles = _runs_of_consecutive(seqs)
        conn = self._conn()
        try:
            with (
                self._guard(),
                self._deleting(conn, len(seqs)),
                _write_transaction(conn),
            ):
                before = conn.total_changes
                for first, last in ranges:  # a range walks the b-trees in order: cheaper than an IN list
                    conn.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
                if singles:
                    conn.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(singles))})", singles)
                if conn.total_changes - before != len(seqs):
                    raise _RowsGoneError  # rolls the transaction back
                for kind, (count, size, footprint) in by_kind.items():
                    _add_to_totals(conn, kind, -count, -size, -footprint)
        except _RowsGoneError:
            self.delete(seqs)

    def delete(self, seqs: Iterable[int]) -> None:
        """Remove rows (on the broker's PUBACK); unknown seqs (already dropped or deleted) are ignored."""
        unique = sorted(set(seqs))
        if not unique:
            return
        conn = self._conn()
        with (
            self._guard(),
            self._deleting(conn, len(unique)),
            _write_transaction(conn),
        ):
            for start in range(0, len(unique), DELETE_CHUNK):
                chunk = unique[start : start + DELETE_CHUNK]
                _delete_where(conn, f"seq IN ({','.join('?' * len(chunk))})", chunk)

    def expire(self, now: float | None = None) -> int:
        """Drop rows created more than `max_age_s` before `now`; returns how many (counted as "expired")."""
        cutoff = (time.time() if now is None else now) - self.limits.max_age_s
        conn = self._conn()
        with self._guard(), self._deleting(conn, None), _write_transaction(conn):
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
        with self._guard(), self._deleting(conn, 1), _write_transaction(conn):
            conn.execute("INSERT OR IGNORE INTO dropped VALUES (?, 0)", (reason,))
            _count_drops(conn, reason, count)

    def stats(self) -> OutboxStats:
        """Depth, payload bytes, age of the oldest message, drop counters (O(1): running totals) and the
        bytes on disk (database file and WAL)."""
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
            disk_bytes=self.disk_bytes(),
        )

    def disk_bytes(self) -> int:
        """The database file and its WAL on disk now: what `OutboxLimits.max_bytes` bounds."""
        return _file_size(self.path) + _file_size(self._wal_path)

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

    def _store_within_cap(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[OutboxMessage],
        footprints: list[tuple[int, int]],
        grows: int,
    ) -> tuple[list[OutboxRow], list[OutboxMessage], list[tuple[frozenset[MessageKind], int]]]:
        """Commit the batch with the database file within its pages: (rows stored, refused, drops).

        The first try inserts right away (the outbox is not near full); a try after which SQLite's page count
        is over the limit is rolled back, and the next one plans room first, from the file's free pages,
        then, if that was not enough either, keeps `extra` bytes more free, more each time, the last try
        all of it: that one refuses the whole batch, which cannot pass the limit.
        """
        extra: int | None = 0 if self._near_full else None
        for attempt in range(STORE_ATTEMPTS):
            drops: list[tuple[frozenset[MessageKind], int]] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows, refused, over, page_bound = self._store(conn, messages, footprints, grows, drops, extra)
                if not over:
                    conn.execute("COMMIT")
                    self._page_bound = page_bound
                    if extra is not None:  # it dropped rows or was tried again: more pages than estimated
                        self._writes_since_stat = WAL_STAT_EVERY
                    return rows, refused, drops
                conn.execute("ROLLBACK")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, corruption)
                    conn.execute("ROLLBACK")
                raise
            self._near_full = True
            log.debug("outbox %s: %d page(s) over after try %d; making more room", self.path, over, attempt)
            if extra is None:
                extra = 0
            elif attempt == STORE_ATTEMPTS - 2:
                extra = sys.maxsize // 2
            else:
                extra = max(4 * extra, 2 * over * self._page_size)
        raise AssertionError("unreachable: the last try refuses the whole batch")

    def _store(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[OutboxMessage],
        footprints: list[tuple[int, int]],
        grows: int,
        drops: list[tuple[frozenset[MessageKind], int]],
        extra: int | None,
    ) -> tuple[list[OutboxRow], list[OutboxMessage], int, int]:
        """In the write transaction: make room (unless `extra` is None), insert, update the totals; (rows
        stored, messages refused, pages over the limit after the insert: the caller rolls back if any, and
        the page count's bound after it).

        The usual case (`extra` None: insert right away, far from the limit) runs four statements: read the
        totals page, insert, update it, and the caller's BEGIN/COMMIT; nearer the limit, a fifth reads the
        page count.
        """
        stored = conn.execute(_TOTALS).fetchall()
        last_seq = max(row[2] for row in stored)
        limit = self._page_limit
        if extra is None:
            kept, refused = list(messages), list[OutboxMessage]()
            sizes = [overflow + leaf for overflow, leaf in footprints]
        else:
            (page_count,) = conn.execute("PRAGMA page_count").fetchone()
            (free_pages,) = conn.execute("PRAGMA freelist_count").fetchone()
            limit = max(limit, page_count)  # a file over the limit (a lower max_bytes) must not grow
            free = (self._page_limit - page_count + free_pages - PAGES_PER_BATCH) * self._page_size - extra
            kept, refused, sizes = self._make_room(conn, messages, footprints, stored, free, drops)
        if kept:
            rows = [
                OutboxRow(seq, m, size)
                for seq, m, size in zip(
                    range(last_seq + 1, last_seq + 1 + len(kept)), kept, sizes, strict=True
                )
            ]
            if len(rows) == 1:
                conn.execute(_INSERT, _row_values(rows[0]))
            else:
                conn.executemany(_INSERT, [_row_values(row) for row in rows])
            _add_rows_to_totals(conn, rows)
        else:
            rows = []
        page_bound = self._page_bound + grows
        if extra is None and page_bound <= limit:
            return rows, refused, 0, page_bound
        (page_count,) = conn.execute("PRAGMA page_count").fetchone()
        return rows, refused, max(0, page_count - limit), page_count

    def _make_room(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[OutboxMessage],
        footprints: list[tuple[int, int]],
        stored: list[tuple[str, int, int]],
        free: int,
        drops: list[tuple[frozenset[MessageKind], int]],
    ) -> tuple[list[OutboxMessage], list[OutboxMessage], list[int]]:
        """Refuse what cannot fit in `free` bytes plus what may be dropped, then drop the stored rows the rest
        needs: (kept, refused, footprints of the kept)."""
        stored_bytes = {kind: size for kind, size, _ in stored}
        crops = stored_bytes.get(_CROP, 0)
        others = sum(stored_bytes.get(kind, 0) for kind in KEPT_KINDS)
        allowed = self.limits.drop_detections_when_full
        needs = [overflow + leaf for overflow, leaf in footprints]
        refused = _choose_refused(messages, needs, free + crops, others if allowed else 0, allowed)
        kept_indices = [i for i in range(len(messages)) if i not in refused]
        needed = sum(needs[i] for i in kept_indices) - free
        if needed > 0 and kept_indices:
            needed -= self._drop_oldest(conn, (_CROP,), needed, drops)
        if needed > 0 and kept_indices:  # only reachable when dropping detections is allowed
            needed -= self._drop_oldest(conn, KEPT_KINDS, needed, drops)
        # Plan room first for the next batch too while what is left is less than twice this one needs (or
        # an eighth of the file): a try that finds the file full is rolled back and tried again.
        self._near_full = -needed < max(2 * sum(needs), self.limits.db_bytes // 8)
        for i in refused:
            _count_drops(conn, messages[i].kind.value, 1)
        kept = [messages[i] for i in kept_indices]
        sizes = [footprints[i][0] + footprints[i][1] for i in kept_indices]
        return kept, [messages[i] for i in sorted(refused)], sizes

    def _drop_oldest(
        self,
        conn: sqlite3.Connection,
        kinds: tuple[str, ...],
        needed: int,
        drops: list[tuple[frozenset[MessageKind], int]],
    ) -> int:
        """Delete the oldest rows of `kinds` until their footprints reach `needed` (or none are left)."""
        # Crops: walk the partial crop index. Detections/events: the table in seq order (no stored crop is
        # left by then).
        literals = ",".join(f"'{kind}'" for kind in kinds)
        where = _KIND_IS_CROP if kinds == (_CROP,) else f"kind IN ({literals})"
        cursor = conn.execute(f"SELECT seq, footprint FROM outbox WHERE {where} ORDER BY seq")
        freed = 0
        last_seq = 0
        for seq, footprint in cursor:  # stops early: reads only as many rows as it drops
            freed += footprint
            last_seq = seq
            if freed >= needed:
                break
        cursor.close()
        if last_seq:
            dropped = _group_by_kind(conn, f"{where} AND seq <= ?", (last_seq,))
            conn.execute(f"DELETE FROM outbox WHERE {where} AND seq <= ?", (last_seq,))
            for kind, (count, size, footprint) in dropped.items():
                _add_to_totals(conn, kind, -count, -size, -footprint)
                _count_drops(conn, kind, count)
            drops.append((frozenset(MessageKind(kind) for kind in kinds), last_seq))
            self._warn_full(f"dropped the oldest stored { {k: c for k, (c, _, _) in dropped.items()} }")
        return freed

    @contextmanager
    def _deleting(self, conn: sqlite3.Connection, rows: int | None) -> Iterator[None]:
        """Hold this process's write lock for a write that deletes `rows` rows (None: any number), with room
        for it in the WAL; it may add DELETE_GROWTH_PAGES pages."""
        with self._write_lock:
            self._page_bound += DELETE_GROWTH_PAGES
            self._make_wal_room(conn, self._delete_wal_bytes(rows))
            yield

    def _make_wal_room(self, conn: sqlite3.Connection, wal_bytes: int) -> None:
        """Before a write that may add `wal_bytes` to the WAL (holding the write lock): checkpoint and
        truncate the WAL if that could take it past its share of `max_bytes`."""
        # Each stat() costs a system call (tens of µs in a sandbox): the WAL's size is read when the writes
        # since the last reading could have taken it near its share, after a write that dropped rows or was
        # tried again, and every WAL_STAT_EVERY writes.
        if self._wal_bound + wal_bytes > self.limits.wal_bytes or self._writes_since_stat >= WAL_STAT_EVERY:
            self._wal_bound = self._wal_size_after_checkpoint(conn, wal_bytes)
            self._writes_since_stat = 0
        self._wal_bound += wal_bytes
        self._writes_since_stat += 1

    def _wal_size_after_checkpoint(self, conn: sqlite3.Connection, wal_bytes: int) -> int:
        """The WAL's size, after checkpointing and truncating it if `wal_bytes` more could take it past its
        share of `max_bytes`."""
        size = _file_size(self._wal_path)
        if not size or size + wal_bytes <= self.limits.wal_bytes:
            return size
        # TRUNCATE waits (busy timeout) for readers of the WAL to finish, copies it into the database file
        # and truncates it to 0 bytes; PASSIVE (SQLite's automatic checkpoint) gives up instead.
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                "outbox %s: WAL checkpoint blocked by a reader for %d ms (%d bytes in the WAL); is another "
                "program reading the file?",
                self.path,
                BUSY_TIMEOUT_MS,
                size,
            )
            return size
        return 0

    def _delete_wal_bytes(self, rows: int | None) -> int:
        """The most a delete of `rows` rows (None: any number) adds to the WAL: three leaf pages each (the
        table and two indexes), never more than the whole file, and the pages above and beside them."""
        pages = self._page_limit if rows is None else min(3 * rows, self._page_limit)
        return (pages + TOUCHED_PAGES) * (self._page_size + WAL_FRAME_HEADER)

    def _shrink_if_over(self, conn: sqlite3.Connection) -> None:
        """A file over its pages (made with a larger max_bytes) is vacuumed, once, when it is opened."""
        (page_count,) = conn.execute("PRAGMA page_count").fetchone()
        if page_count <= self._page_limit:
            return
        log.warning(
            "outbox %s: the file has %d pages, over the %d that max_bytes %d leaves it; vacuuming it",
            self.path,
            page_count,
            self._page_limit,
            self.limits.max_bytes,
        )
        with self._write_lock:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _warn_full(self, what: str) -> None:
        """Log drops at most once a minute: a full outbox drops on every enqueue; telemetry has the counts."""
        now = time.monotonic()
        if now - self._last_full_warning >= FULL_WARNING_INTERVAL_S:
            self._last_full_warning = now
            log.warning("outbox %s is full (%d bytes on disk): %s", self.path, self.limits.max_bytes, what)
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
                # Deleted content is zeroed where that writes no page more (inside B-tree pages), not in the
                # pages a delete frees (an overflow page of a crop): with secure_delete ON (Debian builds
                # SQLite so) each freed page is written to the WAL again, doubling what a drop or an
                # acknowledgement of crops writes. Freed pages are reused by the next rows.
                conn.execute("PRAGMA secure_delete = FAST")
                # SQLite checkpoints (PASSIVE: never waits) after a commit that leaves 3/4 of the WAL's share
                # in it, and the next write starts the WAL over, trimming the file back to that size; the
                # outbox checkpoints and truncates it itself before a write that could take it past its
                # share (Outbox._make_wal_room): a large batch, or a reader that kept SQLite from starting
                # over.
                autocheckpoint = WAL_AUTOCHECKPOINT_SHARE * self.limits.wal_bytes // 4
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                frames = max(1, autocheckpoint // (page_size + WAL_FRAME_HEADER))
                conn.execute(f"PRAGMA wal_autocheckpoint = {frames}")
                conn.execute(f"PRAGMA journal_size_limit = {autocheckpoint}")
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
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()

        def footprint(kind: str, content: int) -> int:
            index = INDEX_BYTES.get(kind, CREATED_AT_INDEX_BYTES)
            return sum(_record_footprint(content, index, page_size))

        conn.create_function("outbox_footprint", 2, footprint, deterministic=True)
        content = "length(payload) + length(CAST(msg_id AS BLOB) || CAST(topic AS BLOB)) + length(properties)"
        values = _COLUMNS.replace("footprint", f"outbox_footprint(kind, {content})")
        conn.execute(f"INSERT INTO outbox ({_COLUMNS}) SELECT {values} FROM outbox_v1 ORDER BY seq")
        conn.execute("DROP TABLE outbox_v1")
        for kind, count, size, footprints in conn.execute(
            "SELECT kind, count(*), total(size), total(footprint) FROM outbox GROUP BY kind"
        ).fetchall():
            conn.execute("INSERT OR IGNORE INTO totals VALUES (?, 0, 0, 0, 0)", (kind,))
            _add_to_totals(conn, kind, count, int(size), int(footprints))
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
    messages: Sequence[OutboxMessage], sizes: list[int], room: int, detection_room: int, drop_oldest: bool
) -> set[int]:
    """Indices of the batch messages refused (see `Outbox.enqueue`); `sizes`, what each needs.

    `room` is the space free or held by stored crops; `detection_room` is what stored detections/events can
    add, for new detections/events only.
    """
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
    for kind, (count, size, footprint) in deleted.items():
        _add_to_totals(conn, kind, -count, -size, -footprint)
    return sum(count for count, _, _ in deleted.values())


def _group_by_kind(
    conn: sqlite3.Connection, where: str, parameters: Sequence[object], index: str | None = None
) -> dict[str, tuple[int, int, int]]:
    """Count, payload bytes and footprint of the matching rows by kind. `index` overrides the planner,
    which may rather scan the whole table in rowid order than search the index the WHERE needs."""
    source = f"outbox INDEXED BY {index}" if index else "outbox"
    rows = conn.execute(
        f"SELECT kind, count(*), total(size), total(footprint) FROM {source} WHERE {where} GROUP BY kind",
        parameters,
    )
    return {kind: (count, int(size), int(footprint)) for kind, count, size, footprint in rows}


def _add_to_totals(conn: sqlite3.Connection, kind: str, depth: int, size: int, footprint: int) -> None:
    conn.execute(_ADD_TO_TOTALS, (depth, size, footprint, 0, kind))


def _add_rows_to_totals(conn: sqlite3.Connection, rows: list[OutboxRow]) -> None:
    """Add new rows (in seq order) to the totals: one statement per kind, one in all for the usual batch."""
    if len(rows) == 1:
        row = rows[0]
        conn.execute(_ADD_TO_TOTALS, (1, len(row.message.payload), row.footprint, row.seq, row.message.kind))
        return
    kinds = {row.message.kind for row in rows}
    for kind in kinds:
        of_kind = rows if len(kinds) == 1 else [row for row in rows if row.message.kind is kind]
        size = sum(len(row.message.payload) for row in of_kind)
        footprint = sum(row.footprint for row in of_kind)
        conn.execute(_ADD_TO_TOTALS, (len(of_kind), size, footprint, of_kind[-1].seq, kind.value))


def _count_drops(conn: sqlite3.Connection, reason: str, count: int) -> None:
    if count:
        conn.execute("UPDATE dropped SET count = count + ? WHERE reason = ?", (count, reason))


def _row_values(row: OutboxRow) -> tuple[object, ...]:
    message = row.message
    payload = message.payload
    return (
        row.seq,
        message.kind.value,
        message.qos,
        message.created_at,
        len(payload),
        row.footprint,
        message.msg_id,
        message.topic,
        properties_to_json(message.properties),
        payload,
    )


_KIND_OF = {kind.value: kind for kind in MessageKind}


def _to_row(values: tuple[Any, ...]) -> OutboxRow:
    seq, msg_id, topic, payload, kind, qos, properties, created_at, footprint = values
    message = OutboxMessage(
        msg_id, topic, payload, _KIND_OF[kind], qos, properties_from_json(properties), created_at
    )
    return OutboxRow(seq, message, footprint)


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
