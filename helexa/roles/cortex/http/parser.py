"""Request heads and bodies, parsed from bytes: pure functions and two body readers.

The grammar is h11's (RFC 9112's, as h11 writes it in ``h11/_abnf.py``): a token
method, a target of visible characters, ``HTTP/x.y``, header lines of a token name and a
field value, chunk sizes of at most 20 hex digits. It is as strict as h11 (the tests
feed the same heads to both and compare verdicts), and stricter in four places where
h11 is lenient and leniency only helps request smuggling or nobody:

* obsolete line folding (a header line starting with a space) is rejected, not joined;
* ``Transfer-Encoding`` together with ``Content-Length`` is rejected, not resolved;
* an HTTP version other than 1.0 and 1.1 gets 505;
* a head over the size limit is rejected even when it arrives in one piece.

Why not h11 itself: h11 couples parsing to its own connection state machine, which
expects every response to be sent through it as events (whose validation and framing
were a measured share of the cortex's CPU per request: ``docs/benchmarks.md``), so the
server used to discard and rebuild an ``h11.Connection`` after each response. Parsing
here keeps one buffer and one state table (:mod:`.states`) per connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from .errors import RemoteProtocolError
from .events import Request

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VCHAR_OR_OBS = rb"[^\x00\s]"
_FIELD_VALUE = rb"(?:%s+(?:[ \t]+%s+)*)?" % (_VCHAR_OR_OBS, _VCHAR_OR_OBS)
_REQUEST_LINE = re.compile(rb"(%s) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])" % _TOKEN)
_HEADER_LINE = re.compile(rb"(%s):[ \t]*(%s)[ \t]*" % (_TOKEN, _FIELD_VALUE))
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,20}")
_HEAD_END = re.compile(rb"\n\r?\n")

_MAX_CHUNK_LINE = 4096
"""The longest chunk-size line (with extensions) accepted."""


class BoundedMemo(dict[bytes, Any]):
    """``memo[key]`` is ``fn(key)``, remembered: no call for a key seen before (a request's
    header names and method, on every request: docs/benchmarks.md, issue 17 item 2).
    Bounded: at most ``limit`` keys of at most ``longest`` bytes are kept, so a client
    inventing names grows nothing; past that ``fn`` runs each time."""

    __slots__ = ("_fn", "_limit", "_longest")

    def __init__(self, fn: Callable[[bytes], Any], *, limit: int, longest: int, seed: Iterable[bytes] = ()) -> None:
        super().__init__()
        self._fn, self._limit, self._longest = fn, limit, longest
        for key in seed:
            self[key] = fn(key)

    def __missing__(self, key: bytes) -> Any:
        value = self._fn(key)
        if len(key) <= self._longest and len(self) < self._limit:
            self[key] = value
        return value


_COMMON_NAMES = (b"Host", b"Content-Type", b"Content-Length", b"Authorization", b"User-Agent", b"Accept",
                 b"Accept-Encoding", b"Connection", b"Transfer-Encoding", b"Expect", b"X-Api-Key", b"X-Request-Id",
                 b"Cache-Control", b"X-Accel-Buffering", b"Date", b"Traceparent", b"X-Session-Id")
LOWER = BoundedMemo(bytes.lower, limit=512, longest=64,
                    seed=(*_COMMON_NAMES, *(name.lower() for name in _COMMON_NAMES)))
"""``LOWER[name]`` is ``name.lower()`` (see :class:`BoundedMemo`)."""


def find_head_end(buf: bytes, start: int = 0) -> int:
    """Where the head at the start of ``buf`` ends (just past its blank line), or -1.

    Args:
        buf: the bytes received so far.
        start: where to start looking (a later call need not rescan what an earlier one
            searched; a line break may straddle the old end, so pass ``old_len - 3``).

    Raises:
        RemoteProtocolError: ``buf`` cannot be the start of a request line (its first
            byte is a control character or a space), decided at once rather than after
            the rest of a head that will never make sense.
    """
    if buf and buf[0] < 0x21:
        raise RemoteProtocolError("illegal request line")
    match = _HEAD_END.search(buf, max(start, 0))
    return -1 if match is None else match.end()


def parse_head(head: bytes) -> tuple[Request, int | None, bool, bool]:
    """Parse and validate one request head.

    Args:
        head: the bytes of the head, up to and including its blank line.

    Returns:
        ``(request, body_length, keep_alive, expect_continue)``: the body's length from
        ``Content-Length`` (0 without one; ``None`` for a chunked body), whether the
        client allows another request on this connection (HTTP/1.1 without
        ``Connection: close``), and whether it waits for ``100 Continue``.

    Raises:
        RemoteProtocolError: the head is malformed or asks for what is not supported.
    """
    lines = head.split(b"\n")
    del lines[-2:]  # the blank line
    for i, line in enumerate(lines):
        if line[-1:] == b"\r":
            lines[i] = line[:-1]
    if not lines or not lines[0]:
        raise RemoteProtocolError("no request line received")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise RemoteProtocolError(f"illegal request line: {lines[0][:200]!r}")
    method, target, version = match[1], match[2], match[3]  # (subscripts: no call per request)
    if version != b"1.1" and version != b"1.0":
        raise RemoteProtocolError(f"HTTP/{version.decode()} is not supported", 505)
    headers = []
    length: bytes | None = None
    chunked = False
    hosts = 0
    keep_alive = version == b"1.1"
    expect_continue = False
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            if line[:1] in (b" ", b"\t"):
                raise RemoteProtocolError("obsolete line folding is not accepted")
            raise RemoteProtocolError(f"illegal header line: {line[:200]!r}")
        name, value = LOWER[header[1]], header[2]
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if b"," in value:
                values = {v.strip() for v in value.split(b",")}
                if len(values) != 1:
                    raise RemoteProtocolError("conflicting Content-Length headers")
                value = values.pop()
            if _DIGITS.fullmatch(value) is None:
                raise RemoteProtocolError("bad Content-Length")
            if length is not None:
                if length != value:
                    raise RemoteProtocolError("conflicting Content-Length headers")
                continue  # a repeat says nothing new (h11 drops it too)
            length = value
        elif name == b"transfer-encoding":
            if chunked:
                raise RemoteProtocolError("multiple Transfer-Encoding headers", 501)
            value = value.lower()
            if value != b"chunked":
                raise RemoteProtocolError("only Transfer-Encoding: chunked is supported", 501)
            chunked = True
        elif name == b"connection":
            if b"close" in _tokens(value):
                keep_alive = False
        elif name == b"expect":
            expect_continue = version == b"1.1" and b"100-continue" in _tokens(value)
        headers.append((name, value))
    if hosts == 0 and version == b"1.1":
        raise RemoteProtocolError("missing Host header")
    if hosts > 1:
        raise RemoteProtocolError("more than one Host header")
    if chunked and length is not None:
        raise RemoteProtocolError("both Transfer-Encoding and Content-Length")
    body_length = None if chunked else int(length) if length is not None else 0
    return Request(method, target, version, headers), body_length, keep_alive, expect_continue


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip() for t in value.lower().split(b",")]


class LengthBody:
    """Reads a body of ``Content-Length`` bytes."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    def feed(self, buf: bytes) -> tuple[bytes, int, bool]:
        """Take what ``buf`` holds of the body.

        Returns:
            ``(data, used, done)``: the body bytes, how many bytes of ``buf`` they took,
            and whether the body is complete.
        """
        take = min(self.remaining, len(buf))
        self.remaining -= take
        return (buf if take == len(buf) else buf[:take]), take, self.remaining == 0


