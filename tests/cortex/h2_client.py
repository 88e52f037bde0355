"""A raw HTTP/2 client over TLS for the deadline tests (tests only): frames are built and
sent by hand (hyperframe, hpack), so a test can leave a head or a body unfinished, and
every frame the server sends is recorded with the time it came. Frames are parsed
without h2's state machine, which would refuse the frames a server still sends for its
running streams after a GOAWAY."""

from __future__ import annotations

import ssl
from typing import Any

import trio
from h2.frame_buffer import FrameBuffer
from hpack import Decoder, Encoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame, PingFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Client:
    """One connection; :meth:`read` (a task) records ``(time, frame)`` in :attr:`frames`,
    each HEADERS frame with its decoded ``headers``, and :attr:`closed_at` when it ends."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.frames: list[tuple[float, Frame]] = []
        self.closed_at: float | None = None
        self._changed = trio.Event()

    @classmethod
    async def open(cls, cafile: str, port: int, settings: dict[int, int] | None = None) -> H2Client:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["h2"])
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "h2"
        client = cls(stream)
        await client.send_raw(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
        return client

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, *frames: Frame) -> None:
        await self.send_raw(b"".join(f.serialize() for f in frames))

    def headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], *, end_stream: bool = False,
                end_headers: bool = True) -> HeadersFrame:
        flags = ({"END_STREAM"} if end_stream else set()) | ({"END_HEADERS"} if end_headers else set())
        return HeadersFrame(stream_id, data=self.encoder.encode(fields), flags=flags)

    @staticmethod
    def data(stream_id: int, data: bytes, *, end_stream: bool = False) -> DataFrame:
        return DataFrame(stream_id, data=data, flags={"END_STREAM"} if end_stream else set())

    @staticmethod
    def ping(opaque: bytes = b"12345678") -> PingFrame:
        return PingFrame(0, opaque_data=opaque)

    async def read(self) -> None:
        frames = FrameBuffer(server=False)
        frames.max_frame_size = 2**24 - 1
        try:
            while data := await self.stream.receive_some(65536):
                frames.add_data(data)
                for frame in frames:
                    if isinstance(frame, HeadersFrame):
                        frame.headers = dict(self.decoder.decode(frame.data, raw=True))  # type: ignore[attr-defined]
                    elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                        await self.send(SettingsFrame(0, flags={"ACK"}))
                    self.frames.append((trio.current_time(), frame))
                self._wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed_at = trio.current_time()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, kind: str, stream_id: int = 0, timeout: float = 10, **match: Any) -> float | None:
        """When the first frame of type ``kind`` on ``stream_id`` with ``flag=...``/attributes
        ``match`` came (waiting for it up to ``timeout``); None if none came, or the
        connection closed first."""
        with trio.move_on_after(timeout):
            while True:
                for at, frame in self.frames:
                    if type(frame).__name__ == kind and frame.stream_id == stream_id and all(
                            (value in frame.flags) if name == "flag" else getattr(frame, name) == value
                            for name, value in match.items()):
                        return at
                if self.closed_at is not None:
                    return None
                await self._changed.wait()
        return None

    def body(self, stream_id: int) -> bytes:
        return b"".join(f.data for _, f in self.frames if isinstance(f, DataFrame) and f.stream_id == stream_id)

    def status(self, stream_id: int) -> int | None:
        for _, frame in self.frames:
            if isinstance(frame, HeadersFrame) and frame.stream_id == stream_id:
                return int(frame.headers[b":status"])  # type: ignore[attr-defined]
        return None

    async def wait_closed(self, timeout: float = 10) -> float | None:
        with trio.move_on_after(timeout):
            while self.closed_at is None:
                await self._changed.wait()
        return self.closed_at
