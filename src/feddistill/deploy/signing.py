"""Ed25519-signed releases (teacher signals, global students) sent to clients.

The server signs ``signed_message(sha256(payload), round, release_id, run_id)``
with the release-signing key (``release-signing.key`` from
:func:`feddistill.deploy.certs.generate_credentials`); clients verify with
``release-signing.pub`` and reject unsigned, tampered or replayed releases.

Canonical message layout (all integers big-endian)::

    b"feddistill-release-v1"
    || u32(len(f)) || f     for f in (payload_sha256 hex, str(round),
                                      release_id, str(run_id))   (UTF-8)

Length prefixes make the encoding injective (no field-boundary confusion);
the prefix separates this signature domain from any other use of the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "DOMAIN_PREFIX",
    "KeyLoadError",
    "ReleaseRejected",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "payload_sha256",
    "sign_release",
    "signed_message",
    "verify_release",
]

DOMAIN_PREFIX = b"feddistill-release-v1"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_ED25519_SIG_LEN = 64


class ReleaseRejected(Exception):
    """A release failed verification.

    ``reason`` is the human-readable reason (also ``str(exc)``); ``kind`` is
    one of ``"unsigned"``, ``"tampered"``, ``"replayed"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = reason.split(":", 1)[0].strip()


class KeyLoadError(ValueError):
    """A key file exists but is not a usable Ed25519 key (message names the path)."""


def payload_sha256(payload: bytes) -> str:
    """Lower-case hex SHA-256 of ``payload``."""
    return hashlib.sha256(bytes(payload)).hexdigest()


def _check_round(value: int, name: str = "round") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def signed_message(payload_sha256: str, round: int, release_id: str, run_id: str | int = "") -> bytes:
    """Canonical bytes that are signed for a release."""
    if not isinstance(payload_sha256, str) or not _SHA256_HEX.match(payload_sha256):
        raise ValueError("payload_sha256 must be 64 lower-case hex characters")
    _check_round(round)
    if not isinstance(release_id, str) or not release_id:
        raise ValueError("release_id must be a non-empty string")
    if isinstance(run_id, bool) or not isinstance(run_id, (str, int)):
        raise TypeError("run_id must be a str or int")
    return DOMAIN_PREFIX + b"".join(_field(f) for f in (payload_sha256, str(round), release_id, str(run_id)))


def sign_release(
    private_key: ed25519.Ed25519PrivateKey,
    payload: bytes,
    *,
    round: int,
    release_id: str,
    run_id: str | int = "",
) -> str:
    """Sign ``payload`` for ``round``/``release_id``; returns base64 signature."""
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise TypeError("private_key must be an Ed25519PrivateKey")
    message = signed_message(payload_sha256(payload), round, release_id, run_id)
    return base64.b64encode(private_key.sign(message)).decode("ascii")


def verify_release(
    public_key: ed25519.Ed25519PublicKey,
    payload: bytes,
    *,
    round: int,
    release_id: str,
    signature: str | bytes | None,
    min_round: int | None = None,
    run_id: str | int = "",
) -> None:
    """Verify a signed release or raise :class:`ReleaseRejected`.

    Checks, in order: signature present ("unsigned"), signature valid over
    (sha256(payload), round, release_id, run_id) ("tampered"), and
    ``round >= min_round`` ("replayed: round X older than last accepted Y").
    ``min_round`` is the last round the caller accepted (same round is allowed,
    e.g. a re-delivery; pass ``last + 1`` to forbid it).
    """
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise TypeError("public_key must be an Ed25519PublicKey")
    _check_round(round)
    if min_round is not None:
        _check_round(min_round, "min_round")

    if signature is None or (isinstance(signature, (str, bytes)) and not signature.strip()):
        raise ReleaseRejected("unsigned: release carries no signature")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError, TypeError) as err:
        raise ReleaseRejected("tampered: signature is not valid base64") from err
    if len(raw) != _ED25519_SIG_LEN:
        raise ReleaseRejected(f"tampered: signature has {len(raw)} bytes, expected {_ED25519_SIG_LEN}")
    message = signed_message(payload_sha256(payload), round, release_id, run_id)
    try:
        public_key.verify(raw, message)
    except InvalidSignature as err:
        raise ReleaseRejected(
            f"tampered: signature does not match payload/round/release id (signer {fingerprint(public_key)})"
        ) from err

    if min_round is not None and round < min_round:
        raise ReleaseRejected(f"replayed: round {round} older than last accepted {min_round}")


def fingerprint(public_key: ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey) -> str:
    """Short id for logs: hex of the first 16 bytes of sha256(raw public key)."""
    if isinstance(public_key, ed25519.Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:16].hex()


def _read(path: Path | str, what: str) -> tuple[Path, bytes]:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} file '{path}' does not exist")
    if not path.is_file():
        raise KeyLoadError(f"{what} path '{path}' is not a regular file")
    return path, path.read_bytes()


def load_private_key(path: Path | str) -> ed25519.Ed25519PrivateKey:
    """Load an unencrypted Ed25519 private key (PEM PKCS8 or OpenSSH)."""
    path, data = _read(path, "release-signing private key")
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyLoadError(f"'{path}' is not a readable unencrypted PEM/OpenSSH private key: {err}") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyLoadError(f"'{path}' holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: Path | str) -> ed25519.Ed25519PublicKey:
    """Load an Ed25519 public key (PEM SubjectPublicKeyInfo or ``ssh-ed25519``)."""
    path, data = _read(path, "release-signing public key")
    if b"PRIVATE KEY" in data:
        raise KeyLoadError(f"'{path}' contains a PRIVATE key; pass the public key file (release-signing.pub) instead")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:  # OpenSSH one-line format ("ssh-ed25519 AAAA... comment")
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyLoadError(f"'{path}' is not a readable PEM/OpenSSH public key: {err}") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyLoadError(f"'{path}' holds a {type(key).__name__}, expected an Ed25519 public key")
    return key
