"""The durable outbox, side by side in one run: enqueue msgs/s, and the drain to Mosquitto versus raw paho.

    .venv/bin/python benchmarks/outbox.py [--messages 20000] [--payload-bytes 400] [--window 100]
        [--rounds 5] [--dir runs] [--full] [--client-cpu 1] [--stats-rows 10000 100000]

1. Durable enqueue: msgs/s, CPU µs per message and per-call latency for batches of 1, 10 and 100 messages
   (each `enqueue` is one committed transaction; WAL, synchronous=NORMAL, and FULL too with --full), and
   the agent's own pattern: one batch per published frame, its detection event (~1.2 kB) plus the crops
   cut from that frame (0-3 of ~8 kB), with the outbox publisher listening (as in the agent, its session
   not connected here: rows stay in the outbox). Durable means: `enqueue` returns after COMMIT, which in WAL
   mode with synchronous=NORMAL appends to the WAL without fsync, so a committed batch survives the process
   dying (kill -9, OOM) but not a power cut before the kernel writes it back; FULL fsyncs every commit.
   The databases live under --dir: put it on the device's real disk (tmpfs flatters the numbers).
2. Drain to a private `mosquitto` on a free loopback port, the same detection-like messages (JSON payload,
   content type property, QoS 1) and the same window of unacknowledged PUBLISHes, rounds alternating:
   - raw paho: one MQTT 5 client is handed every message at once (paho queues them in memory), one shared
     Properties object; the clock stops at the last PUBACK. No durability at all: the upper bound.
   - backlog: the messages are already in the outbox (as after an outage or a restart); the clock runs from
     `OutboxPublisher.start` until `flush` returns: every row read, published, acknowledged and deleted.
   - live: the publisher runs while this thread enqueues batches of 10 (rows reach the publisher in memory);
     the clock runs from the first enqueue until `flush` returns, so it includes the durable writes.
   - our client: raw paho again, but through edgefleet's paho client (`fleet_protocol.mqtt._Client`, whose
     publish path reads plain PUBACKs and sends queued messages without paho's per-message overheads) and
     its shared, packed-once properties: the drain without the outbox, so backlog / our client is what
     durability costs.
   Reports msgs/s and this process's CPU µs per message, the medians and the ratios to raw paho (target:
   drain >= 0.8 x raw paho). On a shared machine the rates swing from round to round: compare the medians,
   and the CPU per message, which is steadier.
   With --client-cpu N the drain is measured again with this process on CPU N alone (the broker, as a
   remote one would be, elsewhere): the outbox's two busy threads (publisher and paho's) then trade the
   GIL on one core instead of across two, which on 2 CPUs is much of what the outbox costs beyond our
   client alone.
3. `stats()` (running totals) against the aggregate query it replaces, on outboxes of --stats-rows rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.outbox import MessageKind, Outbox, OutboxLimits, OutboxMessage
from device_agent.publisher import OutboxPublisher
from fleet_protocol.mqtt import MessageProperties, MqttSession, MqttSettings
from fleet_protocol.mqtt import _Client as MqttClient

try:
    from benchmarks._mosquitto import PrivateMosquitto
except ModuleNotFoundError:  # run as a script: this folder is on sys.path
    from _mosquitto import PrivateMosquitto  # type: ignore[no-redef]

TOPIC = "edgefleet/v1/devices/bench-0001/detections"
CROP_TOPIC = "edgefleet/v1/devices/bench-0001/crops"
CONTENT_TYPE = "application/json"
PROPERTIES = MessageProperties(content_type=CONTENT_TYPE)
CROP_PROPERTIES = MessageProperties(  # what the agent's crops carry (CropMeta as user properties)
    content_type="image/jpeg",
    response_topic="edgefleet/v1/devices/bench-0001/refined",
    correlation_data=b"01JBENCHDET0000000000000000",
    user_properties=(
        ("schema", "edgefleet.crop/1"),
        ("msg_id", "01JBENCHCROP000000000000000"),
        ("device_id", "bench-0001"),
        ("ts", "2024-09-17T12:00:00.000000Z"),
        ("det_id", "01JBENCHDET0000000000000000"),
        ("label", "person"),
        ("class_id", "0"),
        ("confidence", "0.8731"),
        ("bbox", "[412.5,118.25,503.75,377.0]"),
        ("model", '{"name":"yolov8n","version":"3"}'),
    ),
)
BATCH_SIZES = (1, 10, 100)
LIVE_BATCH = 10


def make_messages(count: int, payload_bytes: int, run: str) -> list[OutboxMessage]:
    """Detection-like messages: a JSON object padded to `payload_bytes`, with the agent's properties."""
    messages = []
    for i in range(count):
        msg_id = f"{run}-{i:09d}"
        body = json.dumps({"schema": "edgefleet.detection/1", "msg_id": msg_id, "pad": ""})
        pad = "x" * max(0, payload_bytes - len(body))
        payload = json.dumps({"schema": "edgefleet.detection/1", "msg_id": msg_id, "pad": pad}).encode()
        messages.append(
            OutboxMessage(
                msg_id=msg_id, topic=TOPIC, payload=payload, kind=MessageKind.DETECTION, properties=PROPERTIES
            )
        )
    return messages


