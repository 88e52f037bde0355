"""The gateway's lean HTTP/1.1 server: a sans-IO connection (:mod:`.connection`, with its
request parser :mod:`.parser`) inside a thin trio shell (:mod:`.server`), as hypercorn
splits ``protocol/h11.py`` from ``trio/tcp_server.py``.

Why it exists beside hypercorn, and what it measured, is in ``docs/benchmarks.md`` ("The
gateway's lean HTTP server").
"""

from .connection import Connection, ErrorBody, plain_error
from .errors import ClientGone, LocalProtocolError, RemoteProtocolError
from .events import CLOSED, NEED_DATA, PAUSED, Data, Request
from .exchange import BODY_EXTENSION, CANCEL_EXTENSION
from .server import App, HttpServer
from .states import TRANSITIONS, Role, State, Trigger

__all__ = [
    "App", "BODY_EXTENSION", "CANCEL_EXTENSION", "CLOSED", "ClientGone", "Connection", "Data", "ErrorBody",
    "HttpServer", "LocalProtocolError",
    "NEED_DATA", "PAUSED", "RemoteProtocolError", "Request", "Role", "State", "TRANSITIONS", "Trigger",
    "plain_error",
]
