"""Artifact bytes held in memory: only bytes that match the recorded sha256, read again when the file
changes on disk, least recently used out first within the budget."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fleet_manager.artifacts import ArtifactCache, ArtifactFile


def artifact(path: Path, data: bytes) -> ArtifactFile:
    path.write_bytes(data)
    return ArtifactFile(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_cached_once_and_read_again_after_the_file_changed(tmp_path: Path) -> None:
    cache = ArtifactCache(max_bytes=1 << 20)
    model = artifact(tmp_path / "m.onnx", b"a" * 1000)
    first = cache.get(model, os.stat(model.path))
    assert first == b"a" * 1000
    assert cache.get(model, os.stat(model.path)) is first  # from memory
    changed = artifact(tmp_path / "m.onnx", b"b" * 1000)  # same size, new bytes and mtime
    os.utime(changed.path, ns=(os.stat(changed.path).st_atime_ns, os.stat(changed.path).st_mtime_ns + 1))
    assert cache.get(changed, os.stat(changed.path)) == b"b" * 1000
    # Bytes that do not match the recorded sha256 are never held (they are streamed from disk as they are).
    assert cache.get(model, os.stat(changed.path)) is None


def test_least_recently_used_files_leave_first(tmp_path: Path) -> None:
    cache = ArtifactCache(max_bytes=2500)
    files = [artifact(tmp_path / f"{n}.onnx", bytes([n]) * 1000) for n in range(3)]
    held = [cache.get(f, os.stat(f.path)) for f in files[:2]]
    assert cache.get(files[0], os.stat(files[0].path)) is held[0]  # 0 is now the most recently used
    cache.get(files[2], os.stat(files[2].path))  # over the budget: 1 leaves
    assert cache.get(files[0], os.stat(files[0].path)) is held[0]
    assert cache.get(files[1], os.stat(files[1].path)) is not held[1]  # read in again
    too_big = artifact(tmp_path / "big.onnx", b"x" * 3000)
    assert cache.get(too_big, os.stat(too_big.path)) is None