# ---- 1. enqueue -------------------------------------------------------------------------------------------


def bench_enqueue(folder: Path, batch: int, messages: int, payload_bytes: int, full: bool) -> list[str]:
    """One row of the enqueue table: msgs/s, CPU per message and per-enqueue latency percentiles."""
    items = make_messages(messages, payload_bytes, f"b{batch}")
    outbox = Outbox(folder / f"enqueue-{batch}-{full}.db", synchronous="FULL" if full else "NORMAL")
    batches = [items[first : first + batch] for first in range(0, len(items), batch)]
    row = timed_enqueue(outbox, batches)
    outbox.close()
    return ["FULL" if full else "NORMAL", str(batch), *row]


def bench_agent_pattern(folder: Path, frames: int, full: bool) -> list[str]:
    """The agent's enqueues: per frame its event and 0-3 crops, the outbox publisher listening."""
    rng = random.Random(7)
    batches = []
    for frame in range(frames):
        event = make_messages(1, 1200, f"a{frame}")
        crops = [
            OutboxMessage(
                msg_id=f"a{frame}-c{i}",
                topic=CROP_TOPIC,
                payload=rng.randbytes(rng.randint(4000, 12000)),
                kind=MessageKind.CROP,
                properties=CROP_PROPERTIES,
            )
            for i in range(rng.choice((0, 0, 1, 1, 2, 3)))
        ]
        batches.append(event + crops)
    outbox = Outbox(folder / f"agent-{full}.db", synchronous="FULL" if full else "NORMAL")
    session = MqttSession(MqttSettings(host="127.0.0.1", port=9, client_id="bench-agent-pattern"))
    publisher = OutboxPublisher(outbox, session)  # never connected: it keeps rows in memory, as the agent
    publisher.start()
    try:
        row = timed_enqueue(outbox, batches, after_each=publisher.notify)
    finally:
        publisher.stop()
        outbox.close()
    return ["FULL" if full else "NORMAL", "agent", *row]


def timed_enqueue(
    outbox: Outbox, batches: list[list[OutboxMessage]], after_each: Callable[[], None] | None = None
) -> list[str]:
    latencies: list[float] = []
    count = sum(len(b) for b in batches)
    start, cpu = time.perf_counter(), time.process_time()
    for items in batches:
        t0 = time.perf_counter()
        outbox.enqueue(items)
        if after_each is not None:
            after_each()
        latencies.append(time.perf_counter() - t0)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if outbox.stats().depth != count:
        raise RuntimeError("the enqueue benchmark lost messages")
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return [
        f"{count:,}",
        f"{count / elapsed:,.0f}",
        f"{len(batches) / elapsed:,.0f}",
        f"{cpu * 1e6 / count:.1f}",
        f"{cuts[49] * 1e3:.3f}",
        f"{cuts[98] * 1e3:.3f}",
    ]


# ---- 2. drain ---------------------------------------------------------------------------------------------


