"""The agent on a video: its fps against the bare model, and the agent process's memory, in one run.

    .venv/bin/python benchmarks/video.py [--precision fp32|int8] [--model PATH] [--video PATH]
        [--rounds 7] [--frames 30] [--rss-seconds 15]

1. fps of the agent's real pipeline against the bare model, alternating call by call so that both see the
   same machine (on a shared one the load changes from second to second):
   - bare: `session.run` on a ready tensor (a letterboxed frame of the video), on the agent's own session;
   - pipeline: the next frame through the agent's per-frame path (`Agent._process`: detect, track, publish
     and crop policies, the durable outbox, telemetry), the agent's capture thread reading the video with no
     fps cap (every frame processed, decoding alongside as in the daemon) and its publisher draining to a
     private `mosquitto`.
   Per round of --frames of each: pipeline fps (frames / time spent on them) / (1000 / median bare ms);
   overall, the median of the rounds (target >= 0.95). Per round too, where a pipeline frame's time went:
   the medians of its session.run (`infer`), decode and NMS (`post`) and everything else (`rest`: tracking,
   policies, crops, the durable outbox, telemetry, and the letterbox).
2. `edgefleet agent run --config ...` as a process of its own against the same broker (local API on, all
   its threads): its resident memory sampled with psutil while it detects (target <= 300 MB), and the fps
   its telemetry reports (not interleaved with bare runs: compare it with care).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from device_agent.agent import Agent
from device_agent.config import load_settings
from fleet_protocol.mqtt import Message, MqttSession, MqttSettings
from fleet_protocol.payloads import TelemetryPayload, decode
from fleet_protocol.topics import Topics

try:
    from benchmarks._mosquitto import PrivateMosquitto, free_port
except ModuleNotFoundError:  # run as a script: this folder is on sys.path
    from _mosquitto import PrivateMosquitto, free_port  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = {"fp32": SHARED / "models" / "yolov8n.onnx", "int8": SHARED / "models" / "yolov8n_int8.onnx"}
MIB = 1024 * 1024


def agent_config(
    model: Path, video: Path, data_dir: Path, broker: PrivateMosquitto, api: bool
) -> dict[str, Any]:
    """The agent's settings for this run: defaults everywhere except where the device and broker are."""
    return {
        "device_id": f"bench-video-{data_dir.name}",
        "data_dir": str(data_dir),
        "broker": {"host": broker.host, "port": broker.port},
        "model": {"path": str(model)},
        "sources": [{"id": "vtest", "kind": "video", "uri": str(video), "loop": True}],
        "telemetry_interval_s": 1.0,
        "api": {"enabled": api, "port": free_port()},
    }


def interleaved(agent: Agent, rounds: int, frames: int) -> tuple[float, float]:
    """Per round, `frames` bare runs and `frames` pipeline frames, alternating; (median bare ms, ratio)."""
    source = agent.sources[0]
    detector = agent.model.get().detector
    first = source.next_frame(timeout=30)
    if first is None:
        raise SystemExit(f"no frame from {source.config.uri}")
    tensor, _ = detector.preprocess(first.image)
    session, inputs = detector._session, {detector.spec.info.input_name: tensor}
    for _ in range(3):  # warm-up: the first runs allocate onnxruntime's buffers
        session.run(None, inputs)
        agent._process(first)
    bare_rounds: list[float] = []
    ratios: list[float] = []
    print(
        f"{'round':>5} {'bare ms':>8} {'bare runs/s':>11} {'pipeline fps':>12}"
        f" {'ratio':>6} {'infer ms':>8} {'post ms':>7} {'rest ms':>7}"
    )
    for round_index in range(rounds):
        times, pipeline_s = [], 0.0
        infer: list[float] = []
        post: list[float] = []
        rest: list[float] = []
        for _ in range(frames):
            start = time.perf_counter()
            session.run(None, inputs)
            times.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            frame = source.next_frame(timeout=30)
            if frame is None:
                raise SystemExit("the video source stopped")
            agent._process(frame)
            elapsed = time.perf_counter() - start
            pipeline_s += elapsed
            result = agent.pipeline.last_result
            if result is not None:
                infer.append(result.timing.infer_ms)
                post.append(result.timing.post_ms)
                rest.append(elapsed * 1e3 - result.timing.infer_ms - result.timing.post_ms)
        bare = statistics.median(times)
        fps = frames / pipeline_s
        bare_rounds.append(bare)
        ratios.append(fps * bare / 1000)
        print(
            f"{round_index + 1:>5} {bare:>8.2f} {1000 / bare:>11.2f} {fps:>12.2f} {ratios[-1]:>6.3f} "
            f"{statistics.median(infer):>8.2f} {statistics.median(post):>7.2f} "
            f"{statistics.median(rest):>7.2f}"
        )
    return statistics.median(bare_rounds), statistics.median(ratios)


