"""Outbox drain rate to a real Mosquitto versus raw paho QoS 1 publishing, same messages, same window.

    .venv/bin/python -m benchmarks.outbox_drain [--messages 20000] [--payload-bytes 300] [--window 100]
        [--handover 200] [--rounds 5]

Starts a private `mosquitto` on a free loopback port (tests/broker.py). Each round times, alternately:
- raw paho: one MQTT 5 client with `max_inflight_messages = window` is handed every message at once (paho
  queues the rest in memory) and the clock stops at the last PUBACK;
- the outbox: the same messages already stored in a fresh outbox, a session with the same paho
  `max_inflight` (at most `window` PUBLISHes unacknowledged on the wire) and a publisher that hands paho at
  most `--handover` rows; the clock runs from `OutboxPublisher.start` until `flush` returns, i.e. every row
  published, acknowledged and deleted.
Reports messages/s and this process's CPU µs per message for each round, the medians and the ratio of the
rates (target: outbox >= 0.8 x raw paho). On a shared or busy machine the rates swing by 2x from round to
round: compare the medians, and the CPU per message, which is steadier.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.outbox import MessageKind, Outbox, OutboxLimits, OutboxMessage
from device_agent.publisher import OutboxPublisher
from fleet_protocol.mqtt import MqttSession, MqttSettings
from tests.broker import MosquittoBroker

TOPIC = "edgefleet/v1/devices/bench-0001/detections"


def make_messages(count: int, payload_bytes: int, run: str) -> list[OutboxMessage]:
    return [
        OutboxMessage(
            msg_id=f"{run}-{i:09d}",
            topic=TOPIC,
            payload=f"{run}-{i:09d} ".encode().ljust(payload_bytes, b"x"),
            kind=MessageKind.DETECTION,
        )
        for i in range(count)
    ]


def raw_paho_rate(
    broker: MosquittoBroker, messages: list[OutboxMessage], window: int, run: str
) -> tuple[float, float]:
    acked = 0
    all_acked = threading.Event()

    def on_publish(client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == len(messages):
            all_acked.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{run}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    while not client.is_connected():
        time.sleep(0.01)
    start, cpu_start = time.perf_counter(), time.process_time()
    for message in messages:
        client.publish(message.topic, message.payload, qos=1)
    if not all_acked.wait(120):
        raise TimeoutError(f"raw paho: only {acked} of {len(messages)} PUBACKs within 120 s")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    client.disconnect()
    client.loop_stop()
    return len(messages) / elapsed, cpu * 1e6 / len(messages)


def outbox_rate(
    broker: MosquittoBroker,
    messages: list[OutboxMessage],
    window: int,
    handover: int,
    workdir: Path,
    run: str,
) -> tuple[float, float]:
    outbox = Outbox(workdir / f"outbox-{run}.db", OutboxLimits(max_bytes=1 << 30))
    for first in range(0, len(messages), 500):
        outbox.enqueue(messages[first : first + 500])
    settings = MqttSettings(
        host=broker.host, port=broker.port, client_id=f"outbox-{run}", max_inflight=window
    )
    session = MqttSession(settings)
    publisher = OutboxPublisher(outbox, session, window=handover)
    session.connect()
    if not session.wait_connected(10):
        raise TimeoutError(f"no connection to {broker.host}:{broker.port}")
    start, cpu_start = time.perf_counter(), time.process_time()
    publisher.start()
    if not publisher.flush(timeout=120):
        raise TimeoutError(f"outbox not drained within 120 s: {publisher.counters()}")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    publisher.stop()
    session.disconnect()
    depth = outbox.stats().depth
    outbox.close()
    if depth:
        raise RuntimeError(f"outbox still holds {depth} rows after flush")
    return len(messages) / elapsed, cpu * 1e6 / len(messages)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--window", type=int, default=100, help="PUBLISHes unacknowledged on the wire (both)")
    parser.add_argument("--handover", type=int, default=200, help="rows the publisher hands paho ahead")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="outbox-drain-") as tmp:
        workdir = Path(tmp)
        broker = MosquittoBroker(workdir / "mosquitto").start()
        try:
            raw_rates, outbox_rates = [], []
            print(
                f"{args.messages} messages of {args.payload_bytes} B, QoS 1, window {args.window}, handover "
                f"{args.handover}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )
            print(
                f"{'round':>5} {'raw paho msg/s':>15} {'cpu µs/msg':>10} "
                f"{'outbox msg/s':>13} {'cpu µs/msg':>10}"
            )
            for round_index in range(args.rounds):
                run = f"r{round_index}"
                messages = make_messages(args.messages, args.payload_bytes, run)
                raw, raw_cpu = raw_paho_rate(broker, messages, args.window, run)
                ours, our_cpu = outbox_rate(broker, messages, args.window, args.handover, workdir, run)
                raw_rates.append(raw)
                outbox_rates.append(ours)
                print(f"{round_index + 1:>5} {raw:>15.0f} {raw_cpu:>10.0f} {ours:>13.0f} {our_cpu:>10.0f}")
            raw, ours = statistics.median(raw_rates), statistics.median(outbox_rates)
            print(
                f"median raw paho {raw:.0f} msg/s, outbox {ours:.0f} msg/s: "
                f"ratio {ours / raw:.2f} (target >= 0.8)"
            )
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
