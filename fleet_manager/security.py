"""Secrets: API bearer tokens (stored as SHA-256) and Mosquitto password hashes (PBKDF2-SHA512, `$7$`).

API tokens are 256-bit random strings, so a plain SHA-256 is enough to store them: there is nothing to
brute-force. Broker passwords are random too, but Mosquitto decides their hash format: `$7$` is
PBKDF2-HMAC-SHA512 with a 12-byte salt and a 64-byte key, the format `mosquitto_passwd` writes by default
since Mosquitto 2.0 (`user:$7$<iterations>$<base64 salt>$<base64 key>`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_PREFIX = "eft_"
TOKEN_DISPLAY_CHARS = 12
MOSQUITTO_ITERATIONS = 101  # what mosquitto_passwd 2.0 uses; the passwords themselves are 192-bit random
MOSQUITTO_SALT_BYTES = 12


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_display_prefix(token: str) -> str:
    return token[:TOKEN_DISPLAY_CHARS]


def new_broker_password() -> str:
    return secrets.token_urlsafe(24)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS
) -> str:
    """The `$7$...` hash Mosquitto's password_file expects for `password`."""
    salt = salt if salt is not None else secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def mosquitto_verify(password: str, hashed: str) -> bool:
    """True if `hashed` (a `$7$` hash) is the hash of `password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations, salt = int(parts[2]), base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(key, expected)
