"""The artifact endpoint on a real uvicorn: bearer tokens, ETag = sha256, Range (resume), conditionals."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from fleet_manager.artifacts import create_artifact_app, file_artifacts, static_tokens
from tests.broker import free_port

DEVICE_TOKEN = "device-token-1"
OTHER_TOKEN = "device-token-2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, int8_model: Path) -> Iterator[tuple[str, bytes, Path]]:
    folder = tmp_path_factory.mktemp("artifacts")
    model = folder / "yolov8n-int8.onnx"
    shutil.copyfile(int8_model, model)
    spare = folder / "spare.bin"
    spare.write_bytes(b"x" * 1000)
    lookup = file_artifacts({("yolov8n", "1"): model, ("spare", "1"): spare})
    authorize = static_tokens({DEVICE_TOKEN: None, OTHER_TOKEN: frozenset({("spare", "1")})})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_artifact_app(lookup, authorize), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1/artifacts", model.read_bytes(), folder
    finally:
        server.should_exit = True
        thread.join(10)


def auth(token: str = DEVICE_TOKEN, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def test_whole_file_with_etag_length_and_ranges_advertised(served: tuple[str, bytes, Path]) -> None:
    base, data, _ = served
    response = httpx.get(f"{base}/yolov8n/1", headers=auth())
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["content-type"] == "application/octet-stream"

    head = httpx.head(f"{base}/yolov8n/1", headers=auth())
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["etag"] == response.headers["etag"]


def test_tokens_401_without_403_for_another_artifact_404_for_unknown(served: tuple[str, bytes, Path]) -> None:
    base, _, _ = served
    missing = httpx.get(f"{base}/yolov8n/1")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{base}/yolov8n/1", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 401
    assert httpx.get(f"{base}/yolov8n/1", headers=auth("wrong")).status_code == 403
    assert httpx.get(f"{base}/yolov8n/1", headers=auth(OTHER_TOKEN)).status_code == 403
    assert httpx.head(f"{base}/yolov8n/1", headers=auth(OTHER_TOKEN)).status_code == 403
    assert httpx.get(f"{base}/spare/1", headers=auth(OTHER_TOKEN)).content == b"x" * 1000
    # Existence is only revealed to a token that may fetch it.
    assert httpx.get(f"{base}/yolov8n/2", headers=auth(OTHER_TOKEN)).status_code == 403
    assert httpx.get(f"{base}/yolov8n/2", headers=auth()).status_code == 404


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=100-199", 100, 199), ("bytes=2000000-", 2000000, None), ("bytes=-1000", -1000, None)],
)
def test_single_ranges_give_206_with_content_range(
    served: tuple[str, bytes, Path], header: str, first: int, last: int | None
) -> None:
    base, data, _ = served
    response = httpx.get(f"{base}/yolov8n/1", headers=auth(Range=header))
    assert response.status_code == 206
    expected = data[first : None if last is None else last + 1]
    assert response.content == expected
    start = first if first >= 0 else len(data) + first
    assert response.headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"
    assert response.headers["content-length"] == str(len(expected))


def test_range_past_the_end_is_416_and_an_end_past_the_end_is_clipped(
    served: tuple[str, bytes, Path],
) -> None:
    base, data, _ = served
    beyond = httpx.get(f"{base}/yolov8n/1", headers=auth(Range=f"bytes={len(data)}-"))
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    clipped = httpx.get(f"{base}/yolov8n/1", headers=auth(Range=f"bytes={len(data) - 10}-{len(data) + 500}"))
    assert clipped.status_code == 206
    assert clipped.content == data[-10:]


def test_several_ranges_or_a_malformed_one_get_the_whole_file(served: tuple[str, bytes, Path]) -> None:
    base, data, _ = served
    for header in ("bytes=0-10,20-30", "bytes=abc", "items=0-10", "bytes=50-10"):
        response = httpx.get(f"{base}/yolov8n/1", headers=auth(Range=header))
        assert response.status_code == 200, header
        assert len(response.content) == len(data)


def test_if_none_match_and_if_range(served: tuple[str, bytes, Path]) -> None:
    base, data, _ = served
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    not_modified = httpx.get(f"{base}/yolov8n/1", headers=auth(**{"If-None-Match": f'"other", {etag}'}))
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert httpx.get(f"{base}/yolov8n/1", headers=auth(**{"If-None-Match": '"other"'})).status_code == 200
    # Resume is safe: a range against a different version of the file gets the whole (new) file.
    same = httpx.get(f"{base}/yolov8n/1", headers=auth(Range="bytes=10-19", **{"If-Range": etag}))
    assert (same.status_code, same.content) == (206, data[10:20])
    changed = httpx.get(f"{base}/yolov8n/1", headers=auth(Range="bytes=10-19", **{"If-Range": '"stale"'}))
    assert (changed.status_code, len(changed.content)) == (200, len(data))


def test_a_file_that_changed_under_the_store_is_not_served(served: tuple[str, bytes, Path]) -> None:
    base, _, folder = served
    spare = folder / "spare.bin"
    original = spare.read_bytes()
    try:
        spare.write_bytes(original + b"tampered")
        response = httpx.get(f"{base}/spare/1", headers=auth())
        assert response.status_code == 500
        assert "size" in response.json()["detail"]
        spare.unlink()
        assert httpx.get(f"{base}/spare/1", headers=auth()).status_code == 404
    finally:
        spare.write_bytes(original)
    assert httpx.get(f"{base}/spare/1", headers=auth()).content == original
