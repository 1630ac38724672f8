"""Refiner throughput at batch 1 versus micro-batched, and latency under load, measured side by side.

    .venv/bin/python benchmarks/refiner.py [--config refiner.yaml] [--model ...] [--per-round N] [--rounds N]

Both modes run the refiner's own service core (JPEG decode, resize/crop, micro-batcher, onnxruntime,
class conditioning) on the same JPEG crops: COCO128 ground-truth boxes (>= 48 px, 10% padding) encoded at
<= 320 px the way a device sends them. MQTT is left out so that the broker and the publisher do not share
the CPU with what is measured.

1. Maximum rate: all crops are submitted as fast as the bounded queue takes them (one submitting thread
   decodes while the worker classifies); crops/s = crops / (first submit -> last result). Batch 1
   (max_batch 1) and micro-batched (max_batch, max_wait_ms from the config) alternate round by round, so
   both see the same machine; the medians, the median of the paired rounds' ratios (target >= 1.5x) and
   the CPU time per crop of each mode are printed (CPU time is what other load disturbs least).
2. Latency: an open-loop load at 50% and 90% of the micro-batched maximum rate (constant arrivals; latency
   counted from each crop's scheduled arrival, so a stalled submitter cannot hide queueing) for both modes;
   p50 / p95 in ms. Batch 1 cannot keep up where the offered rate exceeds its own maximum: its queue fills,
   latency grows and crops are refused (shown as dropped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import cv2
import numpy as np

from cloud_refiner.batcher import QueueFullError
from cloud_refiner.conditioning import LabelSubsets
from cloud_refiner.config import BatchingConfig, RefinerSettings, load_settings
from cloud_refiner.evaluation import ground_truth_crops
from cloud_refiner.runtime import build_service
from cloud_refiner.service import RefineResult, RefinerService

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def device_jpegs(data_yaml: Path, count: int) -> list[tuple[bytes, str]]:
    crops = ground_truth_crops(data_yaml, LabelSubsets.load())
    out = []
    for crop in crops[:count]:
        image = crop.crop
        scale = 320 / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        out.append((jpeg.tobytes(), crop.label))
    return out


def make_service(settings: RefinerSettings, max_batch: int, max_wait_ms: float) -> RefinerService:
    batching = BatchingConfig(
        max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=settings.batching.queue_size
    )
    return build_service(settings.model_copy(update={"batching": batching})).start()


def max_rate(service: RefinerService, jpegs: list[tuple[bytes, str]], count: int) -> tuple[float, float]:
    """(crops per wall-clock second, CPU ms of this process per crop) for `count` crops at full speed."""
    futures: list[Future[RefineResult]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(count):
        jpeg, label = jpegs[index % len(jpegs)]
        submission = service.submit(jpeg, label, source="bench", timeout=None)
        assert submission.future is not None
        futures.append(submission.future)
    for future in futures:
        future.result()
    return count / (time.perf_counter() - start), (time.process_time() - cpu_start) * 1e3 / count


def open_loop(
    service: RefinerService, jpegs: list[tuple[bytes, str]], rate: float, duration_s: float
) -> tuple[float, float, int, int]:
    """(p50 ms, p95 ms, crops done, crops refused) for constant arrivals at `rate` per second."""
    count = max(10, int(rate * duration_s))
    latencies: list[float] = []
    refused = 0
    lock = threading.Lock()
    done = threading.Semaphore(0)
    start = time.perf_counter() + 0.05

    def finished(scheduled: float, future: Future[RefineResult]) -> None:
        if not future.cancelled() and future.exception() is None:
            with lock:
                latencies.append(future.result().done_at - scheduled)
        done.release()

    accepted = 0
    for index in range(count):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jpeg, label = jpegs[index % len(jpegs)]
        try:
            submission = service.submit(jpeg, label, source="bench", received_at=scheduled, timeout=0)
        except QueueFullError:
            refused += 1
            continue
        assert submission.future is not None
        accepted += 1
        submission.future.add_done_callback(lambda f, s=scheduled: finished(s, f))
    for _ in range(accepted):
        done.acquire()
    ms = np.asarray(latencies) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), len(latencies), refused


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="refiner YAML (classifier, batching); default settings")
    parser.add_argument("--model", type=Path, help="ONNX classifier (overrides the config)")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "coco128" / "coco128.yaml")
    parser.add_argument("--crops", type=int, default=128, help="distinct crops (at most 245 in COCO128)")
    parser.add_argument("--per-round", type=int, help="crops per round and mode (default: --crops)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batch", type=int, help="micro-batched mode's max batch (default: config)")
    parser.add_argument("--max-wait-ms", type=float, help="micro-batched mode's max wait (default: config)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each latency run")
    args = parser.parse_args()

    settings = load_settings(args.config)
    if args.model is not None:
        settings = settings.model_copy(
            update={"classifier": settings.classifier.model_copy(update={"path": args.model})}
        )
    max_batch = args.max_batch or settings.batching.max_batch
    max_wait = settings.batching.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms
    jpegs = device_jpegs(args.data, args.crops)
    per_round = args.per_round or len(jpegs)
    single = make_service(settings, 1, 0.0)
    batched = make_service(settings, max_batch, max_wait)
    info = single.info
    print(
        f"{info.name} {info.version} on {','.join(info.providers)}; {per_round} crops per round "
        f"({len(jpegs)} distinct COCO128 crops); "
        f"micro-batched: max_batch {max_batch}, max_wait {max_wait:g} ms; "
        f"queue {settings.batching.queue_size}"
    )
    for service in (single, batched):  # warm-up: first runs allocate onnxruntime's buffers
        max_rate(service, jpegs, max_batch * 2)

    print(
        f"{'round':>5} {'batch 1 crops/s':>16} {'micro-batched crops/s':>22} {'ratio':>7}"
        f" {'batch 1 CPU ms/crop':>20} {'micro-batched CPU ms/crop':>26}"
    )
    single_rates, batched_rates, single_cpu, batched_cpu = [], [], [], []
    for round_index in range(args.rounds):
        for service, rates, cpu in (
            (single, single_rates, single_cpu),
            (batched, batched_rates, batched_cpu),
        ):
            rate, cpu_ms = max_rate(service, jpegs, per_round)
            rates.append(rate)
            cpu.append(cpu_ms)
        ratio = batched_rates[-1] / single_rates[-1]
        print(
            f"{round_index + 1:>5} {single_rates[-1]:>16.1f} {batched_rates[-1]:>22.1f} {ratio:>7.2f}"
            f" {single_cpu[-1]:>20.1f} {batched_cpu[-1]:>26.1f}"
        )
    single_max, batched_max = statistics.median(single_rates), statistics.median(batched_rates)
    # Paired rounds see the same machine; on a shared machine their ratio is steadier than either rate.
    round_ratio = statistics.median(b / s for b, s in zip(batched_rates, single_rates, strict=True))
    cpu_ratio = statistics.median(single_cpu) / statistics.median(batched_cpu)
    print(
        f"median  batch 1 {single_max:.1f} crops/s, micro-batched {batched_max:.1f} crops/s; "
        f"throughput ratio {round_ratio:.2f}x (median of the paired rounds; target >= 1.5x); "
        f"CPU per crop {statistics.median(single_cpu):.1f} vs {statistics.median(batched_cpu):.1f} ms "
        f"({cpu_ratio:.2f}x)"
    )

    print(f"\nlatency, open loop, {args.duration:g} s per run (from scheduled arrival to refined)")
    print(f"{'offered':>22} {'mode':>14} {'p50 ms':>9} {'p95 ms':>9} {'done':>6} {'dropped':>8}")
    for fraction in (0.5, 0.9):
        rate = batched_max * fraction
        for name, service in (("batch 1", single), ("micro-batched", batched)):
            p50, p95, done, refused = open_loop(service, jpegs, rate, args.duration)
            label = f"{fraction:.0%} = {rate:.1f}/s"
            print(f"{label:>22} {name:>14} {p50:>9.1f} {p95:>9.1f} {done:>6} {refused:>8}")
    single.stop()
    batched.stop()


if __name__ == "__main__":
    sys.exit(main())
