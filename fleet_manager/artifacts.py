"""Model artifact delivery over HTTP: what devices download after a `model/desired`.

``GET``/``HEAD /v1/artifacts/{name}/{version}`` serves one registered model file with a bearer token per
device, single-range requests (resume), a strong ``ETag`` that is the quoted sha256 of the file, and
``If-None-Match`` / ``If-Range``. The router knows nothing of the registry or the device database: it asks
an `ArtifactLookup` where a version's file is and an `ArtifactAuthorizer` whether a token may fetch it.

The token is checked before the lookup, so a caller without a valid token learns nothing about which
models exist (401 without a token, 403 for one that may not fetch this artifact, 404 only after that).

Files are served from memory once read (`ArtifactCache`: up to `cache_bytes` in all, least recently used
out first, each file checked against its recorded sha256 as it is read in, and keyed by its size and mtime
so a changed file is read again): a wave of a thousand devices fetching one model then costs no file reads
and no worker-thread hop per chunk, only the socket writes on the event loop. Files that do not fit are
streamed from disk in worker threads.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, Header, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from fleet_protocol.signing import file_digest

CHUNK_BYTES = 1 << 20
CACHE_BYTES = 256 << 20  # artifact bytes held in memory, in all (0: always stream from disk)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ArtifactFile:
    """One model file as the registry recorded it: where it is, its sha256 (lower-case hex) and size."""

    path: Path
    sha256: str
    size: int

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


class ArtifactLookup(Protocol):
    """Where the file of model `name` version `version` is; None when there is no such version."""

    def __call__(self, name: str, version: str) -> ArtifactFile | None: ...


class ArtifactAuthorizer(Protocol):
    """Whether bearer `token` may download model `name` version `version`."""

    def __call__(self, token: str, name: str, version: str) -> bool: ...


class ArtifactCache:
    """Whole artifact files in memory, least recently used out first, `max_bytes` in all (thread-safe).

    A file is cached only when its bytes match the sha256 the registry recorded; the key includes its size
    and modification time, so a file replaced on disk is read (and checked) again.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[tuple[str, str, int, int], bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, artifact: ArtifactFile, stat: os.stat_result) -> bytes | None:
        """The file's bytes, read in on first use; None when it does not fit or does not match its sha256."""
        if stat.st_size > self.max_bytes:
            return None
        key = (str(artifact.path), artifact.sha256, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            data = self._files.get(key)
            if data is not None:
                self._files.move_to_end(key)
                return data
        try:
            data = artifact.path.read_bytes()
        except OSError:
            return None
        if len(data) != artifact.size or hashlib.sha256(data).hexdigest() != artifact.sha256:
            return None  # streamed from disk as it is; the device's own check refuses it
        with self._lock:
            if key not in self._files:
                self._files[key] = data
                self._held += len(data)
            while self._held > self.max_bytes:
                _, evicted = self._files.popitem(last=False)
                self._held -= len(evicted)
        return data


def artifact_router(
    lookup: ArtifactLookup, authorize: ArtifactAuthorizer, *, cache_bytes: int = CACHE_BYTES
) -> APIRouter:
    """The ``/v1/artifacts/{name}/{version}`` routes (GET and HEAD)."""
    router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])
    cache = ArtifactCache(cache_bytes)

    def get_artifact(
        request: Request,
        name: Annotated[str, PathParam(pattern=_NAME, description="Model name.")],
        version: Annotated[str, PathParam(pattern=_VERSION, description="Model version.")],
        authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
        range_header: Annotated[str | None, Header(alias="range", description="bytes=START-[END]")] = None,
        if_none_match: Annotated[str | None, Header()] = None,
        if_range: Annotated[str | None, Header()] = None,
    ) -> Response:
        token = _bearer_token(authorization)
        if not authorize(token, name, version):
            raise HTTPException(403, f"this token may not download {name} version {version}")
        artifact = lookup(name, version)
        if artifact is None:
            raise HTTPException(404, f"no artifact for {name} version {version}")
        stat = _stat_on_disk(artifact)
        size = stat.st_size
        headers = {
            "ETag": artifact.etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, no-transform",
            "Content-Disposition": f'attachment; filename="{name}-{version}.onnx"',
        }
        if if_none_match is not None and _etag_matches(if_none_match, artifact.sha256):
            return Response(status_code=304, headers=headers)
        byte_range: tuple[int, int] | None = None
        if range_header is not None and (if_range is None or if_range.strip() == artifact.etag):
            try:
                byte_range = _parse_range(range_header, size)
            except _UnsatisfiableRangeError:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        start, end = byte_range if byte_range is not None else (0, size - 1)
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        status = 200
        if byte_range is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        cached = cache.get(artifact, stat)
        return StreamingResponse(
            _read(artifact.path, start, length) if cached is None else _slices(cached, start, length),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    # One route per method: a route with both would give GET and HEAD the same OpenAPI operation id.
    summaries = {
        "GET": "Download a model file (bearer token; Range, ETag = sha256, If-None-Match, If-Range)",
        "HEAD": "The headers of a model file download (size, ETag), without the body",
    }
    for method, summary in summaries.items():
        router.add_api_route(
            "/{name}/{version}",
            get_artifact,
            methods=[method],
            operation_id=f"{method.lower()}_artifact",
            summary=summary,
            response_class=Response,
            responses=_RESPONSES,
        )
    return router


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The whole file."},
    206: {"description": "The requested byte range."},
    304: {"description": "The client's copy (If-None-Match) is current."},
    401: {"description": "No bearer token."},
    403: {"description": "The token may not download this artifact."},
    404: {"description": "No such model version."},
    416: {"description": "The range lies outside the file."},
}


