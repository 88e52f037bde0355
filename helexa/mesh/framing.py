"""Varint-length-prefixed frames, sans-IO: ``encode_frame`` and an incremental decoder.

Each frame is an unsigned LEB128 varint length followed by that many bytes, the same
prefix libp2p uses for its own protocols.
"""

from __future__ import annotations

from helexa.protocol import DecodeError

_MAX_VARINT_BYTES = 10


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varint must not be negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


class FrameDecoder:
    """Feed it bytes as they arrive; take out whole frames.

    Raises:
        DecodeError: a length prefix is malformed or announces more than ``max_size``
            bytes (checked before buffering the body, so a peer cannot make us allocate).
    """

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf)

    def next_frame(self) -> bytes | None:
        """The next complete frame, or ``None`` if more bytes are needed."""
        length = 0
        shift = 0
        for i, byte in enumerate(self._buf):
            if i >= _MAX_VARINT_BYTES:
                raise DecodeError("frame length prefix is too long")
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                header = i + 1
                break
        else:
            if len(self._buf) >= _MAX_VARINT_BYTES:
                raise DecodeError("frame length prefix is too long")
            return None
        if length > self._max:
            raise DecodeError(f"frame of {length} bytes exceeds the limit of {self._max}", code="oversized")
        if len(self._buf) < header + length:
            return None
        frame = bytes(self._buf[header : header + length])
        del self._buf[: header + length]
        return frame
