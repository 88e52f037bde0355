"""Dialling a TCP connection with no more than a connect costs.

Used by the neuron's websocket client and by the runtime's upstream HTTP client, whose
pool also begins connects ahead with :func:`connecting`. Not ``trio.open_tcp_stream``:
its happy-eyeballs nursery and the stream object around the socket cost ~0.3 ms a connect
on this project's reference machine, and llama.cpp's server closes its connection after
every streamed answer, so for the proxy path a connect is on the way of every first token
(docs/benchmarks.md, "The first token's milliseconds, 2026-11-30 evening").
"""

from __future__ import annotations

import errno
import os
import socket

import trio

__all__ = ["connecting", "dial"]


def connecting(family: int, address: object, kind: int = socket.SOCK_STREAM,
               proto: int = 0) -> tuple[socket.socket, bool]:
    """A non-blocking TCP socket, ``TCP_NODELAY`` set, whose connect to ``address`` has
    begun: the socket, and whether its connect is over already. Nothing waits.

    Raises:
        OSError: the connect could not begin (the socket is closed).
    """
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        # Requests and frames are written whole; Nagle would only hold a write's last
        # segment for the peer's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)  # type: ignore[arg-type]
    except BaseException:
        sock.close()
        raise
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, f"{os.strerror(err)} ({errno.errorcode.get(err, err)})")
    return sock, err == 0


async def dial(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket, ``TCP_NODELAY`` set, to the first address of
    ``host`` that answers. The caller holds the deadline.

    Raises:
        OSError: no address, or every address refused or failed.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _, address in infos:
        try:
            sock, done = connecting(family, address, kind, proto)
        except OSError as exc:
            failure = exc
            continue
        try:
            if not done:
                await trio.lowlevel.wait_writable(sock)
                if err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(err, f"{os.strerror(err)} ({errno.errorcode.get(err, err)})") from None
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
        except BaseException:
            sock.close()
            raise
    raise failure
