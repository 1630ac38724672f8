"""Durable outbox enqueue throughput (msgs/s) by batch size, and the cost of `stats()`.

    .venv/bin/python benchmarks/outbox_enqueue.py [--messages 20000] [--payload-bytes 300] [--dir runs]

Each `enqueue` is one committed transaction (WAL, synchronous=NORMAL unless --full). The database lives in a
temporary folder under --dir: put it on the disk the device really uses (tmpfs would flatter the numbers).
The second table compares `stats()` (running totals kept in a table) with the aggregate query it replaces.
With --full every commit also fsyncs the WAL; on a virtual disk fsync is often nearly free, so compare
NORMAL and FULL on the device's own storage (eMMC, SD card, NVMe).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from device_agent.outbox import MessageKind, Outbox, OutboxLimits, OutboxMessage
from fleet_protocol.mqtt import MessageProperties

BATCH_SIZES = (1, 10, 100)
CROP_PROPERTIES = MessageProperties(
    content_type="application/json", user_properties=(("msg_id", "x"), ("label", "person"))
)


def make_messages(count: int, payload_bytes: int, run: str) -> list[OutboxMessage]:
    payload = os.urandom(payload_bytes)
    return [
        OutboxMessage(
            msg_id=f"{run}-{i:09d}",
            topic="edgefleet/v1/devices/bench-0001/detections",
            payload=payload,
            kind=MessageKind.DETECTION,
            properties=CROP_PROPERTIES if i % 10 == 0 else MessageProperties(),
        )
        for i in range(count)
    ]


def bench_enqueue(folder: Path, batch: int, messages: int, payload_bytes: int, full: bool) -> list[str]:
    """One row of the enqueue table: msgs/s and per-enqueue latency percentiles."""
    items = make_messages(messages, payload_bytes, f"b{batch}")
    outbox = Outbox(folder / f"enqueue-{batch}-{full}.db", synchronous="FULL" if full else "NORMAL")
    latencies: list[float] = []
    start = time.perf_counter()
    for first in range(0, len(items), batch):
        t0 = time.perf_counter()
        outbox.enqueue(items[first : first + batch])
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    assert outbox.stats().depth == len(items), "benchmark lost messages"
    outbox.close()
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return [
        "FULL" if full else "NORMAL",
        str(batch),
        str(len(items)),
        f"{len(items) / elapsed:,.0f}",
        f"{cuts[49] * 1e3:.3f}",
        f"{cuts[98] * 1e3:.3f}",
    ]


def bench_stats(folder: Path, rows: int, payload_bytes: int) -> list[str]:
    """`stats()` against `SELECT count(*), sum(size)` on an outbox holding `rows` messages."""
    outbox = Outbox(folder / f"stats-{rows}.db", OutboxLimits(max_bytes=rows * payload_bytes * 2))
    items = make_messages(rows, payload_bytes, "s")
    for first in range(0, rows, 1000):
        outbox.enqueue(items[first : first + 1000])
    stats_ms = timed_ms(outbox.stats)
    conn = sqlite3.connect(outbox.path)
    aggregate_ms = timed_ms(lambda: conn.execute("SELECT count(*), sum(size) FROM outbox").fetchone())
    conn.close()
    outbox.close()
    return [f"{rows:,}", f"{stats_ms:.3f}", f"{aggregate_ms:.3f}"]


def timed_ms(call: object, repeat: int = 20) -> float:
    assert callable(call)
    call()  # warm the page cache
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - start) / repeat * 1e3


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for line in (header, ["-" * w for w in widths], *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per batch size")
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where the temporary databases go")
    parser.add_argument(
        "--full", action="store_true", help="also measure synchronous=FULL (fsync per commit)"
    )
    parser.add_argument("--stats-rows", type=int, nargs="*", default=[10_000, 100_000, 800_000])
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="outbox-bench-") as tmp:
        folder = Path(tmp)
        print(f"outbox enqueue: {args.payload_bytes}-byte payloads, database in {folder}")
        modes = (False, True) if args.full else (False,)
        rows = [
            bench_enqueue(folder, batch, args.messages, args.payload_bytes, full)
            for full in modes
            for batch in BATCH_SIZES
        ]
        print_table("durable enqueue", ["sync", "batch", "msgs", "msgs/s", "p50 ms", "p99 ms"], rows)
        stats_rows = [bench_stats(folder, n, args.payload_bytes) for n in args.stats_rows]
        print_table("stats() vs aggregate", ["rows", "stats() ms", "count+sum ms"], stats_rows)


if __name__ == "__main__":
    main()
