"""HTTP/1.1 for a client, sans-IO: request bytes out, response framing in.

No networking here (see :mod:`helexa.runtime.upstream` for the trio shell). A
:class:`ResponseReader` is fed the bytes a connection receives and hands back one
response's head, then its body as it arrives, decoded from whichever framing the server
chose (``content-length``, ``chunked``, or until the connection closes).

Why not h11, which the gateway's server uses: on the proxy path the neuron reads a
streamed answer whose every token is one HTTP chunk, and h11 builds an event object and
runs its state machine per chunk; slicing chunks out of a buffer with ``bytes.find`` costs
a fraction of that (figures in docs/benchmarks.md). The framing stays strict all the same,
in the spirit of RFC 9112: CRLF line ends, no obs-fold, header names that are tokens,
one ``content-length`` (or equal copies), ``transfer-encoding`` only ``chunked`` and never
beside a ``content-length``, hexadecimal chunk sizes, a CRLF after every chunk, bounded
head and chunk-line sizes. Anything else raises :class:`ProtocolError`, and the
connection must not be used again.

States of a reader (one table, the only place they change)::

    HEAD ──head──▶ LENGTH ─────────────────────────────────▶ DONE ──start()──▶ HEAD
      │              (content-length bytes)                   ▲
      ├──head──▶ CHUNK_SIZE ─▶ CHUNK_DATA ─▶ CHUNK_END ─┐      │
      │              ▲  │ size 0                      │      │
      │              └──┼───────────────────────────────┘      │
      │                 └──▶ TRAILERS ─────────────────────────┤
      ├──head──▶ UNTIL_CLOSE ──eof─────────────────────────────┤
      └──head (HEAD request, 1xx-free 204/304, length 0)───────┘
    any ──malformed──▶ ERROR
"""

from __future__ import annotations

import enum
import re
from typing import NoReturn

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 1024


class ProtocolError(Exception):
    """The server's bytes are not HTTP/1.1 as this client reads it."""


class IncompleteResponse(ProtocolError):
    """The connection ended before the response did."""


class State(enum.Enum):
    HEAD = "head"
    LENGTH = "length"
    CHUNK_SIZE = "chunk_size"
    CHUNK_DATA = "chunk_data"
    CHUNK_END = "chunk_end"
    TRAILERS = "trailers"
    UNTIL_CLOSE = "until_close"
    DONE = "done"
    ERROR = "error"


