"""Telemetry: what the agent did over the last interval and how the device is doing, as a `TelemetryPayload`.

The inference thread calls `record_frame`, the publisher `record_link_rtt`, and a timer thread `snapshot`
every N seconds. Each snapshot covers the interval since the previous one (the first: since construction):
fps counts every frame of the interval; latency percentiles and the link RTT median are over the interval's
most recent `window` samples (older samples of a busy interval are let go, so memory stays bounded). The
counters the payload calls cumulative (frames_dropped, outbox drops) come in cumulative from their owners.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pydantic import TypeAdapter, ValidationError

from device_agent.detector import StageTimings
from device_agent.outbox import MessageKind, OutboxStats
from fleet_protocol.payloads import DeviceId, Key, StageLatency, TelemetryPayload
from fleet_protocol.payloads import OutboxStats as WireOutboxStats

log = logging.getLogger(__name__)

DEFAULT_THERMAL_ROOT = Path("/sys/class/thermal")
STAGES = ("pre", "infer", "post", "total")
# The outbox counts drops by message kind; the payload names them in the plural ('crops', 'detections').
DROPPED_KEYS = {
    "crop": "crops",
    "detection": "detections",
    "event": "events",
    "expired": "expired",
    "crop_too_large": "crops_too_large",  # never enqueued: no JPEG within crops.max_bytes
    "detection_truncated": "detections_truncated",  # left out of an event too large for the contract
}
# Jetson Nano/TX boards expose a "PMIC-Die" zone that always reads 100.0 C: a placeholder, not a sensor.
IGNORED_ZONE_TYPES = frozenset({"pmic-die"})
# The payload's bounds; a value past them is clamped, so one odd reading never costs the whole report.
MIN_INTERVAL_S = 1e-3
MAX_INTERVAL_S = 86_400.0
MAX_FPS = 10_000.0
MAX_MS = 3_600_000.0
MIN_CELSIUS = -60.0
MAX_CELSIUS = 200.0
MIB = 1024 * 1024

_DEVICE_ID = TypeAdapter(DeviceId)
_KEY = TypeAdapter(Key)


class TelemetryCollector:
    """Collects frame timings and link round trips; `snapshot` turns the interval into a TelemetryPayload.

    Thread-safe: recording takes a short lock; `snapshot` swaps the interval's samples out under it and does
    the percentiles and system reads outside it, so the inference thread never waits on them.
    """

    def __init__(
        self,
        device_id: str,
        window: int = 1000,
        *,
        thermal_root: Path = DEFAULT_THERMAL_ROOT,
        sensors_fallback: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 sample, got {window}")
        try:
            self.device_id = _DEVICE_ID.validate_python(device_id)
        except ValidationError:
            raise ValueError(
                f"device_id {device_id!r} is not a valid device id: use 1-64 characters of letters, digits, "
                "'-' and '_' (the MQTT topic segment of this device)"
            ) from None
        self.thermal_root = thermal_root
        self.sensors_fallback = sensors_fallback
        self._clock = clock
        self._lock = threading.Lock()  # guards the interval's samples and counts
        self._snapshot_lock = threading.Lock()  # serialises snapshots (interval start, CPU baseline)
        self._stage_ms: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._rtt_ms: deque[float] = deque(maxlen=window)
        self._interval_frames = 0
        self._frames_processed = 0
        self._interval_start = clock()
        self._process = psutil.Process()
        self._cpu = CpuMeter()

    @property
    def frames_processed(self) -> int:
        """Frames recorded since the collector was made."""
        with self._lock:
            return self._frames_processed

    def record_frame(self, timing: StageTimings) -> None:
        """Count one processed frame and keep its stage latencies."""
        row = (timing.pre_ms, timing.infer_ms, timing.post_ms, timing.total_ms)
        if not all(math.isfinite(ms) and ms >= 0.0 for ms in row):
            raise ValueError(f"stage timings must be finite and >= 0 ms, got {timing}")
        with self._lock:
            self._interval_frames += 1
            self._frames_processed += 1
            self._stage_ms.append(row)

    def record_link_rtt(self, ms: float) -> None:
        """Keep one publish->PUBACK round trip, in ms."""
        if not (math.isfinite(ms) and ms >= 0.0):
            raise ValueError(f"link round trip must be finite and >= 0 ms, got {ms!r}")
        with self._lock:
            self._rtt_ms.append(ms)

    def link_lost(self) -> None:
        """Forget the interval's round trips: a report made while the link is down says None, not old RTTs."""
        with self._lock:
            self._rtt_ms.clear()

    def snapshot(
        self, outbox_stats: OutboxStats, frames_dropped: int, *, crops_held: bool = False
    ) -> TelemetryPayload:
        """The report for the interval since the last snapshot; starts the next interval.

        `frames_dropped` is the source's count since the agent started; `crops_held`, whether the publisher
        holds crops back now (link down or slow). With no frame in the interval, `latency_ms` is empty; with
        no round trip measured, `link_rtt_ms` is None.
        """
        if frames_dropped < 0:
            raise ValueError(
                f"frames_dropped is a count since start and cannot be negative: {frames_dropped}"
            )
        with self._snapshot_lock:
            with self._lock:
                now = self._clock()
                elapsed = now - self._interval_start
                self._interval_start = now
                frames, self._interval_frames = self._interval_frames, 0
                stage_rows = list(self._stage_ms)
                self._stage_ms.clear()
                rtts = list(self._rtt_ms)
                self._rtt_ms.clear()
            cpu_percent = self._cpu.percent()
        return TelemetryPayload(
            device_id=self.device_id,
            interval_s=min(max(elapsed, MIN_INTERVAL_S), MAX_INTERVAL_S),
            fps=round(min(frames / max(elapsed, MIN_INTERVAL_S), MAX_FPS), 2),
            latency_ms=stage_latencies(stage_rows),
            outbox=wire_outbox_stats(outbox_stats, crops_held=crops_held),
            cpu_percent=cpu_percent,
            memory_mb=round(self._process.memory_info().rss / MIB, 2),
            temperature_c=hottest_temperature(self.thermal_root, self.sensors_fallback),
            link_rtt_ms=None if not rtts else _ms(float(np.median(rtts))),
            frames_dropped=frames_dropped,
        )


