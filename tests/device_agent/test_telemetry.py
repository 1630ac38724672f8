"""TelemetryCollector: percentiles, fps, RTT, outbox mapping, thermal parsing, payload validity, threads."""

from __future__ import annotations

import math
import os
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest

from device_agent.detector import Detector, StageTimings
from device_agent.outbox import MessageKind, Outbox, OutboxLimits, OutboxMessage, OutboxStats
from device_agent.telemetry import (
    DEFAULT_THERMAL_ROOT,
    STAGES,
    TelemetryCollector,
    hottest_temperature,
    read_psutil_sensors,
    read_thermal_zones,
)
from fleet_protocol.payloads import TelemetryPayload, decode, encode

DEVICE = "cam-0001"
NO_OUTBOX = OutboxStats(depth=0, bytes=0, oldest_age_s=None, dropped={})


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class SteppingClock:
    """Advances `step` seconds on every read: each snapshot interval is exactly `step` long."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def percentile_oracle(values: list[float], q: int) -> float:
    """Linear-interpolation percentile from the standard library (the method numpy uses by default)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_stage_percentiles_over_the_interval() -> None:
    clock = FakeClock()
    collector = TelemetryCollector(DEVICE, clock=clock)
    steps = list(range(1, 101))
    random.Random(7).shuffle(steps)  # order must not matter
    for i in steps:
        collector.record_frame(StageTimings(pre_ms=i * 0.5, infer_ms=i * 2.0, post_ms=i * 0.25))
    clock.now += 10.0
    report = collector.snapshot(NO_OUTBOX, frames_dropped=0)

    assert set(report.latency_ms) == set(STAGES)
    factors = {"pre": 0.5, "infer": 2.0, "post": 0.25, "total": 2.75}
    for stage, factor in factors.items():
        values = [i * factor for i in range(1, 101)]
        assert report.latency_ms[stage].p50 == pytest.approx(percentile_oracle(values, 50), abs=1e-3)
        assert report.latency_ms[stage].p95 == pytest.approx(percentile_oracle(values, 95), abs=1e-3)
    assert report.fps == pytest.approx(10.0)
    assert report.interval_s == pytest.approx(10.0)


def test_window_bounds_the_latency_samples_but_not_the_frame_count() -> None:
    clock = FakeClock()
    collector = TelemetryCollector(DEVICE, window=10, clock=clock)
    for i in range(1, 101):
        collector.record_frame(StageTimings(pre_ms=0.0, infer_ms=float(i), post_ms=0.0))
    clock.now += 4.0
    report = collector.snapshot(NO_OUTBOX, frames_dropped=0)

    last_ten = [float(i) for i in range(91, 101)]
    assert report.latency_ms["infer"].p50 == pytest.approx(statistics.median(last_ten))
    assert report.latency_ms["infer"].p95 == pytest.approx(percentile_oracle(last_ten, 95))
    assert report.fps == pytest.approx(100 / 4.0)


def test_each_snapshot_covers_only_its_own_interval() -> None:
    clock = FakeClock()
    collector = TelemetryCollector(DEVICE, clock=clock)
    for _ in range(30):
        collector.record_frame(StageTimings(pre_ms=1.0, infer_ms=20.0, post_ms=2.0))
    clock.now += 2.0
    first = collector.snapshot(NO_OUTBOX, frames_dropped=0)
    clock.now += 5.0
    quiet = collector.snapshot(NO_OUTBOX, frames_dropped=0)
    collector.record_frame(StageTimings(pre_ms=3.0, infer_ms=40.0, post_ms=4.0))
    clock.now += 0.5
    third = collector.snapshot(NO_OUTBOX, frames_dropped=0)

    assert (first.fps, first.interval_s) == pytest.approx((15.0, 2.0))
    assert (quiet.fps, quiet.interval_s) == pytest.approx((0.0, 5.0))
    assert quiet.latency_ms == {}
    assert (third.fps, third.latency_ms["total"].p50) == pytest.approx((2.0, 47.0))
    assert collector.frames_processed == 31


def test_a_clock_that_did_not_move_still_gives_a_valid_report() -> None:
    clock = FakeClock()
    collector = TelemetryCollector(DEVICE, clock=clock)
    for _ in range(5):
        collector.record_frame(StageTimings(pre_ms=1.0, infer_ms=1.0, post_ms=1.0))
    report = collector.snapshot(NO_OUTBOX, frames_dropped=0)  # zero elapsed: interval_s must stay > 0
    assert report.interval_s > 0
    assert 0.0 < report.fps <= 10_000.0


