"""The model registry on MLflow: versions of ONNX files, their facts as tags, signatures, and aliases.

Each registered version is one MLflow run (whose artifact folder `model/` holds the `.onnx` file) and one
MLflow model version pointing at that folder, tagged with the facts validation read (sha256, size, input
shape, class-names digest, precision, opset, producer), the variant, and the Ed25519 signature of the
canonical manifest `{"name","version","sha256","size"}`.

MLflow keeps no history of alias moves, so the registry appends one registered-model tag per move,
`edgefleet.alias_move.<ULID>` = JSON `{alias, from_version, to_version, actor, at}`. Tags live in MLflow
itself, so the history works the same against a local SQLite store and a remote tracking server, and the
ULID keys sort in the order the moves were made. Tags are only ever added, never rewritten.

mlflow is imported lazily: importing it costs seconds, and the `edgefleet` CLI loads this package for
every command.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet_protocol.ids import new_msg_id
from fleet_protocol.signing import (
    PRIVATE_KEY_ENV,
    ModelManifest,
    SigningError,
    file_digest,
    key_id,
    load_private_key,
    sign_manifest,
)
from model_registry.config import RegistrySettings
from model_registry.validation import Dim, ModelValidationError, validate_model

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
VARIANT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,31}$"
ALIAS_MOVE_PREFIX = "edgefleet.alias_move."
ARTIFACT_DIR = "model"
MAX_ACTOR_LENGTH = 200
# Tags the registry derives itself; extra tags may not overwrite them (a forged sha256 would defeat checks).
RESERVED_TAGS = frozenset(
    {
        "sha256",
        "size",
        "task",
        "output_layout",
        "input_name",
        "input_shape",
        "input_type",
        "output_shape",
        "num_classes",
        "class_names_digest",
        "class_names_source",
        "precision",
        "opset",
        "producer",
        "variant",
        "signature",
        "signing_key_id",
        "filename",
        "registered_by",
    }
)
_NAME_RE = re.compile(NAME_PATTERN)
_ALIAS_RE = re.compile(ALIAS_PATTERN)
_VARIANT_RE = re.compile(VARIANT_PATTERN)
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


class RegistryError(Exception):
    """A registry operation failed; the message says what to do."""


class NotFoundError(RegistryError):
    """No such model, version or alias."""


class IntegrityError(RegistryError):
    """A stored file does not match the sha256 or size the version was registered with."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version of a model, as the fleet manager and the CLI see it."""

    name: str
    version: str
    sha256: str
    size: int
    signature: str | None
    variant: str
    precision: str
    input_shape: tuple[Dim, ...]
    class_names_digest: str
    tags: dict[str, str]
    created_at: datetime
    aliases: tuple[str, ...] = ()
    source: str = ""

    @property
    def manifest(self) -> ModelManifest:
        return ModelManifest(name=self.name, version=self.version, sha256=self.sha256, size=self.size)

    @property
    def signing_key_id(self) -> str | None:
        return self.tags.get("signing_key_id")

    @property
    def filename(self) -> str:
        return self.tags.get("filename") or f"{self.name}.onnx"

    def manifest_document(self) -> dict[str, Any]:
        """The signed manifest with its signature: what `edgefleet registry resolve` prints."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "signature": self.signature,
            "signing_key_id": self.signing_key_id,
            "variant": self.variant,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "signature": self.signature,
            "variant": self.variant,
            "precision": self.precision,
            "input_shape": list(self.input_shape),
            "class_names_digest": self.class_names_digest,
            "aliases": list(self.aliases),
            "created_at": self.created_at.isoformat(),
            "source": self.source,
            "tags": dict(sorted(self.tags.items())),
        }


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: `from_version` None when the alias is new, `to_version` None when removed."""

    name: str
    alias: str
    from_version: str | None
    to_version: str | None
    actor: str
    at: datetime
    move_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "actor": self.actor,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class RegisteredModelInfo:
    """One registered model: its aliases (alias → version) and newest version."""

    name: str
    description: str
    aliases: dict[str, str]
    latest_version: str | None
    created_at: datetime
    updated_at: datetime
    tags: dict[str, str] = field(default_factory=dict)


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def validate_alias(alias: str) -> str:
    if not _ALIAS_RE.match(alias) or _RESERVED_ALIAS_RE.match(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: use a letter then up to 63 letters, digits, '_' or '-' "
            "('latest' and 'v<digits>' are reserved by MLflow)"
        )
    return alias


