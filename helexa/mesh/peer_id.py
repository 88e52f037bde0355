"""libp2p peer ids of Ed25519 keys, computed without importing libp2p.

A peer id is the base58btc identity multihash of the protobuf-encoded public key
(``KeyType.Ed25519 = 1``); for a 32-byte key that is 36 bytes, under the 42-byte limit
above which libp2p would hash it with sha256 instead. A test checks this against libp2p.
"""

from __future__ import annotations

import functools

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ED25519_PROTO_PREFIX = b"\x08\x01\x12\x20"


def b58encode(data: bytes) -> str:
    num = int.from_bytes(data, "big")
    out = []
    while num:
        num, rem = divmod(num, 58)
        out.append(_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


@functools.lru_cache(maxsize=1024)  # the same few peers' keys, with every receipt
def peer_id_from_ed25519(public_key: bytes) -> str:
    """The peer id of a raw 32-byte Ed25519 public key.

    Raises:
        ValueError: ``public_key`` is not 32 bytes.
    """
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    proto = _ED25519_PROTO_PREFIX + public_key
    return b58encode(bytes([0x00, len(proto)]) + proto)