def test_link_rtt_is_the_median_of_the_interval_or_none() -> None:
    collector = TelemetryCollector(DEVICE, clock=FakeClock())
    assert collector.snapshot(NO_OUTBOX, frames_dropped=0).link_rtt_ms is None  # nothing measured yet

    rtts = [30.0, 10.0, 20.0, 1000.0]
    for ms in rtts:
        collector.record_link_rtt(ms)
    assert collector.snapshot(NO_OUTBOX, frames_dropped=0).link_rtt_ms == pytest.approx(
        statistics.median(rtts)
    )
    assert collector.snapshot(NO_OUTBOX, frames_dropped=0).link_rtt_ms is None  # none in this interval

    collector.record_link_rtt(12.0)
    collector.link_lost()
    assert collector.snapshot(NO_OUTBOX, frames_dropped=0).link_rtt_ms is None


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_impossible_measurements_are_refused_with_the_value(bad: float) -> None:
    collector = TelemetryCollector(DEVICE)
    with pytest.raises(ValueError, match="round trip"):
        collector.record_link_rtt(bad)
    with pytest.raises(ValueError, match="stage timings"):
        collector.record_frame(StageTimings(pre_ms=1.0, infer_ms=bad, post_ms=1.0))
    assert collector.frames_processed == 0


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="not a valid device id"):
        TelemetryCollector("cam/0001")
    with pytest.raises(ValueError, match="window"):
        TelemetryCollector(DEVICE, window=0)
    with pytest.raises(ValueError, match="cannot be negative"):
        TelemetryCollector(DEVICE).snapshot(NO_OUTBOX, frames_dropped=-1)


def crop(msg_id: str, size: int = 100) -> OutboxMessage:
    return OutboxMessage(msg_id=msg_id, topic="t", payload=os.urandom(size), kind=MessageKind.CROP)


def detection(msg_id: str, size: int = 100, created_at: float | None = None) -> OutboxMessage:
    return OutboxMessage(
        msg_id=msg_id,
        topic="t",
        payload=os.urandom(size),
        kind=MessageKind.DETECTION,
        created_at=time.time() if created_at is None else created_at,
    )


def test_outbox_stats_and_drops_come_from_a_real_outbox(tmp_path: Path) -> None:
    # 32 KiB on disk: 16 KiB of it the WAL's, 5.5 KiB the schema, the rest five messages of 1.5 kB
    with Outbox(tmp_path / "outbox.db", OutboxLimits(max_bytes=32 * 1024, max_age_s=60.0)) as outbox:
        outbox.enqueue([crop(f"c{i}", 1500) for i in range(5)])
        outbox.enqueue([detection("d0", 1500), detection("d1", 1500)])  # makes room: the 2 oldest crops go
        outbox.enqueue([detection("old", 1500, time.time() - 3600)])  # makes room: 1 more crop goes
        assert outbox.expire() == 1
        stats = outbox.stats()
    report = TelemetryCollector(DEVICE).snapshot(stats, frames_dropped=7)

    assert (report.outbox.depth, report.outbox.bytes) == (stats.depth, stats.bytes) == (4, 6000)
    assert report.outbox.dropped == {"crops": 3, "detections": 0, "events": 0, "expired": 1}
    assert report.frames_dropped == 7
    assert (report.outbox.crops_waiting, report.outbox.crops_held) == (2, False)
    held = TelemetryCollector(DEVICE).snapshot(stats, frames_dropped=7, crops_held=True)
    assert decode(TelemetryPayload, encode(held)).outbox.crops_held is True


def test_a_drop_kind_that_is_no_payload_key_is_left_out() -> None:
    stats = OutboxStats(depth=1, bytes=10, oldest_age_s=0.5, dropped={"crop": 2, "Bad Kind!": 1})
    report = TelemetryCollector(DEVICE).snapshot(stats, frames_dropped=0)
    assert report.outbox.dropped == {"crops": 2}


def test_snapshot_validates_and_round_trips_through_the_wire(tmp_path: Path) -> None:
    write_zone(tmp_path, 0, "CPU-therm", "48500\n")
    collector = TelemetryCollector(DEVICE, thermal_root=tmp_path, sensors_fallback=False)
    collector.record_frame(StageTimings(pre_ms=2.0, infer_ms=30.0, post_ms=1.5))
    collector.record_link_rtt(23.4)
    stats = OutboxStats(depth=3, bytes=1200, oldest_age_s=4.0, dropped={"crop": 1, "expired": 0})
    report = collector.snapshot(stats, frames_dropped=2)

    again = TelemetryPayload.model_validate(report.model_dump())
    decoded = decode(TelemetryPayload, encode(report))
    assert decoded == report == again
    assert decoded.device_id == DEVICE
    assert decoded.temperature_c == pytest.approx(48.5)


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def test_system_readings_are_of_this_process_and_this_machine() -> None:
    collector = TelemetryCollector(DEVICE)
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:  # keep one core busy
        pass
    reports: list[TelemetryPayload] = []
    # The timer thread, not the constructing one, makes the first report: its CPU reading must not be 0.0.
    timer = threading.Thread(target=lambda: reports.append(collector.snapshot(NO_OUTBOX, frames_dropped=0)))
    timer.start()
    timer.join()

    (report,) = reports
    assert 0.0 < report.cpu_percent <= 100.0
    assert 10.0 < report.memory_mb <= peak_rss_mib() + 1.0  # Python, numpy and pydantic alone take more
    assert report.temperature_c is None or -60.0 <= report.temperature_c <= 200.0


