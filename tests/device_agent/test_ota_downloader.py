"""The resumable downloader against the real artifact app on uvicorn (and a plain redirecting server)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from device_agent.downloader import DownloadCancelled, DownloadError, DownloadRequest, download
from fleet_manager.artifacts import create_artifact_app, file_artifacts, static_tokens
from fleet_protocol.signing import file_digest
from tests.broker import free_port

TOKEN = "downloader-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, int8_model: Path) -> Iterator[tuple[str, Path, str]]:
    folder = tmp_path_factory.mktemp("downloader")
    other = folder / "other.bin"
    other.write_bytes(b"\x01" * 5000)
    lookup = file_artifacts({("yolov8n", "1"): int8_model, ("other", "1"): other})
    port = free_port()
    app = create_artifact_app(lookup, static_tokens({TOKEN: None}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1/artifacts", int8_model, file_digest(int8_model)[0]
    finally:
        server.should_exit = True
        thread.join(10)


def request(base: str, target: Path, model: Path, sha: str, **changes: object) -> DownloadRequest:
    fields: dict[str, object] = {
        "url": f"{base}/yolov8n/1",
        "target": target,
        "size": model.stat().st_size,
        "sha256": sha,
        "token": TOKEN,
        "timeout_s": 10.0,
    }
    fields.update(changes)
    return DownloadRequest(**fields)  # type: ignore[arg-type]


def test_fresh_download_then_resume_from_a_partial_file(
    served: tuple[str, Path, str], tmp_path: Path
) -> None:
    base, model, sha = served
    data = model.read_bytes()
    target = tmp_path / "m.part"
    progress: list[int] = []
    result = download(request(base, target, model, sha), progress=lambda done, _: progress.append(done))
    assert (result.resumed_from, result.received) == (0, len(data))
    assert target.read_bytes() == data
    assert progress[-1] == len(data)
    assert progress == sorted(progress)

    target.write_bytes(data[:1_000_000])
    result = download(request(base, target, model, sha))
    assert (result.resumed_from, result.received) == (1_000_000, len(data) - 1_000_000)
    assert target.read_bytes() == data
    assert download(request(base, target, model, sha)).received == 0  # complete already: no request


def test_a_partial_file_of_other_bytes_is_replaced_not_extended(
    served: tuple[str, Path, str], tmp_path: Path
) -> None:
    base, model, _sha = served
    target = tmp_path / "m.part"
    target.write_bytes(b"\x00" * 1000)
    # The partial bytes claim to be another version: If-Range does not match, the server sends it all.
    result = download(request(base, target, model, sha="ab" * 32))
    assert result.resumed_from == 0
    assert target.read_bytes() == model.read_bytes()


def test_permanent_errors(served: tuple[str, Path, str], tmp_path: Path) -> None:
    base, model, sha = served
    target = tmp_path / "m.part"
    cases = [
        (request(base, target, model, sha, token=None), "HTTP 401"),
        (request(base, target, model, sha, token="wrong"), "HTTP 403"),
        (request(base, target, model, sha, url=f"{base}/yolov8n/9"), "HTTP 404"),
        (request(base, target, model, sha, size=model.stat().st_size + 1), "bytes, the desired model"),
        (request(base, target, model, sha, url="ftp://127.0.0.1/x"), "unsupported URL"),
    ]
    for case, message in cases:
        with pytest.raises(DownloadError, match=message) as caught:
            download(case)
        assert caught.value.permanent, message


def test_unreachable_server_is_a_transient_error(tmp_path: Path, int8_model: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/artifacts/yolov8n/1"
    with pytest.raises(DownloadError, match="cannot reach") as caught:
        download(request("", tmp_path / "m.part", int8_model, "ab" * 32, url=url, timeout_s=2.0))
    assert not caught.value.permanent


def test_cancel_keeps_what_arrived(served: tuple[str, Path, str], tmp_path: Path) -> None:
    base, model, sha = served
    target = tmp_path / "m.part"
    cancel = threading.Event()

    def stop_after_first_chunk(done: int, total: int) -> None:
        cancel.set()

    with pytest.raises(DownloadCancelled):
        download(request(base, target, model, sha), progress=stop_after_first_chunk, cancel=cancel)
    assert 0 < target.stat().st_size < model.stat().st_size


def test_the_token_is_not_sent_on_to_a_redirect_target(tmp_path: Path) -> None:
    payload = b"model bytes" * 100
    seen: dict[str, str | None] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen[self.path] = self.headers.get("Authorization")
            if self.path == "/signed":
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{port}/signed")
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        target = tmp_path / "m.part"
        download(
            DownloadRequest(
                url=f"http://127.0.0.1:{port}/artifact",
                target=target,
                size=len(payload),
                sha256="ab" * 32,
                token=TOKEN,
            )
        )
    finally:
        httpd.shutdown()
    assert target.read_bytes() == payload
    assert seen == {"/artifact": f"Bearer {TOKEN}", "/signed": None}
