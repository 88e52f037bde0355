"""An HTTP/2 connection of hypercorn's (:mod:`.hypercorn_server`) held to the deadlines an
HTTP/1.1 one has, stream by stream.

HTTP/1.1 has one request at a time, so "a head must arrive whole within ``head_timeout``
of its first byte" is one timer on the connection. HTTP/2 carries many streams, and
frames that are no request (SETTINGS, PING, WINDOW_UPDATE) come on an idle connection too.
Here:

* an idle connection (no stream open) lives until ``keep_alive_timeout`` (hypercorn's idle
  timer), whatever whole frames it carries: a PING or SETTINGS starts no deadline;
* a request head (a HEADERS frame and its CONTINUATIONs, up to END_HEADERS) must arrive
  whole within ``head_timeout`` of its first frame, and every frame within ``head_timeout``
  of its first byte, whether or not other streams are running. Past it, with no stream
  running the connection is closed (after a GOAWAY); with streams running, a GOAWAY
  (NO_ERROR, last stream: the highest begun) tells the client that nothing past them
  will be served, those streams run to their end and then the connection closes. A head
  left unfinished holds the whole connection (no other frame may come between HEADERS
  and END_HEADERS, and its HPACK state cannot be skipped), so no finer cut exists;
* a request body is read by the app within ``gateway.body_timeout`` (a 408 past it,
  :meth:`.asgi.Exchange.body`), as on HTTP/1.1;
* a response's DATA must be taken within ``send_timeout``, as one write of HTTP/1.1 must:
  a stream whose client opens no flow-control window for it that long (hypercorn would
  wait for ever) is reset with CANCEL and its request ends as a client gone; a client
  that takes no bytes at all loses the connection (:mod:`.hypercorn_server`);
* DATA for a stream whose answer is complete (a 408 sent before the body ended) is
  acknowledged for flow control and the stream reset with NO_ERROR (RFC 9113 §8.1: the
  rest of the request is not wanted), where hypercorn would fail the whole connection,
  and the server's task group with it, on a stream it no longer knows; a stream begun
  after the GOAWAY is reset with REFUSED_STREAM.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import h2.events
import h2.exceptions
import priority
import trio
from h2.errors import ErrorCodes
from hypercorn.events import RawData
from hypercorn.protocol.events import Body, Data, EndBody, EndData, Event as StreamEvent, StreamClosed, Trailers
from hypercorn.protocol.h2 import H2Protocol
from hyperframe.frame import GoAwayFrame

log = logging.getLogger("helexa.gateway.http")

_PREFACE = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Guard:
    """The deadlines of one HTTP/2 connection (see the module docstring): after each read,
    :meth:`head_due` is when the bytes held unparsed must be whole; :meth:`go_away` when
    they are not. Filters the events of ``protocol`` (its ``_handle_events``, wrapped)."""

    def __init__(self, protocol: H2Protocol, head_timeout: float, send_timeout: float) -> None:
        self.protocol = protocol
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        self.last_stream_id: int | None = None
        """Set once the GOAWAY went out: streams above it are refused."""
        self._frame_due = math.inf
        self._block_due = math.inf
        self._handle: Callable[[list[h2.events.Event]], Awaitable[None]] = protocol._handle_events
        protocol._handle_events = self._handle_events  # type: ignore[method-assign]
        self._stream_send: Callable[[StreamEvent], Awaitable[None]] = protocol.stream_send
        protocol.stream_send = self._send  # type: ignore[method-assign]  # each stream is given it

    @property
    def draining(self) -> bool:
        return self.last_stream_id is not None

    def buffered(self) -> int:
        """Bytes received and not yet parsed into a whole frame (h2's ``FrameBuffer`` holds
        them: ``_data`` in h2 4.4, ``data`` in earlier releases)."""
        frames = self.protocol.connection.incoming_buffer
        return len(frames._data if hasattr(frames, "_data") else frames.data)  # type: ignore[attr-defined]

    def head_due(self, now: float, buffered_before: int, received: int) -> float:
        """When what is held unparsed must be whole, after a read of ``received`` bytes that
        found ``buffered_before`` held: a frame begun within ``head_timeout`` of its first
        byte (a frame completed since restarts it), a header block within ``head_timeout``
        of its first frame (its CONTINUATIONs do not restart it). ``math.inf``: nothing is."""
        if self.draining:
            return math.inf
        frames = self.protocol.connection.incoming_buffer
        held = self.buffered()
        if not held and not 0 < frames._preamble_len < _PREFACE:
            self._frame_due = math.inf
        elif self._frame_due == math.inf or held < buffered_before + received:  # a frame was taken whole
            self._frame_due = now + self.head_timeout
        if not frames._headers_buffer:
            self._block_due = math.inf
        elif self._block_due == math.inf:
            self._block_due = now + self.head_timeout
        return min(self._frame_due, self._block_due)

    async def go_away(self) -> bool:
        """The head deadline passed: send a GOAWAY naming the last stream served; True when
        streams are still running (the connection is to close once they end), False when
        it can close now."""
        if self.draining:
            return not self.protocol.idle
        conn = self.protocol.connection
        self.last_stream_id = conn.highest_inbound_stream_id
        log.debug("HTTP/2 connection: a request head took over %gs: GOAWAY after stream %d",
                  self.head_timeout, self.last_stream_id)
        frame = GoAwayFrame(0, last_stream_id=self.last_stream_id, error_code=ErrorCodes.NO_ERROR,
                            additional_data=b"request head timeout")
        # Sent past h2's state machine: in its CLOSED state every later frame (a WINDOW_UPDATE
        # the running streams need) would be a ProtocolError, on which hypercorn drops them all.
        await self.protocol._flush()
        await self.protocol.send(RawData(frame.serialize()))
        return not self.protocol.idle

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if not self._refused(event):
                await self._handle([event])  # one at a time: a stream may end while one is handled
        await self.protocol._flush()

    async def _send(self, event: StreamEvent) -> None:
        """A stream's answer to hypercorn, a body's part within ``send_timeout``: hypercorn
        holds it until the client's flow-control window lets it go."""
        if not isinstance(event, (Body, Data, EndBody, EndData, Trailers)):
            await self._stream_send(event)
            return
        with trio.move_on_after(self.send_timeout) as scope:
            await self._stream_send(event)
        if not scope.cancelled_caught:
            return
        stream_id = event.stream_id
        log.debug("HTTP/2 stream %d: no window for its answer within %gs: reset", stream_id, self.send_timeout)
        with trio.CancelScope(shield=True):
            self._reset(stream_id, ErrorCodes.CANCEL)
            # Emptied: hypercorn's sender then ends the stream, finds it reset and drops it.
            if (buffer := self.protocol.stream_buffers.get(stream_id)) is not None:
                await buffer.close()
            with contextlib.suppress(priority.MissingStreamError):
                self.protocol.priority.unblock(stream_id)
            await self.protocol.has_data.set()
            # Its app gets http.disconnect; the connection's idle timer starts if it was the last.
            await self._stream_send(StreamClosed(stream_id=stream_id))
            await self.protocol._flush()
        raise OSError(f"the client took no data within {self.send_timeout:g}s")

    def _refused(self, event: h2.events.Event) -> bool:
        stream_id = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.RequestReceived):
            if self.last_stream_id is None or stream_id <= self.last_stream_id:
                return False
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return True
        if not isinstance(event, h2.events.DataReceived) or stream_id in self.protocol.streams:
            return False
        self.protocol.connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
        self._reset(stream_id, ErrorCodes.NO_ERROR)
        return True

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.protocol.connection.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # closed already (the DATA ended it, or it was reset before)
