"""The durable outbox on real SQLite files: order, properties, caps, expiry, threads and `kill -9`."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest

from device_agent.outbox import (
    MIN_MAX_BYTES,
    MessageKind,
    Outbox,
    OutboxFileError,
    OutboxFullError,
    OutboxLimits,
    OutboxMessage,
    OutboxRow,
    message_footprint,
    properties_to_json,
)
from fleet_protocol.mqtt import MessageProperties

REPO_ROOT = Path(__file__).resolve().parents[2]
TOPIC = "edgefleet/v1/devices/cam-0001/detections"
KINDS = {"d": MessageKind.DETECTION, "c": MessageKind.CROP, "e": MessageKind.EVENT}


def message(msg_id: str, size: int = 100, created_at: float | None = None) -> OutboxMessage:
    """A message whose kind is the first letter of its id: d(etection), c(rop) or e(vent)."""
    return OutboxMessage(
        msg_id=msg_id,
        topic=TOPIC,
        payload=os.urandom(size),
        kind=KINDS[msg_id[0]],
        created_at=time.time() if created_at is None else created_at,
    )


def batch(*msg_ids: str, size: int = 100) -> list[OutboxMessage]:
    return [message(msg_id, size) for msg_id in msg_ids]


def all_rows(outbox: Outbox) -> list[OutboxRow]:
    return outbox.peek(1_000_000)


def stored_ids(outbox: Outbox) -> list[str]:
    return [row.message.msg_id for row in all_rows(outbox)]


def assert_totals_match_rows(outbox: Outbox) -> None:
    rows = all_rows(outbox)
    stats = outbox.stats()
    assert (stats.depth, stats.bytes) == (len(rows), sum(len(r.message.payload) for r in rows))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox" / "outbox.db"


def test_fifo_order_and_messages_survive_reopen(db_path: Path) -> None:
    sent = batch("d1", "c1", "e1") + batch("d2") + batch("c2", "d3", "d4")
    with Outbox(db_path) as outbox:
        outbox.enqueue(sent[:3])
        outbox.enqueue(sent[3:4])
        outbox.enqueue(sent[4:])
    with Outbox(db_path) as reopened:
        rows = all_rows(reopened)
        assert [row.message for row in rows] == sent
        assert [row.seq for row in rows] == sorted(row.seq for row in rows)
        assert len({row.seq for row in rows}) == len(rows)
        assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_mqtt_properties_round_trip(db_path: Path) -> None:
    crop = OutboxMessage(
        msg_id="01J9ZCROP",
        topic="edgefleet/v1/devices/cam-0001/crops",
        payload=bytes(range(256)) * 3,
        kind=MessageKind.CROP,
        qos=2,
        properties=MessageProperties(
            content_type="image/jpeg",
            response_topic="edgefleet/v1/devices/cam-0001/refined",
            correlation_data=b"\x00\xffdet-7\x80",
            user_properties=(("msg_id", "01J9ZCROP"), ("label", "hund ü"), ("bbox", "[1.5,2,30,40]")),
        ),
        created_at=1_700_000_000.123456,
    )
    plain = OutboxMessage(msg_id="d-plain", topic=TOPIC, payload=b"{}", kind=MessageKind.DETECTION, qos=0)
    with Outbox(db_path) as outbox:
        outbox.enqueue([crop, plain])
    with Outbox(db_path) as reopened:
        assert [row.message for row in all_rows(reopened)] == [crop, plain]
        assert all_rows(reopened)[1].message.properties == MessageProperties()


def test_peek_after_seq_and_delete(db_path: Path) -> None:
    with Outbox(db_path) as outbox:
        outbox.enqueue(batch(*(f"d{i}" for i in range(10))))
        first = outbox.peek(3)
        following = outbox.peek(3, after_seq=first[-1].seq)
        assert [r.message.msg_id for r in first + following] == [f"d{i}" for i in range(6)]
        assert outbox.peek(0) == []
        outbox.delete(
            [r.seq for r in first] + [first[0].seq, 999_999]
        )  # duplicates and unknown seqs: ignored
        assert stored_ids(outbox) == [f"d{i}" for i in range(3, 10)]
        assert outbox.peek(2, after_seq=following[-1].seq)[0].message.msg_id == "d6"
        assert_totals_match_rows(outbox)
        last_seq = all_rows(outbox)[-1].seq
        outbox.delete(row.seq for row in all_rows(outbox))
        assert (outbox.stats().depth, outbox.stats().bytes) == (0, 0)
    with Outbox(db_path) as reopened:  # a seq is never reused, so a publisher's after_seq stays valid
        reopened.enqueue(batch("d10"))
        assert all_rows(reopened)[0].seq > last_seq


# A small outbox: 40 KiB on disk, 16 KiB of it the WAL's, 24 KiB the database file's (8 KiB schema): about
# fifteen UNIT-byte messages. Filled one message at a time, it says when it is full (`fill`), so the tests
# below state what must happen in what order, not SQLite's page arithmetic.
SMALL = OutboxLimits(max_bytes=40 * 1024, max_age_s=60)
UNIT = 1000


def fill(outbox: Outbox, prefix: str, kind: str = "d", limit: int = 200) -> list[str]:
    """Enqueue `kind` messages of UNIT bytes one at a time until one is refused or a stored row dropped;
    returns the ids enqueued (the last one refused or stored in place of what was dropped)."""
    enqueued: list[str] = []
    for i in range(limit):
        before = outbox.stats().dropped
        enqueued.append(f"{kind}{prefix}{i}")
        try:
            outbox.enqueue(batch(enqueued[-1], size=UNIT))
        except OutboxFullError:
            return enqueued
        if outbox.stats().dropped != before:
            return enqueued
    raise AssertionError(f"{limit} messages of {UNIT} bytes never filled the outbox")


def on_disk(db_path: Path) -> tuple[int, int]:
    """The sizes of the database file and its WAL now."""
    wal = Path(f"{db_path}-wal")
    return db_path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def test_limits_split_max_bytes_and_refuse_a_cap_below_the_fixed_overhead() -> None:
    assert (SMALL.wal_bytes, SMALL.db_bytes, SMALL.room_bytes) == (16 * 1024, 24 * 1024, 16 * 1024)
    default = OutboxLimits()
    assert default.wal_bytes == 4 * 1024 * 1024  # 256 MiB / 16 is more: at most 4 MiB
    assert default.db_bytes == default.max_bytes - default.wal_bytes
    assert OutboxLimits(max_bytes=MIN_MAX_BYTES).room_bytes == 4 * 1024
    with pytest.raises(ValueError, match=f"at least {MIN_MAX_BYTES} ") as error:
        OutboxLimits(max_bytes=MIN_MAX_BYTES - 1)
    assert "raise it" in str(error.value)
    with pytest.raises(ValueError, match="max_age_s"):
        OutboxLimits(max_age_s=0)


def test_footprints_follow_sqlite_s_record_layout(db_path: Path) -> None:
    small, large = message("d0", size=100), message("c0", size=10_000)
    # A small row lives in its leaf cell; a large one keeps a few bytes there and the rest in whole pages.
    assert 100 < message_footprint(small) < 512
    # 10,085 bytes of record: 19 full overflow pages, 432 bytes in the leaf cell (+ 14 cell, 40 index entries)
    assert message_footprint(large) == 19 * 512 + 432 + 14 + 40
    assert message_footprint(large, page_size=4096) == 2 * 4096 + 1900 + 14 + 40
    with Outbox(db_path) as outbox:
        rows = outbox.enqueue([small, large])
        assert [row.footprint for row in rows] == [message_footprint(small), message_footprint(large)]
        assert [row.footprint for row in all_rows(outbox)] == [row.footprint for row in rows]
        stats = outbox.stats()
        assert stats.bytes == 10_100  # telemetry's `bytes`: payload, as before
        assert stats.disk_bytes == sum(on_disk(db_path))


def test_enqueue_returns_the_stored_rows_with_their_seqs_and_listeners_hear_of_changes(db_path: Path) -> None:
    heard: list[tuple[str, object]] = []
    added: list[int] = []

    class Listener:
        def rows_added(self, rows: Sequence[OutboxRow]) -> None:
            heard.append(("added", [(r.seq, r.message.msg_id) for r in rows]))
            added.extend(r.seq for r in rows)

        def rows_dropped(self, kinds: frozenset[MessageKind], up_to_seq: int) -> None:
            heard.append(("dropped", (sorted(kinds), up_to_seq)))

        def rows_expired(self, cutoff: float) -> None:
            heard.append(("expired", cutoff))

    with Outbox(db_path, SMALL) as outbox:
        outbox.add_listener(Listener())
        first = outbox.enqueue(batch("d0", "c0", "c1", "d1", size=UNIT))
        outbox.delete(row.seq for row in first)  # an emptied table must not give a seq out twice
        second = outbox.enqueue(batch("c2", "d2", "c3", "e0", "d3", size=UNIT))
        third = outbox.enqueue([message("dold", size=UNIT, created_at=time.time() - 120)])
        filled = fill(outbox, "f")  # until the first drop: the oldest crop, c2 (c3 too if one was not enough)
        assert outbox.expire() == 1

        stored = {row.seq: row.message for row in all_rows(outbox)}
        for row in second + third:
            assert row.seq not in stored or stored[row.seq] == row.message
        assert "c2" not in stored_ids(outbox)
        assert stored_ids(outbox)[-len(filled) :] == filled
    events = [event for event, _ in heard]
    assert events == ["added"] * (3 + len(filled) - 1) + ["dropped", "added", "expired"]
    assert heard[-3][1] in [(["crop"], second[0].seq), (["crop"], second[2].seq)]
    assert added == list(range(added[0], added[0] + len(added)))  # consecutive, in batch order


def test_peek_by_kind_and_acknowledge_rows_some_already_gone(db_path: Path) -> None:
    with Outbox(db_path, SMALL) as outbox:
        rows = outbox.enqueue(batch("d0", "c0", "d1", "c1", "d2", "d3", "d4", "d5", size=UNIT))
        by_id = {row.message.msg_id: row for row in rows}
        assert [r.message.msg_id for r in outbox.peek(10, crops=True)] == ["c0", "c1"]
        assert [r.message.msg_id for r in outbox.peek(3, crops=False)] == ["d0", "d1", "d2"]
        assert [r.message.msg_id for r in outbox.peek(10, by_id["d0"].seq, before_seq=by_id["d2"].seq)] == [
            "c0",
            "d1",
            "c1",
        ]
        outbox.acknowledge([by_id["d0"], by_id["d1"], by_id["d2"], by_id["d3"]])  # a run and singles
        assert stored_ids(outbox) == ["c0", "c1", "d4", "d5"]
        filled: list[str] = []
        while "c1" in stored_ids(outbox):  # makes room: both crops go
            filled += fill(outbox, f"f{len(filled)}-")
        assert stored_ids(outbox) == ["d4", "d5", *filled]

        outbox.acknowledge([by_id["c0"], by_id["c1"], by_id["d4"]])  # the crops were dropped meanwhile

        assert stored_ids(outbox) == ["d5", *filled]
        assert_totals_match_rows(outbox)


def test_oldest_crops_are_dropped_first_then_detections_are_refused(db_path: Path) -> None:
    with Outbox(db_path, SMALL) as outbox:
        outbox.enqueue(batch("c0", "c1", "d0", size=UNIT))
        filled: list[str] = []
        while "c1" in stored_ids(outbox):
            filled += fill(outbox, f"f{len(filled)}-")
            assert stored_ids(outbox) in (["c1", "d0", *filled], ["d0", *filled])  # the oldest crop first
        with pytest.raises(OutboxFullError, match="drop_detections_when_full") as refused:
            outbox.enqueue(batch("dX", size=UNIT))  # no crop left: the detection is refused
        assert [m.msg_id for m in refused.value.rejected] == ["dX"]
        assert stored_ids(outbox) == ["d0", *filled]
        stats = outbox.stats()
        assert stats.dropped == {"crop": 2, "detection": 1, "event": 0, "expired": 0}
        assert stats.bytes <= SMALL.room_bytes
        assert_totals_match_rows(outbox)


def test_batch_crops_are_refused_newest_first(db_path: Path) -> None:
    with Outbox(db_path, SMALL) as outbox:
        detections = fill(outbox, "")[:-1]  # full: the last one was refused
        outbox.delete(row.seq for row in outbox.peek(2))  # room for two, not for four
        assert stored_ids(outbox) == detections[2:]
        crops = ["cA", "cB", "cC"]
        outbox.enqueue(batch(*crops, "dN", size=UNIT))
        new = stored_ids(outbox)[len(detections) - 2 :]
        assert new[-1] == "dN"  # a detection of the batch is kept before its crops
        assert new[:-1] == crops[: len(new) - 1]  # the batch's oldest crops kept, its newest refused
        assert len(new) < 4
        outbox.enqueue([message("cHuge", size=60_000)])  # larger than the whole cap: refused, never an error
        assert stored_ids(outbox)[len(detections) - 2 :] == new  # and no stored crop was dropped for nothing
        assert outbox.stats().dropped["crop"] == 4 - len(new) + 1
        assert outbox.stats().dropped["detection"] == 1  # the one that found it full


def test_full_error_commits_the_prefix_that_fits(db_path: Path) -> None:
    with Outbox(db_path, SMALL) as outbox:
        detections = fill(outbox, "")[:-1]
        outbox.delete(row.seq for row in outbox.peek(3))
        items = batch("e7", "d8", "c9", "d10", "e11", "d12", size=UNIT)
        with pytest.raises(OutboxFullError, match=str(db_path)) as refused:
            outbox.enqueue(items)
        kept = stored_ids(outbox)[len(detections) - 3 :]
        not_crops = ["e7", "d8", "d10", "e11", "d12"]
        assert 1 <= len(kept) < 5
        assert kept == not_crops[: len(kept)]  # the longest prefix that fits; the crop went first
        assert [m.msg_id for m in refused.value.rejected] == not_crops[len(kept) :]
        assert outbox.stats().dropped["crop"] == 1
        refused_kinds = Counter(msg_id[0] for msg_id in not_crops[len(kept) :])
        assert outbox.stats().dropped["detection"] == 1 + refused_kinds["d"]
        assert outbox.stats().dropped["event"] == refused_kinds["e"]


def test_detections_are_dropped_only_when_configured(db_path: Path) -> None:
    limits = OutboxLimits(max_bytes=SMALL.max_bytes, drop_detections_when_full=True)
    with Outbox(db_path, limits) as outbox:
        outbox.enqueue(batch("e0", "d1", "d2", size=UNIT))
        filled = fill(outbox, "f")  # no error: the oldest stored go
        stored = stored_ids(outbox)
        assert stored in (["d1", "d2", *filled], ["d2", *filled])  # e0 went first (and d1 if not enough)
        outbox.enqueue(batch("c12", size=UNIT))  # detections never make room for a crop
        assert stored_ids(outbox) == stored
        big = [f"dn{i}" for i in range(3 * len(filled))]
        outbox.enqueue(batch(*big, size=UNIT))  # a batch larger than the cap keeps its newest
        kept = stored_ids(outbox)
        assert 0 < len(kept) < len(big)
        assert kept == big[-len(kept) :]
        stats = outbox.stats()
        detections = (2 + len(filled) - len(stored)) + len(stored) + len(big) - len(kept)
        dropped = {"crop": 1, "detection": detections, "event": 1, "expired": 0}
        assert stats.dropped == dropped
    with Outbox(db_path, limits) as reopened:  # the counters are in the database
        assert reopened.stats().dropped == dropped


@pytest.mark.parametrize("drop_detections", [False, True])
def test_random_workload_never_passes_the_cap(db_path: Path, drop_detections: bool) -> None:
    rng = random.Random(20240611)
    limits = OutboxLimits(max_bytes=64 * 1024, drop_detections_when_full=drop_detections)
    enqueued: list[str] = []
    refused: list[OutboxMessage] = []
    accepted_detections: set[str] = set()
    published: set[str] = set()
    most_over = -limits.max_bytes  # the most the files passed max_bytes by, less the batch just enqueued
    with Outbox(db_path, limits) as outbox:
        for round_ in range(300):
            items = [
                message(f"{rng.choice('dddcce')}{round_}-{j}", size=rng.randint(1, 2500))
                for j in range(rng.randint(1, 20))
            ]
            rejected: tuple[OutboxMessage, ...] = ()
            try:
                outbox.enqueue(items)
            except OutboxFullError as full:
                rejected = full.rejected
            most_over = max(
                most_over, sum(on_disk(db_path)) - limits.max_bytes - sum(len(m.payload) for m in items)
            )
            refused += rejected
            enqueued += [m.msg_id for m in items]
            accepted_detections |= {m.msg_id for m in items if m.kind is not MessageKind.CROP} - {
                m.msg_id for m in rejected
            }
            if rng.random() < 0.3:  # the publisher drains a few
                rows = outbox.peek(rng.randint(1, 15))
                outbox.acknowledge(rows)
                published |= {row.message.msg_id for row in rows}
                most_over = max(most_over, sum(on_disk(db_path)) - limits.max_bytes)
            assert on_disk(db_path)[0] <= limits.db_bytes
            assert outbox.stats().bytes <= limits.room_bytes
        assert_totals_match_rows(outbox)
        kept = stored_ids(outbox)
        assert kept == [msg_id for msg_id in enqueued if msg_id in set(kept)]  # FIFO order, no duplicates
        stats = outbox.stats()
        assert stats.dropped["crop"] > 0
    assert most_over <= 0  # never past max_bytes + the batch being enqueued; acknowledgements: max_bytes
    assert all(m.kind is not MessageKind.CROP for m in refused)
    if drop_detections:
        assert not refused
        assert stats.dropped["detection"] > 0
    else:  # a detection, once accepted, stays until published; refused ones are counted
        assert refused
        assert {i for i in kept if i[0] != "c"} == accepted_detections - published
        assert stats.dropped["detection"] + stats.dropped["event"] == len(refused)


@pytest.mark.parametrize(
    ("cap", "crops", "crop_bytes", "detection_bytes"),
    [(1_000_000, 10, 10_000, 300), (64 * 1024, 3, 9_000, 400)],  # the second: the agent's smallest cap
)
def test_files_on_disk_never_pass_the_cap_plus_one_batch(
    db_path: Path, cap: int, crops: int, crop_bytes: int, detection_bytes: int
) -> None:
    limits = OutboxLimits(max_bytes=cap)
    batch_bytes = crops * crop_bytes + 5 * detection_bytes
    most_on_disk, largest_db, largest_wal = 0, 0, 0
    with Outbox(db_path, limits) as outbox:
        for round_ in range(300):
            outbox.enqueue(
                [message(f"c{round_}-{j}", size=crop_bytes) for j in range(crops)]
                + [message(f"d{round_}-{j}", size=detection_bytes) for j in range(5)]
            )
            db, wal = on_disk(db_path)
            if round_ % 5 == 0:  # the publisher keeps up with detections, not with crops
                outbox.acknowledge(
                    [row for row in all_rows(outbox) if row.message.kind is MessageKind.DETECTION]
                )
                db, wal = max(db, on_disk(db_path)[0]), max(wal, on_disk(db_path)[1])
            most_on_disk = max(most_on_disk, db + wal)
            largest_db, largest_wal = max(largest_db, db), max(largest_wal, wal)
            assert outbox.stats().bytes <= limits.room_bytes
        print(
            f"\ncap {cap}: at most {most_on_disk} B on disk (db + wal), cap + batch {cap + batch_bytes} B; "
            f"largest db file {largest_db} B (its share {limits.db_bytes}), largest WAL {largest_wal} B"
        )
        assert most_on_disk <= cap + batch_bytes
        assert largest_db <= limits.db_bytes
        assert outbox.stats().dropped["crop"] > 200
        assert outbox.stats().dropped["detection"] == 0
        assert outbox.stats().bytes > limits.room_bytes // 2  # the cap is not met by keeping the file empty


def test_a_file_over_its_pages_is_vacuumed_when_opened_with_a_lower_cap(db_path: Path) -> None:
    with Outbox(db_path, OutboxLimits(max_bytes=1_000_000)) as outbox:
        outbox.enqueue(batch(*(f"c{i}" for i in range(40)), size=10_000))
        outbox.delete(row.seq for row in all_rows(outbox)[:-2])
    assert on_disk(db_path)[0] > 400_000
    limits = OutboxLimits(max_bytes=64 * 1024)
    with Outbox(db_path, limits) as reopened:
        assert on_disk(db_path)[0] <= limits.db_bytes
        assert stored_ids(reopened) == ["c38", "c39"]
        reopened.enqueue(batch("c40", size=10_000))
        assert sum(on_disk(db_path)) <= limits.max_bytes + 10_000


# The schema of the first outbox files (user_version 1), as they may still be on a device.
SCHEMA_1 = (
    """CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, msg_id TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, kind TEXT NOT NULL, qos INTEGER NOT NULL, properties TEXT NOT NULL,
    created_at REAL NOT NULL, size INTEGER NOT NULL)""",
    "CREATE INDEX outbox_kind_seq ON outbox (kind, seq)",
    "CREATE INDEX outbox_created_at ON outbox (created_at)",
    "CREATE TABLE totals (kind TEXT PRIMARY KEY, depth INTEGER NOT NULL, bytes INTEGER NOT NULL)",
    "INSERT INTO totals VALUES ('crop', 0, 0), ('detection', 0, 0), ('event', 0, 0)",
    "CREATE TABLE dropped (reason TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "INSERT INTO dropped VALUES ('crop', 2), ('detection', 0), ('event', 1), ('expired', 0)",
    "PRAGMA user_version = 1",
)


def test_a_schema_1_outbox_is_upgraded_in_place_keeping_every_message(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path, isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    for statement in SCHEMA_1:
        old.execute(statement)
    crop = OutboxMessage(
        "c1",
        TOPIC,
        b"\xff\xd8jpeg",
        MessageKind.CROP,
        properties=MessageProperties(
            content_type="image/jpeg", correlation_data=b"d1", user_properties=(("a", "b"),)
        ),
        created_at=1_700_000_000.5,
    )
    kept = [message("d0"), crop, message("e2"), message("d3")]
    for m in [*kept, message("d4")]:
        old.execute(
            "INSERT INTO outbox (msg_id, topic, payload, kind, qos, properties, created_at, size)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.msg_id,
                m.topic,
                m.payload,
                m.kind.value,
                m.qos,
                properties_to_json(m.properties),
                m.created_at,
                len(m.payload),
            ),
        )
    old.execute("DELETE FROM outbox WHERE msg_id = 'd4'")  # its seq (5) was given out: never again
    old.execute("UPDATE totals SET depth = 3, bytes = 300 WHERE kind IN ('detection', 'event')")
    old.execute("UPDATE totals SET depth = 1, bytes = 6 WHERE kind = 'crop'")
    old.close()

    with Outbox(db_path) as outbox:
        assert [row.message for row in all_rows(outbox)] == kept
        assert [row.message.msg_id for row in outbox.peek(10, crops=True)] == ["c1"]
        assert_totals_match_rows(outbox)
        assert outbox.stats().dropped == {"crop": 2, "detection": 0, "event": 1, "expired": 0}
        (added,) = outbox.enqueue(batch("d5"))
        assert added.seq == 6
    with Outbox(db_path) as reopened:  # upgraded once; opens as it is now
        assert stored_ids(reopened) == ["d0", "c1", "e2", "d3", "d5"]
    assert sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone() == (2,)


def test_drops_before_the_outbox_are_counted_beside_its_own(db_path: Path) -> None:
    with Outbox(db_path) as outbox:
        outbox.count_dropped("crop_too_large", 2)
        outbox.count_dropped("crop_too_large")
        outbox.count_dropped("crop_too_large", 0)
        with pytest.raises(ValueError, match="drop reason"):
            outbox.count_dropped("Crop too large")
        with pytest.raises(ValueError, match="negative"):
            outbox.count_dropped("crop_too_large", -1)
    with Outbox(db_path) as reopened:
        assert reopened.stats().dropped == {
            "crop": 0,
            "detection": 0,
            "event": 0,
            "expired": 0,
            "crop_too_large": 3,
        }


def test_expire_drops_old_rows_and_counts_them(db_path: Path) -> None:
    now = time.time()
    with Outbox(db_path, OutboxLimits(max_age_s=100)) as outbox:
        outbox.enqueue([message(msg_id, created_at=now - age) for msg_id, age in [("d0", 500), ("c1", 150)]])
        outbox.enqueue([message(msg_id, created_at=now - age) for msg_id, age in [("d2", 50), ("e3", 10)]])
        oldest = outbox.stats().oldest_age_s
        assert oldest is not None
        assert 500 <= oldest < 510
        assert outbox.expire(now) == 2
        assert outbox.expire(now) == 0
        assert stored_ids(outbox) == ["d2", "e3"]
        stats = outbox.stats()
        assert stats.dropped["expired"] == 2
        assert stats.oldest_age_s is not None
        assert 50 <= stats.oldest_age_s < 60
        assert_totals_match_rows(outbox)
        assert outbox.expire(now + 1000) == 2
        assert outbox.stats().oldest_age_s is None


def test_concurrent_writer_and_deleter_lose_and_duplicate_nothing(db_path: Path) -> None:
    enqueued: list[str] = []
    published: list[str] = []
    snapshots: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    stop_writing, writer_done = threading.Event(), threading.Event()

    def writer(outbox: Outbox) -> None:
        rng, number = random.Random(1), 0
        while not stop_writing.is_set():
            items = batch(*(f"d{number + j:07d}" for j in range(rng.randint(1, 30))), size=300)
            outbox.enqueue(items)
            enqueued.extend(m.msg_id for m in items)
            number += len(items)

    def publisher(outbox: Outbox) -> None:
        last_seq, in_flight = 0, list[int]()
        while True:
            drained = writer_done.is_set()  # read before peeking: rows committed earlier are all visible
            rows = outbox.peek(50, after_seq=last_seq)  # publish ahead of the PUBACKs, like the publisher
            published.extend(r.message.msg_id for r in rows)
            outbox.delete(in_flight)  # the previous window's PUBACKs
            in_flight = [r.seq for r in rows]
            last_seq = rows[-1].seq if rows else last_seq
            if drained and not rows:
                return

    def telemetry(outbox: Outbox) -> None:
        while not writer_done.is_set():
            stats = outbox.stats()
            snapshots.append((stats.depth, stats.bytes))

    def guarded(target: object, outbox: Outbox, done: threading.Event | None = None) -> None:
        try:
            assert callable(target)
            target(outbox)
        except BaseException as exc:
            errors.append(exc)
            stop_writing.set()
        finally:
            if done is not None:
                done.set()

    with Outbox(db_path) as outbox:
        threads = [
            threading.Thread(target=guarded, args=(writer, outbox, writer_done)),
            threading.Thread(target=guarded, args=(publisher, outbox)),
            threading.Thread(target=guarded, args=(telemetry, outbox)),
        ]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        stop_writing.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        assert len(enqueued) > 1000
        assert published == enqueued
        assert all(depth >= 0 and size == depth * 300 for depth, size in snapshots)
        assert (outbox.stats().depth, outbox.stats().bytes) == (0, 0)


KILL_CHILD = """
import sys
from pathlib import Path
from device_agent.outbox import MessageKind, Outbox, OutboxMessage
outbox = Outbox(Path(sys.argv[1]))
run, number = sys.argv[2], 0
while True:
    ids = [f"{run}-{number:06d}-{j:02d}" for j in range(20)]
    outbox.enqueue([OutboxMessage(i, "t", b"x" * 300, MessageKind.DETECTION) for i in ids])
    print(ids[-1], flush=True)
    number += 1
