"""The fleet manager's view of the model registry: look up a version, resolve an alias, find the file.

`ModelCatalog` is all the rollout controller and the artifact endpoint need. `RegistryCatalog` adapts
model_registry's `ModelRegistry` to it (and caches what cannot change: a registered version's metadata
and file); tests and tools may pass any other implementation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelInfo:
    """What a rollout needs to know about one model version."""

    name: str
    version: str
    sha256: str
    size: int
    signature: str | None = None
    variant: str | None = None


class ModelNotFoundError(LookupError):
    """No such model, version or alias; the message says which."""


class RegistryUnavailableError(RuntimeError):
    """The registry could not be asked (e.g. the MLflow server is down)."""


class ModelCatalog(Protocol):
    def get(self, name: str, version: str) -> ModelInfo: ...

    def resolve(self, name: str, alias: str) -> ModelInfo: ...

    def local_file(self, name: str, version: str) -> Path: ...


def _info(raw: Any) -> ModelInfo:
    variant = getattr(raw, "variant", None)
    return ModelInfo(
        name=str(raw.name),
        version=str(raw.version),
        sha256=str(raw.sha256),
        size=int(raw.size),
        signature=getattr(raw, "signature", None) or None,
        variant=str(variant).lower() if variant else None,
    )


class RegistryCatalog:
    """`ModelCatalog` over model_registry's `ModelRegistry`."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], ModelInfo] = {}
        self._files: dict[tuple[str, str], Path] = {}

    @classmethod
    def from_settings(cls, overrides: dict[str, Any]) -> RegistryCatalog:
        from model_registry.config import RegistrySettings
        from model_registry.registry import ModelRegistry

        return cls(ModelRegistry(RegistrySettings(**overrides)))

    def get(self, name: str, version: str) -> ModelInfo:
        key = (name, version)
        with self._lock:
            cached = self._versions.get(key)
        if cached is not None:
            return cached
        info = _info(self._call("get", name, version))
        with self._lock:
            self._versions[key] = info
        return info

    def resolve(self, name: str, alias: str) -> ModelInfo:
        return _info(self._call("resolve", name, alias))

    def local_file(self, name: str, version: str) -> Path:
        key = (name, version)
        with self._lock:
            cached = self._files.get(key)
        if cached is not None and cached.is_file():
            return cached
        path = Path(self._call("local_file", name, version))
        with self._lock:
            self._files[key] = path
        return path

    def _call(self, method: str, name: str, ref: str) -> Any:
        from model_registry.registry import NotFoundError, RegistryError

        try:
            return getattr(self._registry, method)(name, ref)
        except (NotFoundError, LookupError) as error:
            raise ModelNotFoundError(str(error)) from error
        except RegistryError as error:
            if str(error).startswith("invalid "):  # a malformed name, version or alias: nothing to find
                raise ModelNotFoundError(str(error)) from error
            raise RegistryUnavailableError(f"model registry: {error}") from error