def create_artifact_app(lookup: ArtifactLookup, authorize: ArtifactAuthorizer) -> FastAPI:
    """A FastAPI app serving only the artifact routes (the fleet manager mounts the router in its own)."""
    app = FastAPI(title="edgefleet artifacts", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(artifact_router(lookup, authorize))
    return app


# ---- building blocks for simple deployments, tests and benchmarks --------------------------------------


def file_artifacts(files: Mapping[tuple[str, str], Path]) -> ArtifactLookup:
    """A lookup over fixed files, keyed by (name, version); each file's sha256 is computed once, here."""
    table: dict[tuple[str, str], ArtifactFile] = {}
    for key, path in files.items():
        digest, size = file_digest(path)
        table[key] = ArtifactFile(path=path, sha256=digest, size=size)

    def lookup(name: str, version: str) -> ArtifactFile | None:
        return table.get((name, version))

    return lookup


def static_tokens(tokens: Mapping[str, frozenset[tuple[str, str]] | None]) -> ArtifactAuthorizer:
    """Tokens and what each may fetch: a set of (name, version), or None for every artifact.

    Tokens are compared in constant time, so response timing does not leak a valid token's prefix.
    """
    entries = [(token.encode(), allowed) for token, allowed in tokens.items()]

    def authorize(token: str, name: str, version: str) -> bool:
        given = token.encode()
        granted = False
        for known, allowed in entries:
            if secrets.compare_digest(given, known):
                granted = allowed is None or (name, version) in allowed
        return granted

    return authorize


# ---- helpers ------------------------------------------------------------------------------------------


class _UnsatisfiableRangeError(Exception):
    pass


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401,
            "send the device's artifact token as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="edgefleet-artifacts"'},
        )
    return token.strip()


def _stat_on_disk(artifact: ArtifactFile) -> os.stat_result:
    try:
        stat = os.stat(artifact.path)
    except OSError:
        raise HTTPException(404, "the artifact's file is missing from the store") from None
    if stat.st_size != artifact.size:
        # Serving it would hand devices bytes that cannot match the recorded sha256.
        raise HTTPException(500, "the artifact's file does not match its recorded size; re-register it")
    return stat


def _etag_matches(header: str, sha256: str) -> bool:
    """If-None-Match uses the weak comparison: W/"x" matches "x"; '*' matches anything."""
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{sha256}"':
            return True
    return False


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single range; None to ignore the header (malformed or several ranges,
    which RFC 9110 lets a server answer with the whole file); _UnsatisfiableRangeError for a range past
    the end.
    """
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _UnsatisfiableRangeError
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _UnsatisfiableRangeError
    return start, min(int(last) if last else size - 1, size - 1)


async def _slices(data: bytes, start: int, length: int) -> AsyncIterator[memoryview]:
    """Chunks of a file held in memory, on the event loop (no worker thread, no copy)."""
    view = memoryview(data)
    end = start + length
    for offset in range(start, end, CHUNK_BYTES):
        yield view[offset : min(offset + CHUNK_BYTES, end)]


def _read(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                return  # the file shrank under us: the client sees a short body and resumes
            remaining -= len(chunk)
            yield chunk
