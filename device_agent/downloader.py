"""Resumable HTTP(S) download of a model file into a ``.part`` file (standard library only).

One call is one attempt: it continues from the bytes already in the ``.part`` file with ``Range`` and
``If-Range`` (the expected ETag, the quoted sha256 the artifact endpoint sends), so a server that now holds
different bytes answers with the whole file instead of a tail that would not fit. What went wrong comes back
as `DownloadError`, `permanent` when trying again cannot help (401/403/404, a file of another size); the
caller decides when to retry. The bearer token is never sent on to a redirect target.
"""

from __future__ import annotations

import functools
import http.client
import re
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1024 * 1024  # per read and write: a few Python-level rounds per model, not dozens
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_PERMANENT_STATUS = frozenset({400, 401, 403, 404, 405, 410, 451})

ProgressCallback = Callable[[int, int], None]  # (bytes on disk, total bytes)


class DownloadError(Exception):
    """A download attempt failed; `permanent` when retrying the same request cannot succeed."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class DownloadCancelled(Exception):  # noqa: N818 - not an error: the caller asked for it
    """The cancel event was set; the ``.part`` file keeps what arrived."""


@dataclass(frozen=True)
class DownloadRequest:
    url: str
    target: Path  # the .part file
    size: int
    sha256: str
    token: str | None = None
    timeout_s: float = 30.0
    ca_file: Path | None = None


@dataclass(frozen=True)
class DownloadResult:
    resumed_from: int  # bytes already on disk when this attempt started (0: a fresh download)
    received: int  # bytes received by this attempt


def download(
    request: DownloadRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> DownloadResult:
    """Bring ``request.target`` to ``request.size`` bytes from ``request.url``; resume what is there."""
    request.target.parent.mkdir(parents=True, exist_ok=True)
    have = request.target.stat().st_size if request.target.exists() else 0
    if have > request.size:
        request.target.unlink()
        have = 0
    if have == request.size:
        return DownloadResult(resumed_from=have, received=0)
    response = _open(request, have)
    try:
        offset = _start_offset(response, request, have)
        received = _copy(response, request, offset, "r+b" if offset > 0 else "wb", progress, cancel)
    finally:
        response.close()
    return DownloadResult(resumed_from=offset, received=received)


def _open(request: DownloadRequest, have: int) -> http.client.HTTPResponse:
    if urllib.parse.urlsplit(request.url).scheme not in ("http", "https"):
        raise DownloadError(f"unsupported URL {request.url!r}: use http(s)", permanent=True)
    http_request = urllib.request.Request(request.url, method="GET")
    http_request.add_header("Accept-Encoding", "identity")
    if have > 0:
        http_request.add_header("Range", f"bytes={have}-")
        http_request.add_header("If-Range", f'"{request.sha256}"')
    if request.token:
        # Unredirected: a redirect (e.g. to an object store's signed URL) must not carry the device's token.
        http_request.add_unredirected_header("Authorization", f"Bearer {request.token}")
    opener = _opener(_tls_context(request.ca_file))
    try:
        response = opener.open(http_request, timeout=request.timeout_s)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and have > 0:
            # Our partial file is not a prefix of theirs (or is complete under another length): start over.
            request.target.unlink(missing_ok=True)
            raise DownloadError(f"server refused the range from byte {have}; starting over") from None
        permanent = error.code in _PERMANENT_STATUS
        hint = {401: " (no or wrong artifact token)", 403: " (token not allowed this model)"}.get(
            error.code, ""
        )
        raise DownloadError(f"HTTP {error.code} {error.reason}{hint}", permanent=permanent) from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise DownloadError(
                f"TLS certificate not trusted: {reason.verify_message}", permanent=True
            ) from None
        raise DownloadError(f"cannot reach {_host(request.url)}: {reason}") from None
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"cannot reach {_host(request.url)}: {error or type(error).__name__}") from None
    if not isinstance(response, http.client.HTTPResponse):  # a redirect to file:// or ftp://
        response.close()
        raise DownloadError(f"unsupported URL {response.geturl()!r}: use http(s)", permanent=True)
    return response


def _start_offset(response: http.client.HTTPResponse, request: DownloadRequest, have: int) -> int:
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != have:
            raise DownloadError(f"server answered a range from byte {have} with {match and match.group(0)!r}")
        total = match.group(3)
        if total != "*" and int(total) != request.size:
            raise DownloadError(
                f"the server's file has {total} bytes, the desired model {request.size}", permanent=True
            )
        return have
    if response.status == 200:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != request.size:
            raise DownloadError(
                f"the server's file has {length} bytes, the desired model {request.size}", permanent=True
            )
        return 0  # the whole file (the server ignored the range, or the file changed): start over
    raise DownloadError(f"unexpected HTTP {response.status} for a download")


def _copy(
    response: http.client.HTTPResponse,
    request: DownloadRequest,
    offset: int,
    mode: str,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> int:
    received = 0
    position = offset
    with request.target.open(mode) as out:
        out.seek(offset)
        out.truncate()
        while position < request.size:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled
            try:
                chunk = response.read(min(CHUNK_BYTES, request.size - position))
            except (OSError, http.client.HTTPException) as error:
                reason = str(error) or type(error).__name__
                raise DownloadError(
                    f"transfer broke off at byte {position} of {request.size}: {reason}"
                ) from None
            if not chunk:
                raise DownloadError(f"transfer ended early at byte {position} of {request.size}")
            out.write(chunk)
            position += len(chunk)
            received += len(chunk)
            if progress is not None:
                progress(position, request.size)
        out.flush()
    return received


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The TLS context for `ca_file` (None: the system's CAs), made once per file version."""
    if ca_file is None:
        return _context_for(None, 0)
    try:
        version = ca_file.stat().st_mtime_ns
    except OSError:
        version = -1  # let ssl raise its own error about the file
    return _context_for(str(ca_file), version)


@functools.lru_cache(maxsize=8)
def _context_for(ca_file: str | None, version: int) -> ssl.SSLContext:
    # Loading a trust store takes tens of ms; a context is safe to share between connections and threads.
    return ssl.create_default_context(cafile=ca_file)


@functools.lru_cache(maxsize=8)
def _opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    # What urlopen(context=...) builds on every call (a dozen handlers, sorted); it keeps no per-request
    # state, so one per context serves every download and thread.
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


__all__ = [
    "DownloadCancelled",
    "DownloadError",
    "DownloadRequest",
    "DownloadResult",
    "download",
]
