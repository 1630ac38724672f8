"""The model manifest and its Ed25519 signature: the registry signs, every device verifies.

The signature covers the canonical manifest: the JSON object ``{"name", "version", "sha256", "size"}`` with
sorted keys, no whitespace, UTF-8. Keys travel as PEM files (PKCS#8 private, SubjectPublicKeyInfo public). A
device's trust store is a folder of public-key files (``*.pub`` or ``*.pem``); a key is named by its key id,
the first 16 hex digits of the SHA-256 of its raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_ENV = "EDGEFLEET_SIGNING_KEY"
"""Environment variable that may hold the PEM private key itself (for CI secrets and key vaults)."""

_CHUNK = 1 << 20


class SigningError(Exception):
    """A key could not be read, or a signature does not verify; the message says which and what to do."""


@dataclass(frozen=True)
class ModelManifest:
    """What a signature vouches for: which model, which version, and exactly which bytes."""

    name: str
    version: str
    sha256: str
    size: int

    def canonical_bytes(self) -> bytes:
        body = {"name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def of_file(cls, path: Path, name: str, version: str) -> ModelManifest:
        digest, size = file_digest(path)
        return cls(name=name, version=version, sha256=digest, size=size)


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (lower-case hex) and size in bytes of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def load_private_key(path: Path | None = None) -> Ed25519PrivateKey:
    """The signing key from a PEM file, or else from the ``EDGEFLEET_SIGNING_KEY`` environment variable."""
    if path is not None:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from exc
        source = str(path)
    elif env := os.environ.get(PRIVATE_KEY_ENV):
        pem, source = env.encode(), f"${PRIVATE_KEY_ENV}"
    else:
        raise SigningError(
            f"no signing key: pass --key FILE or set {PRIVATE_KEY_ENV} "
            "(create one with 'edgefleet registry keygen')"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{source} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{source} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(pem: bytes, source: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{source} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{source} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_manifest(manifest: ModelManifest, private_key: Ed25519PrivateKey) -> str:
    """The base64 Ed25519 signature of the canonical manifest."""
    return base64.b64encode(private_key.sign(manifest.canonical_bytes())).decode("ascii")


class TrustStore:
    """The public keys a device accepts model signatures from."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = dict(keys)

    @classmethod
    def from_dir(cls, folder: Path) -> TrustStore:
        if not folder.is_dir():
            raise SigningError(f"trust store {folder} is not a folder; put the registry's public key there")
        keys: dict[str, Ed25519PublicKey] = {}
        for path in sorted([*folder.glob("*.pub"), *folder.glob("*.pem")]):
            key = load_public_key(path.read_bytes(), str(path))
            keys[key_id(key)] = key
        return cls(keys)

    @classmethod
    def of(cls, *public_pems: bytes) -> TrustStore:
        keys = [load_public_key(pem, "public key") for pem in public_pems]
        return cls({key_id(key): key for key in keys})

    def verify(self, manifest: ModelManifest, signature_b64: str) -> str:
        """The id of the trusted key that signed the manifest; `SigningError` when none did."""
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SigningError("signature is not valid base64") from exc
        if not self.keys:
            raise SigningError("trust store is empty: add the registry's public key to it")
        for kid, key in self.keys.items():
            try:
                key.verify(signature, manifest.canonical_bytes())
            except InvalidSignature:
                continue
            return kid
        raise SigningError(
            f"signature of {manifest.name}@{manifest.version} does not verify against any of "
            f"{len(self.keys)} trusted key(s)"
        )
