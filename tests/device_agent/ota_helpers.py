"""OTA test parts: model variants, signed desired payloads, and the artifact server as a real uvicorn process.

The server (``python -m tests.device_agent.ota_helpers CATALOGUE PORT``) serves `fleet_manager.artifacts`
for the files a JSON catalogue lists, re-read on every request so tests can add files and faults without a
restart. Faults (per ``name/version``): ``truncate_first_at`` cuts the first whole-file response after that
many bytes and drops the connection; ``rate_bps`` throttles the body. Every request is logged as a JSON line
to ``CATALOGUE.requests.jsonl`` (method, path, Range, status), so tests can see a resume happen.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fleet_protocol.payloads import ModelDesired, ModelReported, OtaState, decode
from fleet_protocol.signing import ModelManifest, file_digest, sign_manifest
from tests.broker import Inbox, free_port

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
TOKEN = "ota-test-token"
SLICE = 64 * 1024


# ---- model variants --------------------------------------------------------------------------------------


def relabelled(source: Path, target: Path, tag: str) -> Path:
    """The same detector with one extra metadata entry: other bytes (a new sha256), same behaviour."""
    model = onnx.load(str(source))
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgefleet_test_variant", tag
    onnx.save(model, str(target))
    return target


def wrong_output_model(source: Path, target: Path) -> Path:
    """A valid ONNX model that loads and runs, but outputs [1, 80, 8400]: 76 classes' worth of rows while
    its metadata names 80 classes (rows 80..83 sliced off)."""
    model = onnx.load(str(source))
    graph = model.graph
    output = graph.output[0]
    inner = output.name + "_full"
    for node in graph.node:
        node.output[:] = [inner if name == output.name else name for name in node.output]
    for name, value in (("cut_start", 0), ("cut_end", 80), ("cut_axis", 1)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    graph.node.append(helper.make_node("Slice", [inner, "cut_start", "cut_end", "cut_axis"], [output.name]))
    graph.output.remove(output)
    graph.output.append(helper.make_tensor_value_info(output.name, TensorProto.FLOAT, [1, 80, 8400]))
    onnx.save(model, str(target))
    return target


def content_slow_model(source: Path, target: Path, convs: int = 16, channels: int = 32) -> Path:
    """The same detector (identical outputs) plus an ONNX `If` that, on any frame with a pixel brighter than
    0.6 after /255, first runs `convs` extra 3x3 convolutions over the full 640x640 input. The staging smoke
    inference uses a uniform gray (114/255 = 0.45) frame and takes the fast branch; real video frames take the
    slow one: the model is far slower on real input than its smoke test shows, which probation must catch."""
    model = onnx.load(str(source))
    graph = model.graph
    output = graph.output[0]
    fast = output.name + "_fast"
    for node in graph.node:
        node.output[:] = [fast if name == output.name else name for name in node.output]
    rng = np.random.default_rng(0)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0.6, np.float32), "slow_threshold"),
            numpy_helper.from_array(
                (rng.standard_normal((channels, 3, 3, 3)) * 0.01).astype(np.float32), "w0"
            ),
            numpy_helper.from_array(
                (rng.standard_normal((channels, channels, 3, 3)) * 0.01).astype(np.float32), "w1"
            ),
            numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["images"], ["slow_max"], keepdims=0),
            helper.make_node("Greater", ["slow_max", "slow_threshold"], ["slow_cond"]),
        ]
    )
    heavy = [helper.make_node("Conv", ["images", "w0"], ["c0"], pads=[1, 1, 1, 1])]
    heavy += [
        helper.make_node("Conv", [f"c{i}", "w1"], [f"c{i + 1}"], pads=[1, 1, 1, 1]) for i in range(convs)
    ]
    heavy += [
        helper.make_node("ReduceMean", [f"c{convs}"], ["slow_mean"], keepdims=0),
        helper.make_node("Mul", ["slow_mean", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", [fast, "slow_nothing"], ["slow_out"]),
    ]
    slow_branch = helper.make_graph(
        heavy, "slow", [], [helper.make_tensor_value_info("slow_out", TensorProto.FLOAT, None)]
    )
    fast_branch = helper.make_graph(
        [helper.make_node("Identity", [fast], ["fast_out"])],
        "fast",
        [],
        [helper.make_tensor_value_info("fast_out", TensorProto.FLOAT, None)],
    )
    graph.node.append(
        helper.make_node("If", ["slow_cond"], [output.name], then_branch=slow_branch, else_branch=fast_branch)
    )
    onnx.save(model, str(target))
    return target


# ---- desired payloads --------------------------------------------------------------------------------------


def desired_for(
    device_id: str,
    path: Path,
    *,
    name: str,
    version: str,
    base_url: str,
    rollout_id: str,
    private_key: Any | None,
    sha256: str | None = None,
) -> ModelDesired:
    """A `model/desired` for the file at `path`, signed with `private_key` (None: unsigned); `sha256`
    overrides the real digest (signed as given)."""
    digest, size = file_digest(path)
    manifest = ModelManifest(name=name, version=version, sha256=sha256 or digest, size=size)
    return ModelDesired(
        device_id=device_id,
        rollout_id=rollout_id,
        name=name,
        version=version,
        sha256=manifest.sha256,
        size=size,
        url=f"{base_url}/{name}/{version}",
        signature=sign_manifest(manifest, private_key) if private_key is not None else None,
    )


def reports(inbox: Inbox) -> list[ModelReported]:
    return [decode(ModelReported, m.payload) for m in inbox.of("/model/reported")]


def wait_report(
    inbox: Inbox, predicate: Callable[[ModelReported], bool], timeout: float, what: str
) -> ModelReported:
    """The first model/reported satisfying `predicate`; fails with the states seen so far."""
    found: list[ModelReported] = []

    def match(_: object) -> bool:
        found[:] = [r for r in reports(inbox) if predicate(r)]
        return bool(found)

    if not inbox.wait_for(match, timeout):
        seen = [(r.state.value, r.model and r.model.version, r.error) for r in reports(inbox)][-12:]
        raise AssertionError(f"no model/reported {what} within {timeout:.0f} s; last seen: {seen}")
    return found[0]


def states_of(inbox: Inbox, rollout_id: str) -> list[OtaState]:
    """The rollout's reported states in order, consecutive repeats (download progress) collapsed."""
    states: list[OtaState] = []
    for report in reports(inbox):
        if report.rollout_id == rollout_id and (not states or states[-1] is not report.state):
            states.append(report.state)
    return states


