"""Both sides of a websocket opening handshake (RFC 6455 section 4), sans-IO.

The server's: :func:`parse_upgrade` reads a request head (the bytes up to and including
the blank line) and returns the client's key, or raises :class:`UpgradeRejected` with the
HTTP status to answer; :func:`accept` and :func:`reject` render the answers. The client's:
:func:`request` renders the upgrade request, :func:`check_answer` reads the server's head. No extension and no
subprotocol is ever agreed (the control plane uses neither), so the answer has no
``Sec-WebSocket-Extensions``: a client that offered permessage-deflate gets plain frames,
as the RFC allows.
"""

from __future__ import annotations

import base64
import hashlib
import os
from http import HTTPStatus

MAX_HEAD = 16 * 1024
"""The longest request head read; a longer one is answered 431."""

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class UpgradeRejected(Exception):
    """The request is not a websocket upgrade this server takes: answer ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def head_end(buf: bytes) -> int:
    """The index just past the head's blank line in ``buf``, or -1 while it has not come.

    Raises:
        UpgradeRejected: 431 when no blank line came within :data:`MAX_HEAD` bytes.
    """
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        if len(buf) > MAX_HEAD:
            raise UpgradeRejected(431, "request head too long")
        return -1
    return i + 4


def parse_upgrade(head: bytes) -> str:
    """The ``Sec-WebSocket-Key`` of a valid upgrade request head.

    Raises:
        UpgradeRejected: 400 for a malformed request or upgrade, 405 for a method other
            than GET, 426 (with the version we speak) for a websocket version other than 13.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise UpgradeRejected(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise UpgradeRejected(400, "malformed request line")
    if parts[0] != "GET":
        raise UpgradeRejected(405, "a websocket upgrade is a GET")
    if parts[2] == "HTTP/1.0":
        raise UpgradeRejected(400, "a websocket upgrade needs HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise UpgradeRejected(400, "malformed header line")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "host" not in headers:
        raise UpgradeRejected(400, "no Host header")
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise UpgradeRejected(400, "not a websocket upgrade (Upgrade: websocket)")
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise UpgradeRejected(400, "not a websocket upgrade (Connection: Upgrade)")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise UpgradeRejected(426, "websocket version 13 only")
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise UpgradeRejected(400, "a Sec-WebSocket-Key must be 16 bytes in base64") from None
    return key


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def _accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def accept(key: str) -> bytes:
    """The ``101 Switching Protocols`` answer to the request that sent ``key``."""
    digest = _accept_value(key)
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {digest}\r\n\r\n").encode()


def reject(status: int, reason: str = "", *, retry_after: float | None = None) -> bytes:
    """A plain HTTP answer that refuses the upgrade and closes the connection.

    ``retry_after`` adds ``Retry-After`` (a neuron's client fails its connect at once on
    any non-101 answer and redials on its own backoff)."""
    phrase = HTTPStatus(status).phrase
    body = (reason + "\n").encode() if reason else b""
    extra = "Sec-WebSocket-Version: 13\r\n" if status == 426 else ""
    if retry_after is not None:
        extra += f"Retry-After: {retry_after:.0f}\r\n"
    return (f"HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


# --- the client's side -----------------------------------------------------------------------


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key`` (16 random bytes in base64)."""
    return base64.b64encode(os.urandom(16)).decode()


def request(host: str, resource: str, key: str) -> bytes:
    """The upgrade request for ``resource`` on ``host`` (``host[:port]``, as the Host header)."""
    return (f"GET {resource} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def check_answer(head: bytes, key: str) -> None:
    """Accept the server's answer head to the request that sent ``key``.

    Raises:
        UpgradeRejected: with the answer's status: anything but ``101``, or a ``101`` without
            the upgrade headers or with a ``Sec-WebSocket-Accept`` not made from ``key``
            (reason: the status line, plus ``Retry-After`` when the server gave one).
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpgradeRejected(0, f"not an HTTP answer: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if status != 101:
        retry = f" (Retry-After: {headers['retry-after']})" if "retry-after" in headers else ""
        raise UpgradeRejected(status, f"the server answered {lines[0][:80]}{retry}")
    if "websocket" not in _tokens(headers.get("upgrade", "")) or "upgrade" not in _tokens(headers.get("connection", "")):
        raise UpgradeRejected(status, "a 101 answer without Upgrade: websocket and Connection: Upgrade")
    if headers.get("sec-websocket-accept") != _accept_value(key):
        raise UpgradeRejected(status, "a 101 answer with the wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions"):
        raise UpgradeRejected(status, "the server agreed an extension the client did not offer")
