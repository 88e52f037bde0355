"""The console's sessions: what the login cookie stands for, kept in memory.

A session starts when someone presents the operator's admin token on the login page. The
browser gets a random secret in an HTTP-only, ``SameSite=Strict`` cookie; the cortex keeps
only the secret's SHA-256 (a leaked process dump or log holds nothing to replay), the
session's CSRF token (sent back in every form and every ``fetch``), when it ends, and a
hash of the admin token it was opened with, so rotating the token
(``helexa admin-token --rotate``) ends every session at once. A restart ends them too.
A key just created or rotated waits in its session for the one page that shows it, a minute
at most (:meth:`Session.keep_for_showing`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COOKIE = "helexa_console"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


SHOW_FOR = 60.0
"""Seconds a new key waits in its session for the page that shows it (see :meth:`Session.hand_over`)."""


@dataclass(slots=True)
class Session:
    csrf: str
    expires_at: float
    token_digest: bytes
    _new_key: tuple[float, dict[str, Any]] | None = None

    def keep_for_showing(self, created: dict[str, Any], now: float) -> None:
        """Hold a key just created or rotated for the page the browser is sent to next (a
        redirect after the POST, so reloading that page cannot create or rotate again)."""
        self._new_key = (now + SHOW_FOR, created)

    def hand_over(self, now: float) -> dict[str, Any] | None:
        """The key held by :meth:`keep_for_showing`, once: gone from memory after this call,
        or after :data:`SHOW_FOR` seconds if no page came for it."""
        held, self._new_key = self._new_key, None
        return held[1] if held is not None and held[0] > now else None

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf.encode(), presented.encode())


class Sessions:
    """Open console sessions, by the SHA-256 of their cookie's secret.

    Args:
        ttl: seconds a session lasts from its login.
        limit: sessions kept at most (the oldest go first).
        clock: Unix time.
    """

    def __init__(self, *, ttl: float = 12 * 3600, limit: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._by_digest: dict[bytes, Session] = {}

    def open(self, admin_token: str) -> tuple[str, Session]:
        """A new session for someone who presented ``admin_token``: ``(cookie secret, session)``."""
        now = self.clock()
        for digest, s in list(self._by_digest.items()):
            if s.expires_at <= now:
                del self._by_digest[digest]
        while len(self._by_digest) >= self.limit:
            del self._by_digest[next(iter(self._by_digest))]
        secret = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(24), now + self.ttl, _digest(admin_token))
        self._by_digest[_digest(secret)] = session
        return secret, session

    def find(self, secret: str | None, admin_token: str | None) -> Session | None:
        """The live session of a cookie's ``secret``, if it was opened with the current
        ``admin_token`` (None: no admin token, so no session holds)."""
        if not secret or not admin_token:
            return None
        digest = _digest(secret)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        if session.expires_at <= self.clock() or not hmac.compare_digest(session.token_digest, _digest(admin_token)):
            del self._by_digest[digest]
            return None
        return session

    def close(self, secret: str | None) -> None:
        if secret:
            self._by_digest.pop(_digest(secret), None)

    def __len__(self) -> int:
        return len(self._by_digest)