# ---- the artifact server ------------------------------------------------------------------------


class ArtifactServer:
    """The artifact app in its own uvicorn process (so a test can kill it mid-transfer and start it again)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.catalogue = folder / "catalogue.json"
        self.requests_log = folder / "catalogue.json.requests.jsonl"
        self.log_path = folder / "server.log"
        self.port = port or free_port()
        self._entries: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, dict[str, Any]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._write()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/artifacts"

    def add(self, name: str, version: str, path: Path, **faults: Any) -> None:
        digest, size = file_digest(path)
        key = f"{name}/{version}"
        self._entries[key] = {"path": str(path), "sha256": digest, "size": size}
        self._faults[key] = faults
        self._write()

    def set_faults(self, name: str, version: str, **faults: Any) -> None:
        self._faults[f"{name}/{version}"] = faults
        self._write()

    def requests(self) -> list[dict[str, Any]]:
        if not self.requests_log.exists():
            return []
        return [json.loads(line) for line in self.requests_log.read_text().splitlines() if line.strip()]

    def start(self) -> ArtifactServer:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.device_agent.ota_helpers", str(self.catalogue), str(self.port)],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while True:
            assert self._process.poll() is None, self.log_path.read_text()[-2000:]
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return self
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the artifact server did not start"
                time.sleep(0.1)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

    def _write(self) -> None:
        body = {"artifacts": self._entries, "faults": self._faults, "tokens": [TOKEN]}
        temporary = self.catalogue.with_suffix(".tmp")
        temporary.write_text(json.dumps(body))
        temporary.replace(self.catalogue)


def _serve(catalogue: Path, port: int) -> None:
    import uvicorn

    from fleet_manager.artifacts import ArtifactFile, create_artifact_app

    def load() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(catalogue.read_text())
        return data

    def lookup(name: str, version: str) -> ArtifactFile | None:
        entry = load()["artifacts"].get(f"{name}/{version}")
        return None if entry is None else ArtifactFile(Path(entry["path"]), entry["sha256"], entry["size"])

    def authorize(token: str, name: str, version: str) -> bool:
        return token in load()["tokens"]

    inner = create_artifact_app(lookup, authorize)

    @inner.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    truncated: set[str] = set()
    log = catalogue.with_name(catalogue.name + ".requests.jsonl")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/artifacts/"):
            await inner(scope, receive, send)
            return
        key = path.removeprefix("/v1/artifacts/")
        faults = load()["faults"].get(key, {})
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        record: dict[str, Any] = {"method": scope["method"], "path": path, "range": headers.get("range")}
        cut = faults.get("truncate_first_at")
        cut_now = cut is not None and "range" not in headers and key not in truncated
        rate = faults.get("rate_bps")
        sent = 0

        async def faulty_send(message: MutableMapping[str, Any]) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                with log.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                await send(message)
                return
            body: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            for start in range(0, max(len(body), 1), SLICE):
                piece = body[start : start + SLICE]
                if cut_now and sent + len(piece) > cut:
                    truncated.add(key)
                    await send({"type": "http.response.body", "body": piece[: cut - sent], "more_body": True})
                    raise ConnectionAbortedError(f"fault injected: response cut after {cut} bytes")
                if rate:
                    await asyncio.sleep(len(piece) / rate)
                sent += len(piece)
                last = start + SLICE >= len(body)
                await send({"type": "http.response.body", "body": piece, "more_body": more or not last})

        await inner(scope, receive, faulty_send)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
