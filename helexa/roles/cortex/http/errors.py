"""What the HTTP package raises.

Exception tree::

    OSError
    └── ClientGone              the app sent to a client that went away (ASGI asks for
                                an OSError here); the gateway re-exports it
    RemoteProtocolError         the client broke HTTP/1.1: answered with ``status``
    RuntimeError
    └── LocalProtocolError      the app broke ASGI (a second response start, a body
                                before the start, a line break in a header): a bug

:class:`RemoteProtocolError` never leaves the package: the connection turns it into the
response it names (400, 431, 501, 505) and closes.
"""

from __future__ import annotations


class ClientGone(OSError):
    """The client went away (closed its socket, reset it, or stopped reading) while the
    app still had something to send it: nobody is left to answer."""

    code = "client_gone"


class RemoteProtocolError(Exception):
    """The client sent something that is not HTTP/1.1 as this server accepts it.

    Args:
        message: what was wrong, for the response body and the log.
        status: the status of the response that says so (400 unless a more precise
            one applies: 431 for a head that is too large, 501 for a transfer coding
            other than chunked, 505 for an HTTP version other than 1.0 and 1.1).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class LocalProtocolError(RuntimeError):
    """The app used ``send`` out of order or with a header that cannot go on the wire."""
