"""A small client of the fleet manager's REST API: the stack drives and watches the fleet as an operator does.

Standard library only (urllib), so the stack needs nothing beyond the fleet extras.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT_S = 10.0


class ApiError(Exception):
    """The API answered with an error status, or could not be reached (status 0)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}" if status else detail)


class FleetApi:
    """GET and POST JSON with an operator token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(
            [
                (k, v)
                for k, values in params.items()
                for v in (values if isinstance(values, list) else [values])
            ]
        )
        return self._call("GET", f"{path}?{query}" if query else path, None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, body)

    def healthz(self) -> dict[str, Any] | None:
        """The health document, or None while the server does not answer."""
        try:
            document: dict[str, Any] = self._call("GET", "/healthz", None)
        except ApiError:
            return None
        return document

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, _detail(error.read())) from None
        except (urllib.error.URLError, OSError) as error:
            raise ApiError(0, f"{self.base_url} unreachable: {getattr(error, 'reason', error)}") from None
        return json.loads(raw) if raw else None


def http_ok(url: str) -> bool:
    """Whether a GET of `url` answers 2xx (readiness probes)."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def _detail(raw: bytes) -> str:
    try:
        document = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    detail = document.get("detail", document) if isinstance(document, dict) else document
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]
