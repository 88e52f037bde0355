"""One HTTP/1.1 server connection as a state machine: bytes and timer events in, request
events and bytes to write out. No sockets, no trio, no clock (:mod:`.server` is the shell
that moves the bytes).

The states of both sides are written in one table, :data:`.states.TRANSITIONS`, as h11's
``_state.py`` does: the client side follows what the client sent, the server side what
the app answered. Every change of state is one :class:`.Trigger` looked up there; a
trigger the table does not allow in the current state is a bug (:class:`.LocalProtocolError`).
Three values live beside the table: ``keep_alive`` (whether this connection may serve
another request: the client's wish, the request limit, a stopping server, the response's
framing), the one deadline the shell must wait by, and the bytes waiting to be written.

What it owns:

* keep-alive and pipelining (a request sent behind the current one waits in the buffer:
  :data:`.PAUSED`), ``Connection: close``, HTTP/1.0 (no keep-alive; a streamed response
  ends when the connection does), a limit of requests per connection;
* request bodies by ``Content-Length`` or chunked, ``Expect: 100-continue`` (answered
  when the app first waits for a body that has not come), a body the app left unread
  (skipped if it is all here, else the connection closes);
* the answers it makes itself: 400/431/501/505 for a malformed head, a 400 after a body
  that was malformed, a 408 after one that did not arrive in time, a 500 for an app that returned (or failed)
  before answering, each rendered by the ``error_body`` the gateway supplies; after a
  response head went out, a failed app only closes the connection;
* deadlines, as timer events: an idle keep-alive connection is closed after
  ``keep_alive_timeout``, a head must arrive whole within ``read_timeout`` of its first
  byte, each part of a body within ``read_timeout`` of the wait for it;
* response framing, by hand (h11's response events and header validation were a measured
  share of the cortex's CPU per request: ``docs/benchmarks.md``): ``Content-Length`` for a
  response sent in one piece,
  chunked for a streamed one, close-delimited for an HTTP/1.0 client, no body for HEAD,
  204 and 304.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from .errors import ClientGone, LocalProtocolError, RemoteProtocolError
from .events import CLOSED, NEED_DATA, PAUSED, Data, Request, Sentinel
from .parser import LOWER, ChunkedBody, LengthBody, find_head_end, parse_head
from .states import MOVES, State, Trigger

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES = {status: b"HTTP/1.1 %d %b\r\n" % (status, reason) for status, reason in _REASONS.items()}

ErrorBody = Callable[[int, str, bytes], tuple[bytes, bytes]]
"""``(status, message, target) -> (content type, body)`` of a response the server makes
itself; ``target``: the request's (``b""`` when its head was not read), so that the answer
can take the shape of the API the path is under."""


def plain_error(status: int, message: str, target: bytes = b"") -> tuple[bytes, bytes]:
    """The default :data:`ErrorBody`: one line of text."""
    return b"text/plain; charset=utf-8", f"{status} {_REASONS.get(status, b'').decode()}: {message}\n".encode()


_RESPONDING = frozenset({State.SEND_RESPONSE, State.HEAD_HELD, State.SEND_BODY})
_NO_BODY = frozenset({204, 304})
_RAW, _CHUNKED, _NONE = range(3)  # how response body bytes go on the wire


class Connection:
    """The server side of one HTTP/1.1 connection (see the module docstring).

    Args:
        keep_alive_timeout: seconds an idle connection waits for its next request.
        read_timeout: seconds a head may take from its first byte, and a client may take
            to send the next part of a body the app waits for.
        max_requests: requests served before the connection closes.
        max_head_bytes: the largest request head (and chunked trailer) accepted.
        error_body: renders the responses the server makes itself.
        date: returns the value of the ``Date`` header for now (the shell's clock: this
            object reads none); without it responses carry no ``Date``.

    Every method is synchronous and does no I/O. Methods that take ``now`` (any
    monotonic clock) use it only to set :attr:`deadline`.
    """

    def __init__(self, *, keep_alive_timeout: float = 75.0, read_timeout: float = 30.0,
                 max_requests: int = 100_000, max_head_bytes: int = 65536,
                 error_body: ErrorBody = plain_error, date: Callable[[], bytes] | None = None) -> None:
        self.keep_alive_timeout = keep_alive_timeout
        self.read_timeout = read_timeout
        self.max_requests = max_requests
        self.max_head_bytes = max_head_bytes
        self.error_body = error_body
        self.date = date
        self.client_state = State.IDLE
        self.server_state = State.IDLE
        self.keep_alive = True
        """Whether the connection may serve another request after this one."""
        self.served = 0
        """Requests handed out so far."""
        self.deadline: float | None = None
        """When :meth:`timeout` is due if no bytes arrive first (``None``: no wait)."""
        self._buf = b""
        self._scan = 0  # where the search for the end of the head resumes
        self.out = b""
        """The bytes waiting to be written (read-only: :meth:`data_to_send` takes them; a
        shell may look here first rather than call it for nothing)."""
        # the current exchange
        self._body: LengthBody | ChunkedBody | None = None
        self._expect_continue = False
        self._http11 = True
        self._head_request = False
        self._target = b""  # the current request's target, for the answers made here
        self._error: tuple[int, str] | None = None  # the 400 owed for a bad body
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing = _RAW

    # --- reading --------------------------------------------------------------------------

    @property
    def exchange_open(self) -> bool:
        """The request was read, the client is still there and the response is not complete:
        until this turns false, ``http.disconnect`` is not due."""
        return self.client_state is State.DONE and self.server_state in _RESPONDING

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the client; ``b""`` means it closed its side (or the read
        failed). Bytes from a client already closed or in error are dropped."""
        state = self.client_state
        if state is State.CLOSED or state is State.ERROR:
            return
        if not data:
            self._fire(Trigger.EOF)
            self.deadline = None
            if self.server_state is State.IDLE:
                self._close()
            return
        self._buf = self._buf + data if self._buf else data
        if state is State.IDLE:
            self._fire(Trigger.BYTES)
            self.deadline = now + self.read_timeout
        elif state is State.BODY:
            self.deadline = None

    def next_event(self, now: float) -> Request | Data | Sentinel:
        """The next thing the client said, or what to do before asking again.

        Returns:
            :class:`.Request` (the app is to answer it), :class:`.Data` (a part of its
            body), :data:`.NEED_DATA` (read, no later than :attr:`deadline`),
            :data:`.PAUSED` (end the exchange first) or :data:`.CLOSED`. Bytes may be
            waiting in :meth:`data_to_send` afterwards (``100 Continue``, an error answer).
        """
        state = self.client_state
        if state is State.BODY:
            return self._next_body(now)
        if state is State.IDLE or state is State.HEAD:
            return self._next_head(now)
        if state is State.DONE:
            return PAUSED
        return CLOSED

    def _next_head(self, now: float) -> Request | Sentinel:
        buf = self._buf
        if self.client_state is State.IDLE:
            if not buf:
                if self.deadline is None:
                    self.deadline = now + self.keep_alive_timeout
                return NEED_DATA
            self._fire(Trigger.BYTES)  # a pipelined head, already here
            self.deadline = now + self.read_timeout
        try:
            end = find_head_end(buf, self._scan)
            if end < 0 and len(buf) <= self.max_head_bytes:
                self._scan = len(buf) - 2
                return NEED_DATA
            if end < 0 or end > self.max_head_bytes:
                raise RemoteProtocolError(f"the request head is over {self.max_head_bytes} bytes", 431)
            request, length, keep_alive, expect_continue = parse_head(buf[:end])
        except RemoteProtocolError as exc:
            self._fire(Trigger.MALFORMED)
            self._emit(self._error_response(exc.status, f"malformed HTTP request: {exc.message}"))
            self._close()
            return CLOSED
        self._buf = buf[end:]
        self._scan = 0
        self.deadline = None
        self._fire(Trigger.REQUEST)
        self.served += 1
        self.keep_alive = self.keep_alive and keep_alive and self.served < self.max_requests
        self._body = LengthBody(length) if length is not None else ChunkedBody(self.max_head_bytes)
        self._expect_continue = expect_continue
        self._http11 = request.http_version == b"1.1"
        self._head_request = request.method == b"HEAD"
        self._target = request.target
        return request

    def _next_body(self, now: float) -> Data | Sentinel:
        assert self._body is not None
        try:
            data, used, done = self._body.feed(self._buf)
        except RemoteProtocolError as exc:
            self._fire(Trigger.MALFORMED)
            self._error = (exc.status, f"malformed HTTP request: {exc.message}")
            self.deadline = None
            return CLOSED
        if used:
            self._buf = self._buf[used:]
        if done:
            self._body_ended()
            return Data(data, False)
        if data:
            self._fire(Trigger.DATA)
            self._expect_continue = False
            return Data(data, True)
        if self._expect_continue and (self.server_state is State.SEND_RESPONSE or self.server_state is State.HEAD_HELD):
            self._expect_continue = False
            self._emit(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.deadline is None:
            self.deadline = now + self.read_timeout
        return NEED_DATA

    def whole_body(self) -> bytes | None:
        """The current request's body when all of it is already buffered and framed by
        ``Content-Length`` (a body sent with its head: the common case), handed out as
        :meth:`next_event` would hand out its one :class:`.Data`; otherwise ``None``, and
        nothing changes (no ``100 Continue`` is owed yet, no deadline is set)."""
        body = self._body
        if self.client_state is not State.BODY or type(body) is not LengthBody or len(self._buf) < body.remaining:
            return None
        # What _next_body does for a body that is all here, without a Data event to unwrap.
        data, used, done = body.feed(self._buf)
        assert done
        if used:
            self._buf = self._buf[used:]
        self._body_ended()
        return data

    def _body_ended(self) -> None:
        self._fire(Trigger.BODY_END)
        self.deadline = None
        self._expect_continue = False

    def timeout(self, now: float) -> None:
        """The shell's timer fired: act on :attr:`deadline` if it has passed (an early or
        stale call does nothing). An idle connection and an unfinished head close without
        a word; a body that stopped arriving ends the body (:data:`.CLOSED`) and is
        answered with a 408 once the app returns (and the connection closes)."""
        if self.deadline is None or now < self.deadline:
            return
        self.deadline = None
        state = self.client_state
        self._fire(Trigger.TIMEOUT)
        if state is State.BODY:
            self._error = (408, f"the body did not arrive within {self.read_timeout:g}s")
        else:
            self._close()

    # --- answering ------------------------------------------------------------------------

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The app's ``http.response.start``: held until the first body part, so that a
        response sent whole gets a ``Content-Length`` and goes out in one write.

        Raises:
            LocalProtocolError: a response was already started, or there is no request.
        """
        if self.server_state is not State.SEND_RESPONSE:
            raise LocalProtocolError("http.response.start sent twice" if self.server_state in _RESPONDING
                                     or self.server_state is State.DONE else "no request to answer")
        self._fire(Trigger.START)
        self._status = status
        self._headers = headers

    def send_body(self, body: bytes, more: bool) -> None:
        """The app's ``http.response.body``; its bytes wait in :meth:`data_to_send`.

        Raises:
            LocalProtocolError: no response was started, or it already ended, or a
                header holds a line break.
            ClientGone: the client went away, or its request failed (its 400 follows).
        """
        state = self.server_state
        if state is State.HEAD_HELD:
            client = self.client_state
            if client is State.CLOSED or client is State.ERROR:
                raise ClientGone("the client closed the connection")
            data = self._head(len(body), more)
        elif state is State.SEND_BODY:
            client = self.client_state
            if client is State.CLOSED or client is State.ERROR:
                raise ClientGone("the client closed the connection")
            data = b""
        elif state is State.SEND_RESPONSE:
            raise LocalProtocolError("http.response.body before http.response.start")
        else:
            raise LocalProtocolError("http.response.body after the response ended")
        framing = self._framing
        if body and framing != _NONE:
            data += b"%x\r\n%b\r\n" % (len(body), body) if framing == _CHUNKED else body
        if more:
            self._fire(Trigger.BODY_PART)
        else:
            if framing == _CHUNKED:
                data += b"0\r\n\r\n"
            self._fire(Trigger.RESPONSE_END)
        if data:
            self._emit(data)

    def _head(self, length: int, more: bool) -> bytes:
        # Built by concatenation, names lowered through LOWER, the status line looked up:
        # no method call per header line (docs/benchmarks.md, issue 17 item 2).
        status = self._status
        try:
            head = _STATUS_LINES[status]
        except KeyError:
            head = b"HTTP/1.1 %d \r\n" % status
        has_length = False
        for name, value in self._headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise LocalProtocolError(f"header {name!r} holds a line break")
            lowered = LOWER[name]
            if lowered == b"content-length":
                has_length = True
            elif lowered == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue  # the server says whether the connection stays
            head += b"%b: %b\r\n" % (name, value)
        bodyless = self._head_request or status in _NO_BODY
        self._framing = _NONE if bodyless else _RAW
        if not has_length and status not in _NO_BODY:
            if not more:
                head += b"content-length: %d\r\n" % length
            elif self._http11:
                head += b"transfer-encoding: chunked\r\n"
                if not bodyless:
                    self._framing = _CHUNKED
            else:
                self.keep_alive = False  # an HTTP/1.0 stream ends when the connection does
        if not self.keep_alive:
            head += b"connection: close\r\n"
        self._expect_continue = False
        return head + (b"\r\n" if self.date is None else b"date: %b\r\n\r\n" % self.date())

    def send_failed(self) -> None:
        """A write to the client failed: it is gone (the app's next send raises
        :class:`.ClientGone`, ``receive()`` says ``http.disconnect``)."""
        self.keep_alive = False
        if self.client_state is State.BODY or self.client_state is State.DONE:
            self._fire(Trigger.EOF)

    def app_returned(self, failed: bool = False) -> None:
        """The app returned (``failed``: it raised) for the current request: answer for it
        if it did not, then start the next cycle or close. Afterwards :meth:`next_event`
        hands out a pipelined request, if any."""
        state = self.server_state
        if state is State.SEND_RESPONSE or state is State.HEAD_HELD:
            if self.client_state is not State.CLOSED:
                status, message = self._error or (500, "internal error" if failed else "the app sent no response")
                self._emit(self._error_response(status, message))
                self._fire(Trigger.FALLBACK)
            self.keep_alive = False
        elif state is State.SEND_BODY:
            self.keep_alive = False  # cut short: the client must not take it for whole
        if self.client_state is State.BODY:  # a body the app did not read: skip it if it is all here
            assert self._body is not None
            try:
                _, used, done = self._body.feed(self._buf)
            except RemoteProtocolError:
                done = False
            if done:
                self._buf = self._buf[used:]
                self._fire(Trigger.BODY_END)
        if self.keep_alive and self.client_state is State.DONE and self.server_state is State.DONE:
            self._fire(Trigger.NEXT_CYCLE)
            self.deadline = None
            self._body = None
            self._error = None
            self._expect_continue = False
            self._target = b""  # a malformed next head is no request of that path
        else:
            self._close()

    def shutdown(self) -> bool:
        """The server is stopping: close now if no request is in progress, else after the
        current response (which says ``Connection: close`` if its head has not gone out).

        Returns:
            Whether the connection is closed now.
        """
        self.keep_alive = False
        if self.server_state is State.IDLE:
            self._close()
        return self.server_state is State.CLOSED

    def data_to_send(self) -> bytes:
        """The bytes to write to the client now (taken: a second call returns ``b""``)."""
        out, self.out = self.out, b""
        return out

    # --- the table ------------------------------------------------------------------------

    def _fire(self, trigger: Trigger) -> None:
        # Subscripts rather than ``.get``: six triggers per request, and a method call is a
        # Python call where a subscript is not (docs/benchmarks.md, issue 17 item 2).
        client, server = MOVES[trigger]
        if client is not None:
            try:
                self.client_state = client[self.client_state]
            except KeyError:
                raise LocalProtocolError(
                    f"{trigger.name} is not allowed with the client in {self.client_state.name}") from None
        if server is not None:
            try:
                self.server_state = server[self.server_state]
            except KeyError:
                raise LocalProtocolError(
                    f"{trigger.name} is not allowed with the server in {self.server_state.name}") from None

    def _close(self) -> None:
        if self.server_state is not State.CLOSED:
            self._fire(Trigger.CLOSE)
        self.keep_alive = False
        self.deadline = None

    def _emit(self, data: bytes) -> None:
        self.out = self.out + data if self.out else data

    def _error_response(self, status: int, message: str) -> bytes:
        content_type, body = self.error_body(status, message, self._target)
        date = b"" if self.date is None else b"date: %b\r\n" % self.date()
        return b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\nconnection: close\r\n%b\r\n%b" % (
            status, _REASONS.get(status, b""), content_type, len(body), date, body)