def stage_latencies(rows: list[tuple[float, float, float, float]]) -> dict[str, StageLatency]:
    """p50/p95 per stage (numpy's linear interpolation) of rows of (pre, infer, post, total) ms."""
    if not rows:
        return {}
    p50, p95 = np.percentile(np.asarray(rows, dtype=np.float64), [50.0, 95.0], axis=0)
    return {
        stage: StageLatency(p50=_ms(float(low)), p95=_ms(float(high)))
        for stage, low, high in zip(STAGES, p50, p95, strict=True)
    }


def _ms(value: float) -> float:
    return round(min(value, MAX_MS), 3)


def wire_outbox_stats(stats: OutboxStats, *, crops_held: bool = False) -> WireOutboxStats:
    """The outbox's stats as the payload carries them; drop counts keyed 'crops', 'detections', ..."""
    dropped: dict[str, int] = {}
    for kind, count in stats.dropped.items():
        key = DROPPED_KEYS.get(kind, kind)
        try:
            _KEY.validate_python(key)
        except ValidationError:
            log.warning("outbox drop kind %r is not a telemetry key [a-z][a-z0-9_]*; left out", kind)
            continue
        dropped[key] = dropped.get(key, 0) + count
    return WireOutboxStats(
        depth=stats.depth,
        bytes=stats.bytes,
        dropped=dropped,
        crops_waiting=stats.waiting.get(MessageKind.CROP.value, 0),
        crops_held=crops_held,
    )


class CpuMeter:
    """System-wide CPU busy percent since the previous call (the first: since construction).

    Not `psutil.cpu_percent(interval=None)`: psutil keeps that baseline per calling thread (psutil >= 5.9.6),
    so priming it in the thread that builds the collector leaves the timer thread's first report at 0.0,
    and any other caller in the same thread would shorten our interval. The arithmetic is psutil's.
    """

    def __init__(self) -> None:
        self._last: Any = psutil.cpu_times()

    def percent(self) -> float:
        now: Any = psutil.cpu_times()
        # CPU times should never decrease, but sometimes do (psutil #392, #645): clamp at 0 as top does.
        deltas: Mapping[str, float] = {
            name: max(0.0, getattr(now, name) - getattr(self._last, name)) for name in now._fields
        }
        self._last = now
        # Linux counts guest time inside user/nice, and iowait outside idle (psutil and htop do the same).
        total = sum(deltas.values()) - deltas.get("guest", 0.0) - deltas.get("guest_nice", 0.0)
        idle = deltas["idle"] + deltas.get("iowait", 0.0)
        if total <= 0.0:
            return 0.0
        return round(min(100.0, max(0.0, 100.0 * (total - idle) / total)), 1)


def hottest_temperature(
    thermal_root: Path = DEFAULT_THERMAL_ROOT, sensors_fallback: bool = True
) -> float | None:
    """Hottest readable sensor, degrees C: the kernel's thermal zones, else psutil's sensors, else None.

    Linux and Jetson (whose CPU/GPU/SoC zones are thermal zones) have the zones. macOS exposes no
    temperature without root and psutil has no sensors there, so it is None on a Mac.
    """
    zones = read_thermal_zones(thermal_root)
    if zones is not None or not sensors_fallback:
        return zones
    return read_psutil_sensors()


def read_thermal_zones(root: Path) -> float | None:
    """Hottest plausible `thermal_zone*/temp` under `root` (millidegrees C in the file), or None.

    Zones that cannot be read (a Jetson GPU zone while the GPU is powered down fails with EAGAIN/EINVAL),
    hold no integer, read outside -60..200 C, or are known placeholders (IGNORED_ZONE_TYPES) are skipped.
    """
    try:
        zones = sorted(root.glob("thermal_zone*"))
    except OSError:
        return None
    readings = [
        celsius
        for zone in zones
        if _zone_type(zone) not in IGNORED_ZONE_TYPES
        and (celsius := _read_millidegrees(zone / "temp")) is not None
    ]
    return max(readings, default=None)


def _zone_type(zone: Path) -> str:
    try:
        return (zone / "type").read_text(encoding="utf-8", errors="replace").strip().lower()
    except OSError:
        return ""


def _read_millidegrees(path: Path) -> float | None:
    try:
        text = path.read_text(encoding="ascii").strip()
        celsius = int(text) / 1000.0
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return celsius if MIN_CELSIUS <= celsius <= MAX_CELSIUS else None


def read_psutil_sensors() -> float | None:
    """Hottest plausible reading of `psutil.sensors_temperatures()` (hwmon on Linux), or None."""
    read_sensors = getattr(psutil, "sensors_temperatures", None)  # Linux and FreeBSD only
    if read_sensors is None:
        return None
    try:
        sensors = read_sensors()
    except (OSError, RuntimeError):
        return None
    readings = [
        float(entry.current)
        for entries in sensors.values()
        for entry in entries
        if entry.current is not None and MIN_CELSIUS <= float(entry.current) <= MAX_CELSIUS
    ]
    return max(readings, default=None)
