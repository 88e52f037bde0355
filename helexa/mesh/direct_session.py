"""One direct-channel connection's cryptography, sans-IO: the hello, the keys, and
sealed records.

A connection opens with the dialer's hello (its ticket id and a random nonce, in the
clear) and the listener's random nonce back. Both then derive two keys, one per
direction, with HKDF-SHA256 over the ticket's secret, salted with both nonces (so a
replayed connection gets keys of its own and its recorded records do not open). After
that every byte is in sealed records::

    hello:   b"HXD1" | ticket id (16) | dialer nonce (32)
    answer:  listener nonce (32)
    record:  length of the ciphertext (u32, big-endian) | ChaCha20-Poly1305 ciphertext + tag

Each direction numbers its records from 0 and uses the number as the AEAD nonce, so a
record dropped, repeated, reordered or altered fails to open. A failure to open, or a
length over ``max_record`` + the tag, raises :class:`helexa.protocol.DecodeError`; the
caller closes the connection.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from helexa.protocol import DecodeError

from .direct_tickets import TICKET_ID_SIZE

NONCE_SIZE = 32
_HELLO_MAGIC = b"HXD1"
HELLO_SIZE = len(_HELLO_MAGIC) + TICKET_ID_SIZE + NONCE_SIZE
_TAG = 16
_LEN = struct.Struct("!I")
_INFO = b"helexa direct channel 1"
MAX_RECORD = 64 * 1024
"""Plaintext bytes per record; a longer write is sealed as several records."""


def encode_hello(ticket_id: bytes, nonce: bytes) -> bytes:
    if len(ticket_id) != TICKET_ID_SIZE or len(nonce) != NONCE_SIZE:
        raise ValueError("a hello needs a 16-byte ticket id and a 32-byte nonce")
    return _HELLO_MAGIC + ticket_id + nonce


def decode_hello(data: bytes) -> tuple[bytes, bytes]:
    """``(ticket id, dialer nonce)``.

    Raises:
        DecodeError: not a hello."""
    if len(data) != HELLO_SIZE or data[:4] != _HELLO_MAGIC:
        raise DecodeError("not a direct-channel hello")
    return data[4 : 4 + TICKET_ID_SIZE], data[4 + TICKET_ID_SIZE :]


class DirectSession:
    """Seals what this end sends and opens what it receives, on one connection.

    Args:
        secret: the ticket's secret.
        ticket_id: the ticket it was granted with (bound into the keys).
        dialer_nonce, listener_nonce: the two nonces of this connection.
        dialer: whether this end dialled (its sending key is the dialer's).
        max_record: the most plaintext bytes one record may carry.
    """

    def __init__(self, secret: bytes, ticket_id: bytes, dialer_nonce: bytes, listener_nonce: bytes, *,
                 dialer: bool, max_record: int = MAX_RECORD) -> None:
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=dialer_nonce + listener_nonce,
                    info=_INFO + ticket_id).derive(secret)
        to_listener, to_dialer = ChaCha20Poly1305(keys[:32]), ChaCha20Poly1305(keys[32:])
        self._seal_with, self._open_with = (to_listener, to_dialer) if dialer else (to_dialer, to_listener)
        self._sent = 0
        self._received = 0
        self._max = max_record
        self._buf = bytearray()

    def seal(self, data: bytes) -> bytes:
        """``data`` as one or more sealed records, ready to write."""
        out = []
        for start in range(0, max(len(data), 1), self._max):
            sealed = self._seal_with.encrypt(self._sent.to_bytes(12, "big"), data[start : start + self._max], None)
            self._sent += 1
            out.append(_LEN.pack(len(sealed)))
            out.append(sealed)
        return b"".join(out)

    def feed(self, data: bytes) -> None:
        """Bytes received from the connection, in order."""
        self._buf += data

    def next_record(self) -> bytes | None:
        """The next record's plaintext, or ``None`` until one has arrived whole.

        Raises:
            DecodeError: a record is oversized, or does not open (forged, altered,
                replayed, reordered, or sealed with other keys)."""
        buf = self._buf
        if len(buf) < 4:
            return None
        size = _LEN.unpack_from(buf)[0]
        if size > self._max + _TAG or size < _TAG:
            raise DecodeError(f"a direct-channel record of {size} bytes", code="oversized")
        if len(buf) < 4 + size:
            return None
        try:
            plain = self._open_with.decrypt(self._received.to_bytes(12, "big"), bytes(buf[4 : 4 + size]), None)
        except InvalidTag:
            raise DecodeError("a direct-channel record did not open") from None
        self._received += 1
        del buf[: 4 + size]
        return plain