"""


def read_lines(stream: IO[str], into: list[str]) -> None:
    into.extend(line.strip() for line in stream)


def run_and_kill(db_path: Path, run: str, delay: float) -> list[str]:
    """Start the writer, SIGKILL it `delay` s after its first commit; the last msg_ids it reported."""
    command = [sys.executable, "-c", KILL_CHILD, str(db_path), run]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT) as child:
        assert child.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=read_lines, args=(child.stdout, lines))
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while not lines and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.01)
            assert lines, f"the writer process never committed a batch (exit code {child.poll()})"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            reader.join()
        assert child.returncode == -signal.SIGKILL
    return lines


def test_committed_batches_survive_kill_9(db_path: Path) -> None:
    rng = random.Random()
    reported: list[str] = []
    for run in ("r0", "r1", "r2"):
        delay = rng.uniform(0.05, 0.6)
        reported += run_and_kill(db_path, run, delay)
        with Outbox(db_path) as reopened:
            ids = stored_ids(reopened)
        missing = set(reported) - set(ids)
        assert not missing, f"{len(missing)} reported-committed messages lost (killed after {delay:.2f} s)"
        assert ids == sorted(ids), "FIFO order broken"
        per_batch = Counter(msg_id.rsplit("-", 1)[0] for msg_id in ids)
        assert set(per_batch.values()) == {20}, "a batch was stored in part"


def test_a_file_that_is_not_an_outbox_gives_a_clear_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not SQLite at all, " * 200)
    with pytest.raises(OutboxFileError, match="Move it aside") as garbage:
        Outbox(db_path)
    assert str(db_path) in str(garbage.value)
    db_path.unlink()
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE notes (text TEXT)")
    other.commit()
    other.close()
    with pytest.raises(OutboxFileError, match="not an edgefleet outbox"):
        Outbox(db_path)
    db_path.rename(db_path.with_suffix(".broken"))
    with Outbox(db_path) as fresh:  # what the message says to do works
        assert fresh.stats().depth == 0


def test_corrupt_pages_give_the_same_clear_error(db_path: Path) -> None:
    with Outbox(db_path) as outbox:
        for number in range(20):
            outbox.enqueue([message(f"c{number}-{j}", size=3000) for j in range(20)])
    with db_path.open("r+b") as database:  # closed cleanly: the WAL is checkpointed into this file
        database.seek(3 * 4096)
        database.write(os.urandom(20 * 4096))
    with pytest.raises(OutboxFileError, match="Move it aside") as corrupt:
        open_and_read_all(db_path)
    assert str(db_path) in str(corrupt.value)


def open_and_read_all(path: Path) -> None:
    with Outbox(path) as outbox:
        outbox.stats()
        outbox.peek(10_000)


def test_closed_outbox_says_so(db_path: Path) -> None:
    outbox = Outbox(db_path)
    outbox.enqueue([])
    outbox.close()
    with pytest.raises(RuntimeError, match="is closed"):
        outbox.peek(1)