class Head:
    """A response's status line and headers (names lower-cased, in order).

    Only the framing headers are read when the head arrives (every line is checked, none
    is decoded): :attr:`headers` and :attr:`reason` are decoded on first use, which on the
    proxy path is never."""

    __slots__ = ("status", "keep_alive", "_reason", "_fields", "_headers")

    def __init__(self, status: int, reason: bytes, fields: bytes, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self._reason = reason
        self._fields = fields  # the header lines, each ending in CRLF, already checked
        self._headers: tuple[tuple[str, str], ...] | None = None

    @property
    def reason(self) -> str:
        return self._reason.decode("latin-1")

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        if self._headers is None:
            self._headers = tuple((name.decode("ascii").lower(), value.decode("latin-1"))
                                  for name, value in _FIELD_ALL.findall(self._fields))
        return self._headers

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (lower-case), or ``None``."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"Head({self.status}, {self.reason!r}, {self.headers!r}, keep_alive={self.keep_alive})"


_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_FIELDS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_FIELD_ALL = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r\n")
_FRAMING = re.compile(rb"^(content-length|transfer-encoding|connection):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r$",
                      re.IGNORECASE | re.MULTILINE)
"""The framing headers among lines that passed :data:`_FIELDS`: all a client must read."""
_HEX = b"0123456789abcdefABCDEF"


def _chunk_size(line: bytearray) -> int:
    """The size on a chunk line (extensions after ``;`` ignored), or -1."""
    semi = line.find(b";")
    if semi >= 0:
        if not _TEXT.fullmatch(line[semi:].decode("latin-1")):
            return -1
        line = line[:semi].rstrip(b" \t")
    if not 0 < len(line) <= 16 or line.translate(None, _HEX):
        return -1
    return int(line, 16)
_TEXT = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")


def request_head(method: str, target: str, host: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A request's line and headers, each ending in CRLF (the blank line, and any
    ``content-length``, are the caller's). Raises :class:`ValueError` for a control
    character (CR, LF, NUL...) in any of them: it would let a value inject headers."""
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}", *(f"{name}: {value}" for name, value in headers)]
    for line in lines:
        if not _TEXT.fullmatch(line):
            raise ValueError(f"a request line or header holds a control character: {line[:60]!r}")
    return "".join(line + "\r\n" for line in lines).encode("latin-1")


def format_request(method: str, target: str, host: str, headers: tuple[tuple[str, str], ...] = (),
                   body: bytes | None = None) -> bytes:
    """The bytes of one request (see :func:`request_head`), with a ``content-length``
    when there is a ``body``."""
    head = request_head(method, target, host, headers)
    if body is None:
        return head + b"\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


class ResponseReader:
    """Reads the responses of one connection, one after the other.

    Call :meth:`start` before each request's response, :meth:`feed` every received byte
    string (``b""`` for the end of the connection), then :meth:`head` until it returns the
    head and :meth:`body` until :attr:`state` is ``DONE``. Both return what the bytes so
    far allow (``None`` / ``b""`` when they need more) and raise :class:`ProtocolError`
    for malformed input or a connection that ended inside a response.
    """

    __slots__ = ("state", "_buf", "_eof", "_remaining", "_no_body", "_keep_alive", "received_any", "chunked")

    def __init__(self) -> None:
        self.state = State.DONE
        self._buf = bytearray()
        self._eof = False
        self._remaining = 0
        self._no_body = False
        self._keep_alive = False
        self.received_any = False
        """Whether any byte of the current response has arrived (a connection that ends
        before one did was probably closed by the server while idle)."""
        self.chunked = False
        """Whether the current (or last) response's body came in chunks."""

    @property
    def reusable(self) -> bool:
        """The response is complete and the connection may carry another request."""
        return self.state is State.DONE and self._keep_alive and not self._buf and not self._eof

    def start(self, *, head_request: bool = False) -> None:
        """Expect the response to a new request (``head_request``: it has no body)."""
        if self.state is not State.DONE or self._buf:
            raise ProtocolError(f"a new response cannot start in state {self.state.value}")
        self.state = State.HEAD
        self._no_body = head_request
        self.received_any = False

    def feed(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the server closed the connection."""
        if data:
            self._buf += data
            self.received_any = True
        else:
            self._eof = True

    def head(self) -> Head | None:
        """The head once it is whole (``1xx`` interim responses are skipped)."""
        while self.state is State.HEAD:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._fail(f"response head longer than {MAX_HEAD} bytes")
                if self._eof:
                    self._fail("the connection closed before a response" if not self._buf
                               else "the connection closed inside a response head", IncompleteResponse)
                return None
            if end > MAX_HEAD:
                self._fail(f"response head longer than {MAX_HEAD} bytes")
            raw = bytes(self._buf[:end])
            del self._buf[:end + 4]
            head = self._parse_head(raw)
            if head is not None:
                return head
        raise ProtocolError(f"no head to read in state {self.state.value}")

    def _parse_head(self, raw: bytes) -> Head | None:
        eol = raw.find(b"\r\n")
        status_line = _STATUS.fullmatch(raw, 0, eol if eol >= 0 else len(raw))
        if status_line is None:
            self._fail(f"malformed status line {raw[:eol if eol >= 0 else 100][:100]!r}")
        minor, status = status_line.group(1), int(status_line.group(2))
        lengths: set[int] = set()
        chunked = False
        connection: set[str] = set()
        fields = b""
        if eol >= 0:
            fields = raw[eol + 2:] + b"\r\n"
            if _FIELDS.fullmatch(fields) is None:  # one scan for them all; the slow path names the line
                bad = next(line for line in fields.split(b"\r\n") if _FIELD.fullmatch(line) is None)
                self._fail(f"malformed header line {bad[:100]!r}")
            for name_b, value_b in _FRAMING.findall(fields):
                name, value = name_b.lower(), value_b.decode("latin-1")
                if name == b"content-length":
                    for part in value.split(","):
                        if not part.strip().isdigit() or len(part.strip()) > 18:
                            self._fail(f"malformed content-length {value[:40]!r}")
                        lengths.add(int(part.strip()))
                elif name == b"transfer-encoding":
                    if value.strip().lower() != "chunked" or chunked:
                        self._fail(f"unsupported transfer-encoding {value[:40]!r}")
                    chunked = True
                else:
                    connection.update(t.strip().lower() for t in value.split(","))
        if 100 <= status < 200:
            if status == 101:
                self._fail("the server switched protocols")
            return None  # interim (100 Continue, 103 Early Hints): the real head follows
        if len(lengths) > 1:
            self._fail("conflicting content-length headers")
        if chunked and lengths:
            self._fail("both transfer-encoding and content-length")
        keep_alive = minor == b"1" and "close" not in connection
        self._keep_alive = keep_alive
        self.chunked = chunked
        if self._no_body or status in (204, 304):
            self.state = State.DONE
        elif chunked:
            self.state = State.CHUNK_SIZE
        elif lengths:
            self._remaining = lengths.pop()
            self.state = State.LENGTH if self._remaining else State.DONE
        else:
            self._keep_alive = keep_alive = False
            self.state = State.UNTIL_CLOSE
        return Head(status, status_line.group(3) or b"", fields, keep_alive)

    def body(self) -> bytes:
        """The body bytes decoded so far (``b""`` when none are waiting); :attr:`state` is
        ``DONE`` once the whole body has been returned."""
        state = self.state
        if state is State.LENGTH:
            buf = self._buf
            if len(buf) >= self._remaining:
                data = bytes(buf[:self._remaining])
                del buf[:self._remaining]
                self._remaining = 0
                self.state = State.DONE
                return data
            if self._eof:
                self._fail("the connection closed inside a response body", IncompleteResponse)
            data = bytes(buf)
            self._remaining -= len(data)
            buf.clear()
            return data
        if state is State.UNTIL_CLOSE:
            data = bytes(self._buf)
            self._buf.clear()
            if self._eof:
                self.state = State.DONE
            return data
        if state in (State.CHUNK_SIZE, State.CHUNK_DATA, State.CHUNK_END, State.TRAILERS):
            return self._chunks()
        if state is State.DONE:
            return b""
        raise ProtocolError(f"no body to read in state {state.value}")

    def _chunks(self) -> bytes:
        buf, pos, out = self._buf, 0, []
        state, remaining = self.state, self._remaining
        size_state, data_state, end_state = State.CHUNK_SIZE, State.CHUNK_DATA, State.CHUNK_END
        while True:
            if state is size_state:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_CHUNK_LINE:
                        self._fail("chunk size line too long")
                    break
                line = buf[pos:end]
                if 0 < len(line) <= 16 and not line.translate(None, _HEX):
                    remaining = int(line, 16)
                else:  # extensions, or malformed
                    remaining = _chunk_size(line)
                    if remaining < 0:
                        self._fail(f"malformed chunk size line {bytes(line)[:40]!r}")
                pos = end + 2
                if not remaining:
                    state = State.TRAILERS
                elif buf[pos + remaining:pos + remaining + 2] == b"\r\n":  # the whole chunk is here
                    out.append(buf[pos:pos + remaining])
                    pos += remaining + 2
                    remaining = 0
                else:
                    state = data_state
            elif state is data_state:
                take = min(remaining, len(buf) - pos)
                if take == 0:
                    break
                out.append(buf[pos:pos + take])
                pos += take
                remaining -= take
                if remaining == 0:
                    state = end_state
            elif state is end_state:
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    self._fail("a chunk is not followed by CRLF")
                pos += 2
                state = size_state
            else:  # TRAILERS: header lines up to an empty one, read and dropped
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEAD:
                        self._fail("trailers too long")
                    break
                if end == pos:
                    pos += 2
                    state = State.DONE
                    break
                if _FIELD.fullmatch(buf, pos, end) is None:
                    self._fail("malformed trailer line")
                pos = end + 2
        del buf[:pos]
        self.state, self._remaining = state, remaining
        if state is not State.DONE and self._eof and not out:
            self._fail("the connection closed inside a chunked body", IncompleteResponse)
        return out[0] if len(out) == 1 else b"".join(out)

    def _fail(self, message: str, error: type[ProtocolError] = ProtocolError) -> NoReturn:
        self.state = State.ERROR
        self._keep_alive = False
        raise error(message)
