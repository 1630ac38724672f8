"""Model manifest signatures: sign with the registry key, verify with a device trust store."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_protocol.signing import (
    PRIVATE_KEY_ENV,
    ModelManifest,
    SigningError,
    TrustStore,
    file_digest,
    generate_keypair,
    load_private_key,
    sign_manifest,
)


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    private_pem, public_pem = generate_keypair()
    private, public = tmp_path / "registry.key", tmp_path / "trust" / "registry.pub"
    private.write_bytes(private_pem)
    public.parent.mkdir()
    public.write_bytes(public_pem)
    return private, public


def test_canonical_manifest_is_sorted_and_compact() -> None:
    manifest = ModelManifest(name="yolov8n", version="3", sha256="ab" * 32, size=12)
    assert manifest.canonical_bytes() == (
        b'{"name":"yolov8n","sha256":"' + b"ab" * 32 + b'","size":12,"version":"3"}'
    )


def test_signature_verifies_and_any_change_breaks_it(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keypair
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx bytes")
    manifest = ModelManifest.of_file(model, "yolov8n", "3")
    assert (manifest.sha256, manifest.size) == file_digest(model)
    signature = sign_manifest(manifest, load_private_key(private))
    store = TrustStore.from_dir(public.parent)
    assert store.verify(manifest, signature) in store.keys
    for tampered in (
        ModelManifest("yolov8n", "4", manifest.sha256, manifest.size),
        ModelManifest("yolov8n", "3", "00" * 32, manifest.size),
        ModelManifest("yolov8n", "3", manifest.sha256, manifest.size + 1),
    ):
        with pytest.raises(SigningError, match="does not verify"):
            store.verify(tampered, signature)


def test_other_key_and_garbage_are_refused(keypair: tuple[Path, Path]) -> None:
    private, _ = keypair
    manifest = ModelManifest(name="m", version="1", sha256="cd" * 32, size=1)
    signature = sign_manifest(manifest, load_private_key(private))
    stranger = TrustStore.of(generate_keypair()[1])
    with pytest.raises(SigningError, match="does not verify"):
        stranger.verify(manifest, signature)
    with pytest.raises(SigningError, match="base64"):
        stranger.verify(manifest, "not base64!")
    with pytest.raises(SigningError, match="empty"):
        TrustStore({}).verify(manifest, signature)


def test_private_key_from_env_and_clear_errors(
    keypair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = keypair
    monkeypatch.delenv(PRIVATE_KEY_ENV, raising=False)
    with pytest.raises(SigningError, match="keygen"):
        load_private_key()
    monkeypatch.setenv(PRIVATE_KEY_ENV, private.read_text())
    assert load_private_key() is not None
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_private_key(public)
    with pytest.raises(SigningError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(SigningError, match="not a folder"):
        TrustStore.from_dir(tmp_path / "nowhere")