def pipeline_against_bare(config: dict[str, Any], rounds: int, frames: int) -> float:
    """Step 1 on an agent built from `config` (without its inference thread: this one feeds it); bare ms."""
    agent = Agent(load_settings(None, **config))
    agent.session.connect()
    agent.publisher.start()
    for source in agent.sources:
        source.start()
    try:
        bare, ratio = interleaved(agent, rounds, frames)
        failed, dropped = agent.frames_failed, sum(s.frames_dropped for s in agent.sources)
    finally:
        agent.shutdown()
    print(
        f"median: bare {bare:.2f} ms ({1000 / bare:.2f} runs/s); pipeline fps / bare rate {ratio:.3f} "
        f"(target >= 0.95); {failed} frames failed, {dropped} dropped"
    )
    return bare


def agent_process_rss(
    config: dict[str, Any], workdir: Path, broker: PrivateMosquitto, seconds: float, bare_ms: float
) -> None:
    """Run `edgefleet agent run` and sample its RSS while its telemetry says it is detecting."""
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    reports: list[TelemetryPayload] = []
    reported = threading.Event()

    def on_telemetry(message: Message) -> None:
        reports.append(decode(TelemetryPayload, message.payload))
        if reports[-1].fps > 0:
            reported.set()

    watch = MqttSession(MqttSettings(host=broker.host, port=broker.port, client_id="bench-video-watch"))
    watch.subscribe(Topics().telemetry(config["device_id"]), on_telemetry)
    watch.connect()
    edgefleet = str(Path(sys.executable).with_name("edgefleet"))
    process = subprocess.Popen([edgefleet, "agent", "run", "--config", str(path)], stderr=subprocess.PIPE)
    try:
        if not reported.wait(120):
            stderr = process.stderr.read1().decode() if process.poll() is not None and process.stderr else ""
            raise RuntimeError(f"the agent never reported frames within 120 s {stderr}")
        agent = psutil.Process(process.pid)
        samples, first_report = [], len(reports)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples.append(agent.memory_info().rss / MIB)
            time.sleep(0.25)
        fps = statistics.median([r.fps for r in reports[first_report:]] or [reports[-1].fps])
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        watch.disconnect()
    print(
        f"agent process RSS over {seconds:.0f} s of detecting: median {statistics.median(samples):.0f} MiB, "
        f"peak {max(samples):.0f} MiB (target <= 300 MB = {300e6 / MIB:.0f} MiB); its telemetry: "
        f"{fps:.2f} fps ({fps * bare_ms / 1000:.2f} x the bare rate of step 1); "
        f"exit code {exit_code} on SIGTERM"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=sorted(MODELS), default="fp32", help="which yolov8n to run")
    parser.add_argument("--model", type=Path, help="another YOLOv8-layout ONNX model (overrides --precision)")
    parser.add_argument("--video", type=Path, default=SHARED / "data" / "video" / "vtest.avi")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=30, help="bare runs and pipeline frames per round")
    parser.add_argument("--rss-seconds", type=float, default=15.0, help="seconds of RSS sampling")
    args = parser.parse_args()
    model = args.model or MODELS[args.precision]
    for needed in (model, args.video):
        if not needed.is_file():
            raise SystemExit(f"{needed} not found (models and data: ../shared, see its MANIFEST.md)")

    with (
        tempfile.TemporaryDirectory(prefix="video-bench-") as tmp,
        PrivateMosquitto(Path(tmp) / "mosquitto") as broker,
    ):
        workdir = Path(tmp)
        print(
            f"model {model.name}, video {args.video.name}, {args.rounds} rounds of {args.frames} frames; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        config = agent_config(model, args.video, workdir / "in-process", broker, api=False)
        bare = pipeline_against_bare(config, args.rounds, args.frames)
        config = agent_config(model, args.video, workdir / "process", broker, api=True)
        agent_process_rss(config, workdir, broker, args.rss_seconds, bare)


if __name__ == "__main__":
    main()