def validate_version(version: str | int) -> str:
    text = str(version)
    if not text.isdigit() or int(text) < 1:
        raise RegistryError(f"invalid version {text!r}: versions are positive integers (1, 2, ...)")
    return str(int(text))


class ModelRegistry:
    """Register, sign, look up, alias and download ONNX model versions kept in MLflow."""

    def __init__(self, settings: RegistrySettings | None = None) -> None:
        self.settings = settings or RegistrySettings()
        self._client_instance: MlflowClient | None = None
        self._experiment_id: str | None = None

    # -- MLflow plumbing ---------------------------------------------------------------------------------

    @property
    def _client(self) -> MlflowClient:
        if self._client_instance is None:
            from mlflow import MlflowClient

            if not self.settings.uses_server:
                self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            uri = self.settings.tracking_uri
            self._client_instance = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client_instance

    def _experiment(self) -> str:
        if self._experiment_id is None:
            client, name = self._client, self.settings.experiment
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self._experiment_id = client.create_experiment(
                        name, artifact_location=self.settings.artifact_location
                    )
                except _mlflow_error() as error:
                    if _code(error) != "RESOURCE_ALREADY_EXISTS":  # another process created it just now
                        raise RegistryError(f"cannot create MLflow experiment {name!r}: {error}") from error
                    experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":  # someone deleted it in the MLflow UI
                    client.restore_experiment(experiment.experiment_id)
                self._experiment_id = str(experiment.experiment_id)
        assert self._experiment_id is not None
        return self._experiment_id

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self._client.create_registered_model(name, description="ONNX model registered by edgefleet")
        except _mlflow_error() as error:
            if _code(error) != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"cannot create registered model {name!r}: {error}") from error

    def _registered_model(self, name: str) -> Any:
        validate_name(name)
        try:
            return self._client.get_registered_model(name)
        except _mlflow_error() as error:
            if _code(error) == "RESOURCE_DOES_NOT_EXIST":
                raise NotFoundError(
                    f"no model named {name!r}; 'edgefleet registry list' shows the registered models"
                ) from None
            raise RegistryError(f"cannot read model {name!r}: {error}") from error

    # -- registering ------------------------------------------------------------------------------

    def signing_key(self, key: Path | Ed25519PrivateKey | None = None) -> Ed25519PrivateKey:
        """The key to sign with: the one given, else settings, else $EDGEFLEET_SIGNING_KEY, else the default
        file; SigningError says how to get one."""
        if isinstance(key, Ed25519PrivateKey):
            return key
        if key is not None:
            return load_private_key(Path(key))
        if self.settings.signing_key is not None:
            return load_private_key(self.settings.signing_key)
        if os.environ.get(PRIVATE_KEY_ENV):
            return load_private_key(None)
        default = self.settings.default_key_path
        if default.is_file():
            return load_private_key(default)
        raise SigningError(
            f"no signing key: create one with 'edgefleet registry keygen' (writes {default}), or pass "
            f"--key FILE, or set EDGEFLEET_REGISTRY_SIGNING_KEY=FILE or {PRIVATE_KEY_ENV}=<PEM>; "
            "--unsigned registers without a signature (development only: devices refuse such models)"
        )

    def register(
        self,
        model_path: Path,
        name: str,
        *,
        alias: str | None = None,
        variant: str | None = None,
        signing_key: Path | Ed25519PrivateKey | None = None,
        extra_tags: Mapping[str, str] | None = None,
        actor: str = "cli",
        unsigned: bool = False,
    ) -> ModelVersionInfo:
        """Validate, store, register, tag and sign a new version of `name`; optionally point `alias` at it.

        Raises ModelValidationError (the model is refused), SigningError (no usable key), RegistryError.
        """
        validate_name(name)
        if alias is not None:
            validate_alias(alias)
        if variant is not None and not _VARIANT_RE.match(variant):
            raise RegistryError(f"invalid variant {variant!r}: lower-case letters, digits, '.', '_', '-'")
        tags_in = {str(k): str(v) for k, v in (extra_tags or {}).items()}
        if reserved := sorted(RESERVED_TAGS.intersection(tags_in)):
            raise RegistryError(f"extra tags may not set {reserved}: the registry derives them")
        if bad := sorted(k for k in tags_in if k.startswith(ALIAS_MOVE_PREFIX)):
            raise RegistryError(f"extra tags may not use the prefix {ALIAS_MOVE_PREFIX}: {bad}")
        model_path = Path(model_path)
        # Resolve the key before anything is written, so a missing key leaves no unsigned version behind.
        private_key = None if unsigned else self.signing_key(signing_key)
        with tempfile.TemporaryDirectory(prefix="edgefleet-register-") as scratch:
            # Validate and upload one private copy, so the bytes stored are the bytes hashed and checked.
            staged = Path(scratch) / model_path.name
            try:
                shutil.copyfile(model_path, staged)
            except OSError as error:
                raise ModelValidationError(
                    model_path, f"cannot be read: {error.strerror or error}"
                ) from error
            try:
                facts = validate_model(staged)
            except ModelValidationError as error:
                raise ModelValidationError(model_path, error.reason) from None
            tags = {
                **tags_in,
                **facts.tags(),
                "variant": variant or facts.precision,
                "filename": model_path.name,
                "registered_by": _actor(actor),
            }
            version = self._create_version(staged, name, tags)
        try:
            if private_key is not None:
                manifest = ModelManifest(name=name, version=version, sha256=facts.sha256, size=facts.size)
                self._client.set_model_version_tag(
                    name, version, "signature", sign_manifest(manifest, private_key)
                )
                self._client.set_model_version_tag(
                    name, version, "signing_key_id", key_id(private_key.public_key())
                )
        except BaseException:
            self._discard_version(name, version)
            raise
        log.info("registered %s version %s (%s, %s bytes)", name, version, facts.sha256[:12], facts.size)
        if alias is not None:
            self.set_alias(name, alias, version, actor)
        return self.get(name, version)

    def _create_version(self, model_path: Path, name: str, tags: dict[str, str]) -> str:
        client = self._client
        try:
            run = client.create_run(
                self._experiment(), run_name=f"register-{name}", tags={"edgefleet.model": name}
            )
        except _mlflow_error() as error:
            raise RegistryError(
                f"cannot start an MLflow run (is {self._uri_hint()} reachable?): {error}"
            ) from error
        run_id = run.info.run_id
        try:
            client.log_artifact(run_id, str(model_path), artifact_path=ARTIFACT_DIR)
            self._ensure_registered_model(name)
            created = client.create_model_version(
                name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run_id, tags=tags
            )
        except BaseException as error:
            client.set_terminated(run_id, status="FAILED")
            if isinstance(error, _mlflow_error() | OSError):
                raise RegistryError(f"cannot register {model_path} as {name!r}: {error}") from error
            raise
        client.set_terminated(run_id)
        return str(created.version)

    def _discard_version(self, name: str, version: str) -> None:
        try:
            self._client.delete_model_version(name, version)
        except Exception:  # best effort while another error propagates
            log.exception("could not delete the half-registered version %s of %s", version, name)

    # -- reading ----------------------------------------------------------------------------------

    def get(self, name: str, version: str | int) -> ModelVersionInfo:
        validate_name(name)
        version = validate_version(version)
        try:
            found = self._client.get_model_version(name, version)
        except _mlflow_error() as error:
            if _code(error) == "RESOURCE_DOES_NOT_EXIST":
                self._registered_model(name)  # says "no model" when that is the problem
                raise NotFoundError(
                    f"model {name!r} has no version {version}; "
                    f"'edgefleet registry list {name}' shows its versions"
                ) from None
            raise RegistryError(f"cannot read {name} version {version}: {error}") from error
        return _version_info(found)

    def resolve(self, name: str, alias: str) -> ModelVersionInfo:
        """The version an alias points at."""
        model = self._registered_model(name)
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{a}→{v}" for a, v in sorted(aliases.items())) or "none"
            raise NotFoundError(
                f"model {name!r} has no alias {alias!r} (aliases: {known}); set one with "
                f"'edgefleet registry promote {name} VERSION --alias {alias}'"
            )
        return self.get(name, aliases[alias])

    def list_models(self) -> list[RegisteredModelInfo]:
        models = _paged(
            lambda token: self._client.search_registered_models(max_results=100, page_token=token)
        )
        return sorted((_model_info(model) for model in models), key=lambda m: m.name)

    def list_versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of a model, oldest first."""
        model = self._registered_model(name)
        aliases = _aliases_by_version(model)
        pages = _paged(
            lambda token: self._client.search_model_versions(
                f"name='{name}'", max_results=1000, page_token=token
            )
        )
        infos = [_version_info(v, aliases.get(str(v.version), ())) for v in pages]
        return sorted(infos, key=lambda info: int(info.version))

    # -- aliases ----------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: str | int, actor: str = "cli") -> AliasMove:
        """Point `alias` at `version` and append the move to the alias history."""
        validate_alias(alias)
        info = self.get(name, version)
        previous = dict(self._registered_model(name).aliases or {}).get(alias)
        from_version = str(previous) if previous is not None else None
        try:
            self._client.set_registered_model_alias(name, alias, info.version)
        except _mlflow_error() as error:
            raise RegistryError(f"cannot set alias {alias!r} of {name!r}: {error}") from error
        move = AliasMove(name, alias, from_version, info.version, _actor(actor), _now(), new_msg_id())
        try:
            self._append_move(move)
        except BaseException:
            self._restore_alias(name, alias, from_version)
            raise
        log.info("%s moved %s@%s from %s to %s", move.actor, name, alias, from_version, info.version)
        return move

    def remove_alias(self, name: str, alias: str, actor: str = "cli") -> AliasMove:
        """Delete an alias (devices following it keep what they run) and record the move."""
        validate_alias(alias)
        previous = dict(self._registered_model(name).aliases or {}).get(alias)
        if previous is None:
            raise NotFoundError(f"model {name!r} has no alias {alias!r}")
        self._client.delete_registered_model_alias(name, alias)
        move = AliasMove(name, alias, str(previous), None, _actor(actor), _now(), new_msg_id())
        try:
            self._append_move(move)
        except BaseException:
            self._restore_alias(name, alias, str(previous))
            raise
        return move

    def alias_history(self, name: str) -> list[AliasMove]:
        """Every alias move of a model, oldest first."""
        model = self._registered_model(name)
        moves = []
        for key, value in sorted((model.tags or {}).items()):
            if key.startswith(ALIAS_MOVE_PREFIX):
                try:
                    record = json.loads(value)
                    moves.append(
                        AliasMove(
                            name=name,
                            alias=str(record["alias"]),
                            from_version=record.get("from_version"),
                            to_version=record.get("to_version"),
                            actor=str(record.get("actor", "")),
                            at=datetime.fromisoformat(record["at"]),
                            move_id=key.removeprefix(ALIAS_MOVE_PREFIX),
                        )
                    )
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring an unreadable alias-history tag %s of %s", key, name)
        return moves

    def _append_move(self, move: AliasMove) -> None:
        record = {k: v for k, v in move.to_dict().items() if k != "name"}
        self._client.set_registered_model_tag(move.name, ALIAS_MOVE_PREFIX + move.move_id, json.dumps(record))

    def _restore_alias(self, name: str, alias: str, version: str | None) -> None:
        try:
            if version is None:
                self._client.delete_registered_model_alias(name, alias)
            else:
                self._client.set_registered_model_alias(name, alias, version)
        except Exception:  # best effort while the original error propagates
            log.exception("could not restore alias %s of %s to %s", alias, name, version)

    # -- files ------------------------------------------------------------------------------------

    def local_file(self, name: str, version: str | int) -> Path:
        """A local copy of a version's file, downloaded once and checked against its sha256 on every call."""
        info = self.get(name, version)
        if not info.sha256 or info.size <= 0:
            raise IntegrityError(
                f"{name} version {info.version} has no sha256/size tags: it was not registered by edgefleet"
            )
        target = self.settings.download_dir / quote(name, safe="") / info.version / info.filename
        if target.is_file() and file_digest(target) == (info.sha256, info.size):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
            downloaded = self._download(info, Path(scratch))
            digest, size = file_digest(downloaded)
            if (digest, size) != (info.sha256, info.size):
                raise IntegrityError(
                    f"{name} version {info.version}: the stored file has sha256 {digest} and {size} "
                    f"bytes, but it was registered as {info.sha256} with {info.size} bytes; the artifact "
                    "store was altered: register the model again"
                )
            os.replace(downloaded, target)
        return target

    def _download(self, info: ModelVersionInfo, folder: Path) -> Path:
        from mlflow.artifacts import download_artifacts

        try:
            local = Path(
                download_artifacts(
                    artifact_uri=info.source, dst_path=str(folder), tracking_uri=self.settings.tracking_uri
                )
            )
        except Exception as error:  # MLflow raises many types for a missing or unreachable artifact store
            raise RegistryError(
                f"cannot download {info.name} version {info.version} from {info.source}: {error}"
            ) from error
        candidates = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        named = [p for p in candidates if p.name == info.filename]
        if named:
            return named[0]
        if len(candidates) == 1:
            return candidates[0]
        raise IntegrityError(
            f"{info.name} version {info.version}: expected one model file at {info.source}, "
            f"found {[p.name for p in candidates]}"
        )

    def download(self, name: str, version: str | int, destination: Path) -> Path:
        """Copy a verified version's file to `destination` (a file path, or an existing folder)."""
        source = self.local_file(name, version)
        target = destination / source.name if destination.is_dir() else destination
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        return target

    def _uri_hint(self) -> str:
        return self.settings.tracking_uri if self.settings.uses_server else "the MLflow store"


