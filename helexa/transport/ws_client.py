"""The websocket client a neuron dials its cortex with: a thin trio shell around the sans-IO
upgrade (:mod:`.wsupgrade`); the upgraded connection is a :class:`.ws_channel.ClientChannel`.

It replaced trio-websocket on the neuron: that client's reader task and memory channel
(three task wake-ups per frame received), its send lock and wsproto's general framing were
the largest part of a neuron's transport cost per request (docs/benchmarks.md, issue 17).
Here ``receive()`` parses frames in the caller's task, and the frames sent in one
scheduler tick leave in one write (:mod:`.ws_channel`).

``ws://`` is dialled on a plain socket read and written directly; ``wss://`` through
trio's ``SSLStream``, optionally with the server's certificate pinned. Addresses of a host
name are tried one after another within the deadline (no happy eyeballs: a cortex has one
address in practice).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio

from helexa.protocol import DEFAULT_MAX_FRAME
from helexa.protocol.auth import cert_fingerprint

from . import wsframes, wsupgrade
from .channel import ConnectFailed
from .dial import dial
from .ws_channel import ClientChannel, read_head

__all__ = ["connect", "handshake"]


@asynccontextmanager
async def connect(
    url: str,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    pin: str | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[ClientChannel]:
    """Open a channel to ``url`` (``ws://`` or ``wss://``); closed (1000) on leaving.

    With ``pin`` (a ``wss://`` URL), the server's certificate must have that SHA-256
    (:func:`helexa.protocol.auth.cert_fingerprint`); it is checked right after the TLS
    handshake, before a byte of the websocket upgrade is sent, and ``ssl_context`` need not
    verify anything itself.

    Raises:
        ConnectFailed: refused, unreachable, TLS failure, a certificate that does not match
            ``pin``, an answer other than the upgrade (a busy cortex's ``503``), or no
            upgrade within ``timeout`` (the whole of it: address, TCP, TLS and upgrade).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ConnectFailed(f"unsupported URL scheme {parts.scheme!r} in {url!r} (use ws:// or wss://)")
    tls = parts.scheme == "wss"
    if pin is not None and not tls:
        raise ConnectFailed(f"a certificate pin needs a wss:// URL, got {url!r}")
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with trio.fail_after(timeout):
            raw = await dial(host, port)
            wire: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
            try:
                if tls:
                    wire = await _tls(wire, host, ssl_context, pin)
                channel = await handshake(wire, host=host_header, resource=resource, max_frame=max_frame,
                                          remote=url, raw=None if tls else raw)
            except BaseException:
                await trio.aclose_forcefully(wire)
                raise
    except trio.TooSlowError:
        raise ConnectFailed(f"cannot connect to {url}: no handshake within {timeout:g}s") from None
    except wsupgrade.UpgradeRejected as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc.reason}") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc or type(exc).__name__}") from None
    try:
        yield channel
    finally:
        await channel.aclose()


async def handshake(stream: trio.abc.Stream, *, host: str, resource: str = "/", max_frame: int = DEFAULT_MAX_FRAME,
                    remote: str = "?", raw: socket.socket | None = None) -> ClientChannel:
    """Upgrade an open connection (the caller holds the deadline) and return its channel.

    ``raw`` is the plain socket under ``stream``, when there is no TLS between them.

    Raises:
        wsupgrade.UpgradeRejected: the server answered something else than the upgrade.
        trio.BrokenResourceError: the server closed before answering.
        OSError: the connection failed.
    """
    key = wsupgrade.new_key()
    await stream.send_all(wsupgrade.request(host, resource, key))
    read = await read_head(stream)
    if read is None:
        raise trio.BrokenResourceError("the server closed the connection before answering the upgrade")
    head, rest = read
    wsupgrade.check_answer(head, key)
    conn = wsframes.ClientConnection(max_frame + 64)  # the frame budget bounds a message too
    conn.receive_data(rest)
    return ClientChannel(stream, conn, max_frame=max_frame, remote=remote, raw=raw, eager_read=True)


async def _tls(stream: trio.SocketStream, host: str, ssl_context: ssl.SSLContext | None,
               pin: str | None) -> trio.SSLStream[trio.SocketStream]:
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
        if pin is not None:  # the pin is the check: a self-signed certificate is expected
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
    wire = trio.SSLStream(stream, ssl_context, server_hostname=host, https_compatible=True)
    await wire.do_handshake()
    if pin is not None:
        seen = cert_fingerprint(wire.getpeercert(binary_form=True) or b"")
        if seen != pin:
            raise OSError(f"its certificate (sha256 {seen[:16]}...) is not the one the join token pins "
                          f"(sha256 {pin[:16]}...)")
    return wire
