"""A persistent Ed25519 identity: a cortex's (also its libp2p identity in the mesh), and a
neuron's (what its cortex binds its node id to, :mod:`helexa.roles.cortex.neuron_keys`).

Stored as an unencrypted PKCS#8 PEM file, mode 0600, created on first start.
"""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl import bindings as _sodium
from nacl.exceptions import BadSignatureError

from helexa.secret_files import keep_owner


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
        return fingerprint(self.public_bytes)

    @functools.cached_property
    def _sodium_secret(self) -> bytes:
        return _sodium.crypto_sign_seed_keypair(self.seed)[1]

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data`` (the same bytes as ``private_key.sign``:
        Ed25519 is deterministic). Made by libsodium, ~35 us against OpenSSL's ~50 us
        here; a serving cortex signs a receipt on every federated answer's path."""
        return _sodium.crypto_sign(data, self._sodium_secret)[:64]


def fingerprint(public_key: bytes) -> str:
    """A public key's short name for logs and listings: its first 8 bytes in hex."""
    return public_key.hex()[:16]


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

    The new key is written whole to a file of its own, synced, then linked into place,
    which fails if ``path`` appeared meanwhile: a crash leaves no half-written key, and two
    processes starting at once on one data directory end with the same key.

    Raises:
        ValueError: the file exists but holds no Ed25519 private key.
    """
    if path.exists():
        return _load(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # a data dir of secrets, as the cortex makes it
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            keep_owner(fh.fileno(), path)  # `sudo helexa mesh id` in the cortex user's data dir: the key stays its
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _load(path)  # another process made it first: theirs is the key
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)
    return Identity(key)


def _load(path: Path) -> Identity:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return Identity(key)


def _sync_dir(folder: Path) -> None:
    """Make a new directory entry in ``folder`` durable (best effort where it cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
