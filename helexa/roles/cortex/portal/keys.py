"""API keys: how they look, how they are made, and how a presented one is checked (pure).

A key is ``sk-hlx-`` + a 16-hex-digit key id + ``_`` + 43 characters of base64url
(32 random bytes, 256 bits)::

    sk-hlx-3f9a0c27e1b45d68_Xq3...k9A

The prefix makes a leaked key recognisable (secret scanners, people); the key id is not
secret: it names the key in the ledger, the admin API and logs, and finds its record
without a scan. Only :func:`digest` of the whole key is stored.

Why SHA-256 and not a password hash (bcrypt, argon2): a password hash is slow on purpose
so that guessing a low-entropy password from a stolen hash costs much; a key here has
256 random bits, which no amount of guessing recovers from any hash, so a slow hash would
buy nothing and cost every request tens of milliseconds. The digest is compared with
:func:`hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field, replace

from ..errors import Unauthorized
from .quota import Limits

PREFIX = "sk-hlx-"
_ID_HEX = 16
_SECRET_BYTES = 32
_SECRET_CHARS = 43  # base64url of 32 bytes, unpadded
_LENGTH = len(PREFIX) + _ID_HEX + 1 + _SECRET_CHARS
_HEX = frozenset("0123456789abcdef")
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def new_key_id() -> str:
    return secrets.token_hex(_ID_HEX // 2)


def new_secret(key_id: str) -> str:
    """A fresh key carrying ``key_id``."""
    return f"{PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def key_id_of(presented: str) -> str | None:
    """The key id a presented key carries, or None if it is not shaped like a key."""
    if len(presented) != _LENGTH or not presented.startswith(PREFIX):
        return None
    key_id = presented[len(PREFIX):len(PREFIX) + _ID_HEX]
    rest = presented[len(PREFIX) + _ID_HEX:]
    if rest[0] != "_" or not set(key_id) <= _HEX or not set(rest[1:]) <= _B64:
        return None
    return key_id


def digest(presented: str) -> bytes:
    """What is stored for a key: SHA-256 of the whole key (see the module docstring)."""
    return hashlib.sha256(presented.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's record: everything but the key itself.

    ``models``: public model names this key may use (None: all its portal lists).
    Times are Unix seconds; ``expires_at`` / ``revoked_at`` None when not set.
    """

    key_id: str
    portal: str
    name: str
    digest: bytes = field(repr=False)
    limits: Limits = Limits()
    models: tuple[str, ...] | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None

    def matches(self, presented: str) -> bool:
        """Whether ``presented`` is this key (constant time in its content)."""
        return hmac.compare_digest(self.digest, digest(presented))

    def state(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self, now: float) -> dict[str, object]:
        """The record as the admin API shows it (never the digest)."""
        return {"key_id": self.key_id, "portal": self.portal, "name": self.name, "state": self.state(now),
                "limits": self.limits.as_dict(), "models": list(self.models) if self.models is not None else None,
                "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at}


def create(portal: str, name: str, *, limits: Limits, models: tuple[str, ...] | None = None, now: float,
           expires_at: float | None = None) -> tuple[str, ApiKey]:
    """A new key: ``(the key, to show once, its record, to store)``."""
    key_id = new_key_id()
    secret = new_secret(key_id)
    return secret, ApiKey(key_id, portal, name, digest(secret), limits, models, now, expires_at)


def rotate(key: ApiKey) -> tuple[str, ApiKey]:
    """A new secret for the same key id (its usage and budget go on); the old one stops working."""
    secret = new_secret(key.key_id)
    return secret, replace(key, digest=digest(secret))


class Keyring:
    """Every key's record in memory, by key id: what requests authenticate against, with
    no disk access on the request path. The admin API keeps it in step with the store."""

    def __init__(self, keys: list[ApiKey] | tuple[ApiKey, ...] = ()) -> None:
        self._by_id = {k.key_id: k for k in keys}

    def put(self, key: ApiKey) -> None:
        self._by_id[key.key_id] = key

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def list(self, portal: str | None = None) -> list[ApiKey]:
        return [k for k in self._by_id.values() if portal is None or k.portal == portal]

    def authenticate(self, portal: str, presented: str | None, now: float) -> ApiKey:
        """The key ``presented`` on ``portal``.

        Raises:
            Unauthorized: no key, not a key, unknown, wrong, revoked, expired, or a key of
                another portal. The message never repeats the key; it names the key id
                only to someone who holds the key.
        """
        if not presented:
            raise Unauthorized("this portal needs an API key: send 'Authorization: Bearer <key>'")
        key_id = key_id_of(presented)
        key = self._by_id.get(key_id) if key_id is not None else None
        if key is None or not key.matches(presented):
            raise Unauthorized("invalid API key")
        if key.portal != portal:
            raise Unauthorized(f"key {key.key_id} is not valid on this portal")
        state = key.state(now)
        if state != "active":
            raise Unauthorized(f"key {key.key_id} is {state}")
        return key
