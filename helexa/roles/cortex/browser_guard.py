"""Browsers' requests from other sites, and DNS rebinding, refused at the edge.

A web page the operator visits can make their browser send requests to the gateway: a
``POST`` with ``text/plain`` is a CORS "simple request", sent without a preflight, so it
would run inference on the operator's machine; and a page on an attacker's domain that
re-resolves to ``127.0.0.1`` (DNS rebinding) is same-origin with itself and could read the
answers. So, before any work (:meth:`BrowserGuard.check`, on every socket):

* a request whose ``Origin`` is neither the request's own origin (``Origin`` names the
  ``Host`` it was sent to) nor in ``gateway.allowed_origins`` is refused (403,
  ``origin_not_allowed``). Requests without ``Origin`` (the SDKs, curl, a browser's own
  navigation to a page) are not affected; the console and the portal's pages are same-origin.
* on a socket bound to loopback, a ``Host`` that is neither a loopback name or address
  (``localhost``, ``127.x.x.x``, ``[::1]``) nor in ``gateway.allowed_hosts`` is refused (403,
  ``host_not_allowed``): a rebinding page's requests carry its own domain as ``Host``.
  Sockets on other addresses are not restricted by ``Host`` unless ``allowed_hosts`` is set.

An origin in ``allowed_origins`` is a browser app the operator lets in: its requests get
``Access-Control-Allow-Origin`` and its preflights (``OPTIONS``) are answered.

The common request (no ``Origin``, a ``Host`` seen before) costs one pass over the headers
and a set lookup; no parsing, no regular expression.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .errors import Forbidden

_SEEN_MAX = 256
"""Distinct accepted ``Host`` values remembered (so that each is parsed once)."""

PREFLIGHT_MAX_AGE = b"600"


class OriginNotAllowed(Forbidden):
    code = "origin_not_allowed"


class HostNotAllowed(Forbidden):
    code = "host_not_allowed"


def host_name(host: bytes) -> str:
    """The name in a ``Host`` header, without its port, lower case (``[::1]:8080`` -> ``::1``)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text[1:]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def is_loopback_name(name: str) -> bool:
    """``localhost`` (and ``*.localhost``, which browsers resolve to loopback), 127/8, ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normal_origin(origin: str) -> str:
    """``Origin`` as a browser sends it: lower case, no trailing ``/``."""
    return origin.strip().rstrip("/").lower()


class BrowserGuard:
    """The checks of one listening socket (see the module docstring).

    Args:
        allowed_origins: origins (``https://app.example``) allowed cross-origin; ``*``: any.
        allowed_hosts: ``Host`` names (without port) allowed besides loopback ones; ``*``: any.
        loopback: the socket binds loopback only (then ``Host`` is checked).
    """

    __slots__ = ("_origins", "_any_origin", "_hosts", "_any_host", "_check_host", "_seen")

    def __init__(self, allowed_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = (), *,
                 loopback: bool) -> None:
        origins = {normal_origin(o) for o in allowed_origins}
        self._any_origin = "*" in origins
        self._origins = frozenset(o.encode("latin-1") for o in origins if o != "*")
        hosts = {h.strip().lower().strip("[]") for h in allowed_hosts}
        self._any_host = "*" in hosts
        self._hosts = frozenset(hosts - {"*"})
        self._check_host = (loopback or bool(self._hosts)) and not self._any_host
        self._seen: set[bytes] = set()

    def check(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """Raises :class:`HostNotAllowed` or :class:`OriginNotAllowed`; returns the ``Origin``
        when it is another origin the operator allowed (its answers need CORS headers), else None."""
        origin = host = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if self._check_host and host is not None and host not in self._seen:
            self._admit_host(host)
        if origin is None:
            return None
        if host is not None and origin.endswith(host) and origin[:-len(host)] in (b"http://", b"https://"):
            return None  # same origin: the console, a portal's own pages
        if self._any_origin or origin.lower() in self._origins:
            return origin
        raise OriginNotAllowed(f"requests from the web page at {origin.decode('latin-1')[:200]!r} are not allowed "
                               f"here (the operator may add it to gateway.allowed_origins)")

    def _admit_host(self, host: bytes) -> None:
        name = host_name(host)
        if not (is_loopback_name(name) or name in self._hosts):
            raise HostNotAllowed(f"the host {name[:200]!r} is not served here (the operator may add it to "
                                 f"gateway.allowed_hosts)")
        if len(self._seen) < _SEEN_MAX:
            self._seen.add(host)


def cors_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of every answer to an allowed other origin."""
    return [(b"access-control-allow-origin", origin), (b"vary", b"origin"),
            (b"access-control-expose-headers", b"x-request-id, retry-after, x-ratelimit-limit-requests, "
                                               b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests")]


def preflight_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An answer to an allowed origin's preflight: the methods, and the headers it asked for."""
    asked = next((v for k, v in headers if k == b"access-control-request-headers"), b"")
    out = [(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
           (b"access-control-max-age", PREFLIGHT_MAX_AGE), (b"content-length", b"0")]
    if asked:
        out.append((b"access-control-allow-headers", asked[:1024]))
    return out
