"""A cortex's persistent Ed25519 identity (also its libp2p identity in the mesh).

Stored as an unencrypted PKCS#8 PEM file, mode 0600, created on first start.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl import bindings as _sodium
from nacl.exceptions import BadSignatureError


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @functools.cached_property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (derived once: every signed receipt names it)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def seed(self) -> bytes:
        """The raw 32-byte private seed (what libp2p's Ed25519 key is built from)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def fingerprint(self) -> str:
        return self.public_bytes.hex()[:16]

    @functools.cached_property
    def _sodium_secret(self) -> bytes:
        return _sodium.crypto_sign_seed_keypair(self.seed)[1]

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data`` (the same bytes as ``private_key.sign``:
        Ed25519 is deterministic). Made by libsodium, ~35 us against OpenSSL's ~50 us
        here; a serving cortex signs a receipt on every federated answer's path."""
        return _sodium.crypto_sign(data, self._sodium_secret)[:64]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature over ``data``.

    Verified by libsodium (~90 us here against ~150 us for OpenSSL through
    ``cryptography``; an asking cortex verifies a receipt on every federated answer's
    path). libsodium is the stricter of the two: it also rejects small-order keys and
    non-canonical signatures, which no honest signer makes."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        _sodium.crypto_sign_open(signature + data, public_key)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def load_or_create(path: Path) -> Identity:
    """Load the identity at ``path``, creating it (mode 0600) if absent.

    Raises:
        ValueError: the file exists but holds no Ed25519 private key.
    """
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return Identity(key)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # a data dir of secrets, as the cortex makes it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return Identity(key)
