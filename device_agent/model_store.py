"""The agent's models folder and its OTA record: which model is current, which is previous, what is under way.

Layout (``ota.models_dir``, by default ``<data_dir>/models``)::

    ota-state.json                          the record (below); replaced atomically, fsynced
    <name>@<version>.<sha256[:12]>.onnx     verified model files: current, previous, and a staged candidate
    downloads/<sha256>.part                 a download in progress (resumed with HTTP Range)

The record is the single source of truth. It is written to a temporary file, fsynced, renamed over the old
one and the folder fsynced, so after a crash (``kill -9``, power loss) it is either the old record or the
new one. Model files only enter the folder by an atomic rename of a fully downloaded and verified ``.part``
file, so any file the record names is complete; the agent still re-hashes it before it loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet_protocol.payloads import ModelDesired, ModelRef, OtaState
from fleet_protocol.signing import file_digest

log = logging.getLogger(__name__)

STATE_FILE = "ota-state.json"
DOWNLOADS = "downloads"


class StoredModel(BaseModel):
    """A verified model file in the store."""

    model_config = ConfigDict(extra="ignore")

    name: str
    version: str
    sha256: str
    size: int
    file: str = Field(description="File name inside the models folder.")
    rollout_id: str | None = None
    key_id: str | None = Field(default=None, description="Trust-store key that signed it; None: unsigned.")
    origin: Literal["ota", "config"] = Field(
        default="ota", description="ota: a file in the store; config: the model the settings name (`file`)."
    )

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)


class OtaJob(BaseModel):
    """The last update the agent worked on, and how far it got."""

    model_config = ConfigDict(extra="ignore")

    desired: ModelDesired
    state: OtaState
    error: str | None = None
    committed: bool = Field(default=False, description="Probation passed (only meaningful when active).")
    restarts: int = Field(default=0, description="Agent restarts (not clean stops) while this job was open.")
    clean_stop: bool = Field(default=False, description="The agent stopped cleanly while the job was open.")
    resumed: bool = Field(default=False, description="Some of the download came from an earlier attempt.")
    started_at: float = Field(default_factory=time.time)

    @property
    def in_flight(self) -> bool:
        """Downloading up to activating, or active but still in probation."""
        if self.state is OtaState.ACTIVE:
            return not self.committed
        return self.state in IN_FLIGHT

    @property
    def in_probation(self) -> bool:
        return self.state is OtaState.ACTIVE and not self.committed


IN_FLIGHT = frozenset({OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.STAGING, OtaState.ACTIVATING})


class OtaRecord(BaseModel):
    """What ``ota-state.json`` holds. `current` None means the model from the agent's settings."""

    model_config = ConfigDict(extra="ignore")

    format: Literal[1] = 1
    current: StoredModel | None = None
    previous: StoredModel | None = None
    job: OtaJob | None = None


class ModelStore:
    """The models folder: the record, verified model files and partial downloads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads = root / DOWNLOADS
        self.state_path = root / STATE_FILE
        self.downloads.mkdir(parents=True, exist_ok=True)

    # ---- the record ------------------------------------------------------------------------------------

    def load(self) -> OtaRecord:
        """The saved record; an empty one if there is none. An unreadable record is set aside, not fatal."""
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return OtaRecord()
        try:
            return OtaRecord.model_validate_json(text)
        except ValidationError as error:
            aside = self.state_path.with_suffix(f".corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.state_path, aside)
            log.error(
                "OTA record %s is unreadable (moved to %s); starting from the configured model: %s",
                self.state_path,
                aside.name,
                error.errors()[0]["msg"] if error.errors() else error,
            )
            return OtaRecord()

    def save(self, record: OtaRecord) -> None:
        """Replace the record atomically and durably."""
        data = record.model_dump_json(indent=2).encode()
        temporary = self.state_path.with_name(STATE_FILE + ".tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.state_path)
        _fsync_dir(self.root)

    # ---- files -----------------------------------------------------------------------------------------

    def part_path(self, desired: ModelDesired) -> Path:
        return self.downloads / f"{desired.sha256}.part"

    def file_name(self, desired: ModelDesired) -> str:
        return f"{desired.name}@{desired.version}.{desired.sha256[:12]}.onnx"

    def path_of(self, model: StoredModel) -> Path:
        return Path(model.file) if model.origin == "config" else self.root / model.file

    def install(self, desired: ModelDesired, key_id: str | None) -> StoredModel:
        """Move the verified ``.part`` file into the store (fsync, then an atomic rename)."""
        part = self.part_path(desired)
        target = self.root / self.file_name(desired)
        with part.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(part, target)
        _fsync_dir(self.root)
        _fsync_dir(self.downloads)
        return self.stored(desired, key_id)

    def stored(self, desired: ModelDesired, key_id: str | None) -> StoredModel:
        return StoredModel(
            name=desired.name,
            version=desired.version,
            sha256=desired.sha256,
            size=desired.size,
            file=self.file_name(desired),
            rollout_id=desired.rollout_id,
            key_id=key_id,
        )

    def installed(self, desired: ModelDesired) -> Path | None:
        path = self.root / self.file_name(desired)
        return path if path.is_file() else None

    def check(self, model: StoredModel) -> str | None:
        """None if the file is there with the recorded size and sha256, else what is wrong with it."""
        path = self.path_of(model)
        try:
            digest, size = file_digest(path)
        except OSError as error:
            return f"{model.file}: {error.strerror or error}"
        if size != model.size:
            return f"{model.file} has {size} bytes, expected {model.size}"
        if digest != model.sha256:
            return f"{model.file} has sha256 {digest[:16]}…, expected {model.sha256[:16]}…"
        return None

    def prune(self, keep: Iterable[StoredModel | None], keep_parts: Iterable[str] = ()) -> None:
        """Delete model files and partial downloads the record no longer names."""
        files = {model.file for model in keep if model is not None and model.origin == "ota"}
        parts = {f"{sha}.part" for sha in keep_parts}
        for path in self.root.glob("*.onnx"):
            if path.name not in files:
                _remove(path)
        for path in self.downloads.glob("*.part"):
            if path.name not in parts:
                _remove(path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
        log.info("removed %s (no longer current or previous)", path.name)
    except OSError as error:
        log.warning("cannot remove %s: %s", path, error)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return  # directories cannot be opened for fsync on Windows; the rename is still atomic there
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
