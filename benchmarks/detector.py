"""Detector overhead and local API throughput, measured side by side in one run.

    .venv/bin/python benchmarks/detector.py [--model ../shared/models/yolov8n_int8.onnx] [--image ...]

1. Bare `session.run` on a ready tensor versus our full detect (letterbox + infer + decode/NMS, image already
   decoded), alternated call by call so that both see the same machine; medians per round and their ratio.
2. `POST /v1/detect` requests/s at concurrency 1, 4 and 16 against a real uvicorn server (`edgefleet agent
   api`), compared with the bare detector rate 1000 / median(session.run ms).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import httpx

from device_agent.detector import Detector

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def time_ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def overhead(detector: Detector, image_path: Path, rounds: int, calls: int) -> float:
    image = cv2.imread(str(image_path))
    tensor, _ = detector.preprocess(image)
    session, inputs = detector._session, {detector.spec.info.input_name: tensor}
    detector.warmup(3)
    bare_medians, full_medians = [], []
    print(f"{'round':>5} {'bare session.run ms':>20} {'full detect ms':>15} {'ratio':>7}")
    for round_index in range(rounds):
        bare, full = [], []
        for _ in range(calls):
            bare.append(time_ms(lambda: session.run(None, inputs)))
            full.append(time_ms(lambda: detector.detect(image)))
        bare_medians.append(statistics.median(bare))
        full_medians.append(statistics.median(full))
        ratio = full_medians[-1] / bare_medians[-1]
        print(f"{round_index + 1:>5} {bare_medians[-1]:>20.2f} {full_medians[-1]:>15.2f} {ratio:>7.3f}")
    bare_ms, full_ms = statistics.median(bare_medians), statistics.median(full_medians)
    stages = detector.run(image).timing
    print(
        f"median  bare {bare_ms:.2f} ms  full {full_ms:.2f} ms  ratio {full_ms / bare_ms:.3f} (target ≤ 1.03)"
        f"  [one run: pre {stages.pre_ms:.2f} / infer {stages.infer_ms:.2f} / post {stages.post_ms:.2f} ms]"
    )
    return bare_ms


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).with_name("edgefleet")),
        "agent",
        "api",
        "--model",
        str(model),
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--queue-size",
        "64",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the API server did not become ready within 60 s")


async def requests_per_second(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, int]:
    done = errors = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            response = await client.post(url, content=body, headers={"content-type": "image/jpeg"})
            if response.status_code == 200:
                done += 1
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return done / elapsed, errors


def api_throughput(model: Path, image_path: Path, bare_ms: float, workers: int, seconds: float) -> None:
    port = free_port()
    server = start_server(model, port, workers)
    body = image_path.read_bytes()
    url = f"http://127.0.0.1:{port}/v1/detect"
    bare_rate = 1000 / bare_ms
    print(f"\nAPI, {workers} inference worker(s); bare detector rate {bare_rate:.2f}/s")
    print(f"{'concurrency':>11} {'requests/s':>11} {'vs bare':>8} {'non-200':>8}")
    try:
        asyncio.run(requests_per_second(url, body, 1, 2))  # warm-up
        for concurrency in (1, 4, 16):
            rate, errors = asyncio.run(requests_per_second(url, body, concurrency, seconds))
            print(f"{concurrency:>11} {rate:>11.2f} {rate / bare_rate:>8.3f} {errors:>8}")
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "yolov8n_int8.onnx")
    parser.add_argument("--image", type=Path, default=SHARED / "data" / "images" / "bus.jpg")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls of each kind per round")
    parser.add_argument("--api-seconds", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2], help="API workers to try (none: skip the API)"
    )
    args = parser.parse_args()
    detector = Detector(args.model)
    print(f"model {args.model.name}, providers {detector.providers}, image {args.image.name}\n")
    bare_ms = overhead(detector, args.image, args.rounds, args.calls)
    for workers in args.workers:
        api_throughput(args.model, args.image, bare_ms, workers, args.api_seconds)


if __name__ == "__main__":
    main()