def test_real_detector_timings_give_ordered_percentiles(int8_detector: Detector, bus_jpg: Path) -> None:
    image = cv2.imread(str(bus_jpg))
    assert image is not None, f"cannot read {bus_jpg}"
    collector = TelemetryCollector(DEVICE)
    for _ in range(5):
        collector.record_frame(int8_detector.run(image).timing)
    report = collector.snapshot(NO_OUTBOX, frames_dropped=0)

    for stage in STAGES:
        assert 0.0 < report.latency_ms[stage].p50 <= report.latency_ms[stage].p95
    assert report.latency_ms["total"].p50 >= report.latency_ms["infer"].p50
    assert report.fps > 0.0


def test_two_recording_threads_lose_no_frame_while_snapshotting() -> None:
    # 100 s intervals: fps stays far below the payload's cap and fps * interval_s is the exact frame count.
    collector = TelemetryCollector(DEVICE, window=50, clock=SteppingClock(100.0))
    per_thread = 20_000
    start = threading.Barrier(3)
    timing = StageTimings(pre_ms=1.0, infer_ms=5.0, post_ms=1.0)

    def record() -> None:
        start.wait()
        for i in range(per_thread):
            collector.record_frame(timing)
            if i % 100 == 0:
                collector.record_link_rtt(10.0)

    workers = [threading.Thread(target=record) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.wait()
    reports = []
    while any(worker.is_alive() for worker in workers):
        reports.append(collector.snapshot(NO_OUTBOX, frames_dropped=0))
    for worker in workers:
        worker.join()
    reports.append(collector.snapshot(NO_OUTBOX, frames_dropped=0))

    assert len(reports) > 2  # snapshots really interleaved with the recording
    assert all(report.interval_s == 100.0 for report in reports)
    assert sum(round(report.fps * report.interval_s) for report in reports) == 2 * per_thread
    assert collector.frames_processed == 2 * per_thread


def write_zone(root: Path, index: int, zone_type: str | None, temp: str | None) -> Path:
    zone = root / f"thermal_zone{index}"
    zone.mkdir()
    if zone_type is not None:
        (zone / "type").write_text(zone_type + "\n")
    if temp is not None:
        (zone / "temp").write_text(temp)
    return zone


def test_thermal_zones_give_the_hottest_valid_reading(tmp_path: Path) -> None:
    write_zone(tmp_path, 0, "CPU-therm", "45000\n")
    write_zone(tmp_path, 1, "GPU-therm", "61500\n")
    write_zone(tmp_path, 2, None, "52250")  # no type file: still a zone
    write_zone(tmp_path, 3, "PMIC-Die", "100000\n")  # Jetson's fixed placeholder, skipped
    write_zone(tmp_path, 4, "garbage", "hot\n")
    write_zone(tmp_path, 5, "empty", "")
    write_zone(tmp_path, 6, "absurd", "-273150\n")
    write_zone(tmp_path, 7, "missing-temp", None)
    (write_zone(tmp_path, 8, "unreadable", None) / "temp").mkdir()  # reading it fails with an OSError
    (tmp_path / "cooling_device0").mkdir()  # not a zone

    assert read_thermal_zones(tmp_path) == pytest.approx(61.5)
    collector = TelemetryCollector(DEVICE, thermal_root=tmp_path, sensors_fallback=False)
    assert collector.snapshot(NO_OUTBOX, frames_dropped=0).temperature_c == pytest.approx(61.5)


def test_no_valid_zone_gives_none(tmp_path: Path) -> None:
    write_zone(tmp_path, 0, "garbage", "n/a\n")
    write_zone(tmp_path, 1, "binary", "\xff\xfe")
    (write_zone(tmp_path, 2, "unreadable", None) / "temp").mkdir()
    assert read_thermal_zones(tmp_path) is None
    assert read_thermal_zones(tmp_path / "does-not-exist") is None
    assert hottest_temperature(tmp_path, sensors_fallback=False) is None
    collector = TelemetryCollector(DEVICE, thermal_root=tmp_path, sensors_fallback=False)
    assert collector.snapshot(NO_OUTBOX, frames_dropped=0).temperature_c is None


def test_the_real_sensors_of_this_machine_read_none_or_plausibly() -> None:
    for reading in (
        read_thermal_zones(DEFAULT_THERMAL_ROOT),
        read_psutil_sensors(),
        hottest_temperature(),
    ):
        assert reading is None or -60.0 <= reading <= 200.0
