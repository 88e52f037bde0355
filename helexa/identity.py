"""A cortex's persistent Ed25519 identity (also its libp2p identity in the mesh).

Stored as an unencrypted PKCS#8 PEM file, mode 0600, created on first start.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


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

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature over ``data``."""
    try:
        _public_key(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    # A cortex verifies the same few peers' keys over and over (each receipt and
    # announcement); parsing one costs as much as a third of a verification.
    return Ed25519PublicKey.from_public_bytes(raw)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return Identity(key)