def _mlflow_error() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def _code(error: Exception) -> str:
    return str(getattr(error, "error_code", ""))


def _paged(fetch: Any) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = fetch(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def _aliases_by_version(model: Any) -> dict[str, tuple[str, ...]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        by_version.setdefault(str(version), []).append(alias)
    return {version: tuple(aliases) for version, aliases in by_version.items()}


def _version_info(version: ModelVersion, aliases: tuple[str, ...] | None = None) -> ModelVersionInfo:
    tags = {str(k): str(v) for k, v in (version.tags or {}).items()}
    try:
        shape = json.loads(tags.get("input_shape", "[]"))
        input_shape: tuple[Dim, ...] = tuple(d if isinstance(d, int) else str(d) for d in shape)
    except (ValueError, TypeError):
        input_shape = ()
    try:
        size = int(tags.get("size", "0"))
    except ValueError:
        size = 0
    return ModelVersionInfo(
        name=version.name,
        version=str(version.version),
        sha256=tags.get("sha256", ""),
        size=size,
        signature=tags.get("signature") or None,
        variant=tags.get("variant", ""),
        precision=tags.get("precision", ""),
        input_shape=input_shape,
        class_names_digest=tags.get("class_names_digest", ""),
        tags=tags,
        created_at=_from_ms(version.creation_timestamp),
        aliases=tuple(sorted(version.aliases or ())) if aliases is None else aliases,
        source=version.source or "",
    )


def _model_info(model: Any) -> RegisteredModelInfo:
    versions = [int(v.version) for v in (model.latest_versions or [])]
    return RegisteredModelInfo(
        name=model.name,
        description=model.description or "",
        aliases={str(a): str(v) for a, v in sorted((model.aliases or {}).items())},
        latest_version=str(max(versions)) if versions else None,
        created_at=_from_ms(model.creation_timestamp),
        updated_at=_from_ms(model.last_updated_timestamp),
        tags={k: v for k, v in (model.tags or {}).items() if not k.startswith(ALIAS_MOVE_PREFIX)},
    )


def _from_ms(milliseconds: int | None) -> datetime:
    return datetime.fromtimestamp((milliseconds or 0) / 1000, tz=timezone.utc)


def _now() -> datetime:
    return datetime.now(tz=timezone.utc)


def _actor(actor: str) -> str:
    text = " ".join(str(actor).split())[:MAX_ACTOR_LENGTH]
    return text or "unknown"