class ChunkedBody:
    """Reads a chunked body: sizes, data, the CRLF after each chunk, trailers (dropped)."""

    __slots__ = ("_phase", "_remaining", "_max_trailers", "_failed")

    _SIZE, _DATA, _CRLF, _TRAILERS = range(4)

    def __init__(self, max_trailers: int = 65536) -> None:
        self._phase = self._SIZE
        self._remaining = 0  # of the current chunk's data, or of its CRLF
        self._max_trailers = max_trailers
        self._failed: RemoteProtocolError | None = None  # raised on the call after the good data

    def feed(self, buf: bytes) -> tuple[bytes, int, bool]:
        """Take what ``buf`` holds of the body (see :meth:`LengthBody.feed`).

        Raises:
            RemoteProtocolError: a malformed chunk size, a chunk not followed by CRLF, a
                malformed trailer, or a size line or trailers over their limits.
        """
        if self._failed is not None:
            raise self._failed
        parts: list[bytes] = []
        try:
            return self._feed(buf, parts)
        except RemoteProtocolError as exc:
            if not parts:
                raise
            self._failed = exc  # hand out the chunks before the fault first
            return b"".join(parts), 0, False

    def _feed(self, buf: bytes, parts: list[bytes]) -> tuple[bytes, int, bool]:
        pos = 0
        end = len(buf)
        while pos < end:
            if self._phase == self._SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise RemoteProtocolError("chunk size line too long")
                    break
                match = _CHUNK_SIZE.fullmatch(buf, pos, eol)
                if match is None:
                    raise RemoteProtocolError(f"illegal chunk size line: {buf[pos:eol][:100]!r}")
                size = int(match.group(1), 16)
                pos = eol + 2
                self._phase, self._remaining = (self._DATA, size) if size else (self._TRAILERS, 0)
            elif self._phase == self._DATA:
                take = min(self._remaining, end - pos)
                parts.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._phase, self._remaining = self._CRLF, 2
            elif self._phase == self._CRLF:
                expected = b"\r\n"[2 - self._remaining:]
                got = buf[pos:pos + len(expected)]
                if not expected.startswith(got):
                    raise RemoteProtocolError(f"chunk not followed by CRLF: {got!r}")
                pos += len(got)
                self._remaining -= len(got)
                if not self._remaining:
                    self._phase = self._SIZE
            else:
                done = self._trailers(buf, pos)
                if done < 0:
                    break
                return b"".join(parts), done, True
        return b"".join(parts), pos, False

    def _trailers(self, buf: bytes, pos: int) -> int:
        """Where the trailers end (past their blank line), or -1 if they have not."""
        for blank in (b"\r\n", b"\n"):
            if buf.startswith(blank, pos):
                return pos + len(blank)
        if buf.startswith(b"\r", pos) and len(buf) == pos + 1:
            return -1
        match = _HEAD_END.search(buf, pos)
        if match is None:
            if len(buf) - pos > self._max_trailers:
                raise RemoteProtocolError("trailers too large", 431)
            return -1
        for line in buf[pos:match.start()].split(b"\n"):
            if _HEADER_LINE.fullmatch(line[:-1] if line[-1:] == b"\r" else line) is None:
                raise RemoteProtocolError(f"illegal trailer line: {line[:200]!r}")
        return match.end()