def raw_paho_rate(
    broker: PrivateMosquitto,
    messages: list[OutboxMessage],
    window: int,
    run: str,
    client_class: type[paho.Client] = paho.Client,
) -> Rate:
    acked = 0
    all_acked = threading.Event()

    def on_publish(client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == len(messages):
            all_acked.set()

    client = client_class(CallbackAPIVersion.VERSION2, client_id=f"raw-{run}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    while not client.is_connected():
        time.sleep(0.01)
    properties: Properties | None
    if client_class is paho.Client:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = CONTENT_TYPE
    else:  # edgefleet's client gets the Properties edgefleet's session would hand it
        properties = PROPERTIES.to_paho()
    with Rate(len(messages)) as rate:
        for message in messages:
            client.publish(message.topic, message.payload, qos=1, properties=properties)
        if not all_acked.wait(120):
            raise TimeoutError(f"raw paho: only {acked} of {len(messages)} PUBACKs within 120 s")
    client.disconnect()
    client.loop_stop()
    return rate


def outbox_rate(
    broker: PrivateMosquitto, messages: list[OutboxMessage], window: int, workdir: Path, run: str, live: bool
) -> Rate:
    outbox = Outbox(workdir / f"outbox-{run}.db", OutboxLimits(max_bytes=1 << 30))
    if not live:
        for first in range(0, len(messages), 500):
            outbox.enqueue(messages[first : first + 500])
    session = MqttSession(
        MqttSettings(host=broker.host, port=broker.port, client_id=f"outbox-{run}", max_inflight=window)
    )
    publisher = OutboxPublisher(outbox, session, window=window)
    session.connect()
    if not session.wait_connected(10):
        raise TimeoutError(f"no connection to {broker.host}:{broker.port}")
    if live:
        publisher.start()
    with Rate(len(messages)) as rate:
        if live:
            for first in range(0, len(messages), LIVE_BATCH):
                outbox.enqueue(messages[first : first + LIVE_BATCH])
                publisher.notify()
        else:
            publisher.start()
        if not publisher.flush(timeout=120):
            raise TimeoutError(f"outbox not drained within 120 s: {publisher.counters()}")
    publisher.stop()
    session.disconnect()
    depth = outbox.stats().depth
    outbox.close()
    if depth:
        raise RuntimeError(f"the outbox still holds {depth} rows after flush")
    return rate


class Rate:
    """Times a block: messages per second of wall time, and this process's CPU µs per message."""

    def __init__(self, messages: int) -> None:
        self.messages = messages
        self.per_s = self.cpu_us = 0.0

    def __enter__(self) -> Rate:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.per_s = self.messages / (time.perf_counter() - self._wall)
        self.cpu_us = (time.process_time() - self._cpu) * 1e6 / self.messages


def bench_drain(args: argparse.Namespace, workdir: Path, client_cpu: int | None = None) -> None:
    runs: dict[str, list[Rate]] = {"raw paho": [], "backlog": [], "live": [], "our client": []}
    where = "" if client_cpu is None else f"; this process pinned to CPU {client_cpu}, the broker not"
    print(
        f"\ndrain: {args.messages:,} messages of {args.payload_bytes} B, QoS 1, window {args.window}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs{where}"
    )
    header = "".join(f"{name + ' msg/s':>17}{'cpu µs/msg':>11}" for name in runs)
    print(f"{'round':>5}{header}")
    with PrivateMosquitto(workdir / f"mosquitto-{client_cpu}") as broker, pinned(client_cpu):
        for round_index in range(args.rounds):
            run = f"r{round_index}"
            messages = make_messages(args.messages, args.payload_bytes, run)
            runs["raw paho"].append(raw_paho_rate(broker, messages, args.window, run))
            runs["backlog"].append(outbox_rate(broker, messages, args.window, workdir, run + "b", False))
            runs["live"].append(outbox_rate(broker, messages, args.window, workdir, run + "l", True))
            runs["our client"].append(raw_paho_rate(broker, messages, args.window, run + "c", MqttClient))
            cells = "".join(f"{r[-1].per_s:>17,.0f}{r[-1].cpu_us:>11.0f}" for r in runs.values())
            print(f"{round_index + 1:>5}{cells}")
    medians = {name: statistics.median(r.per_s for r in rates) for name, rates in runs.items()}
    cpu = {name: statistics.median(r.cpu_us for r in rates) for name, rates in runs.items()}
    raw = medians["raw paho"]
    cells = "".join(f"{medians[name]:>17,.0f}{cpu[name]:>11.0f}" for name in runs)
    print(f"{'med.':>5}{cells}")
    print(
        f"drain (backlog) / raw paho: {medians['backlog'] / raw:.2f} (target >= 0.8); "
        f"live enqueue+drain / raw paho: {medians['live'] / raw:.2f}; "
        f"CPU per message, raw / backlog: {cpu['raw paho'] / cpu['backlog']:.2f}"
    )
    print(
        f"drain (backlog) / our client without the outbox: {medians['backlog'] / medians['our client']:.2f} "
        "(what durability costs)"
    )


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run this thread, and the threads it starts, on one CPU (Linux); None: leave the affinity alone."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---- 3. stats() -------------------------------------------------------------------------------------------


def bench_stats(folder: Path, rows: int, payload_bytes: int) -> list[str]:
    """`stats()` against `SELECT count(*), sum(size)` on an outbox holding `rows` messages."""
    # max_bytes is on disk: each row's metadata, B-tree entries and the WAL's share come on top of its payload
    outbox = Outbox(folder / f"stats-{rows}.db", OutboxLimits(max_bytes=rows * (payload_bytes + 1024) * 2))
    items = make_messages(rows, payload_bytes, "s")
    for first in range(0, rows, 1000):
        outbox.enqueue(items[first : first + 1000])
    if outbox.stats().depth != rows:
        raise RuntimeError(f"the stats benchmark's outbox dropped messages: {outbox.stats()}")
    stats_ms = timed_ms(outbox.stats)
    conn = sqlite3.connect(outbox.path)
    aggregate_ms = timed_ms(lambda: conn.execute("SELECT count(*), sum(size) FROM outbox").fetchone())
    conn.close()
    outbox.close()
    return [f"{rows:,}", f"{stats_ms:.3f}", f"{aggregate_ms:.3f}"]


def timed_ms(call: Callable[[], object], repeat: int = 20) -> float:
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
    parser.add_argument("--messages", type=int, default=20_000, help="messages per measurement")
    parser.add_argument("--payload-bytes", type=int, default=400)
    parser.add_argument("--window", type=int, default=100, help="PUBLISHes awaiting PUBACK (the agent's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where the temporary databases go")
    parser.add_argument("--full", action="store_true", help="also enqueue with synchronous=FULL")
    parser.add_argument(
        "--client-cpu",
        type=int,
        help="also measure the drain with this process pinned to this CPU (Linux), the broker not",
    )
    parser.add_argument("--stats-rows", type=int, nargs="*", default=[10_000, 100_000])
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="outbox-bench-") as tmp:
        folder = Path(tmp)
        print(f"outbox benchmark: {args.payload_bytes}-byte payloads, databases in {folder}")
        rows = []
        for full in (False, True) if args.full else (False,):
            rows += [
                bench_enqueue(folder, batch, args.messages, args.payload_bytes, full) for batch in BATCH_SIZES
            ]
            rows.append(bench_agent_pattern(folder, args.messages // 4, full))
        print_table(
            "durable enqueue (target >= 20,000 msgs/s; the agent: one batch per published frame)",
            ["sync", "batch", "msgs", "msgs/s", "batches/s", "cpu µs/msg", "p50 ms", "p99 ms"],
            rows,
        )
        bench_drain(args, folder)
        if args.client_cpu is not None:
            bench_drain(args, folder, args.client_cpu)
        if args.stats_rows:
            stats_rows = [bench_stats(folder, n, args.payload_bytes) for n in args.stats_rows]
            print_table("stats() vs aggregate", ["rows", "stats() ms", "count+sum ms"], stats_rows)


if __name__ == "__main__":
    main()
