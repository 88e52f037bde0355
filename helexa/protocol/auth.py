"""Join-token proofs, as pure functions.

The neuron proves it holds the operator's join token without sending it: both sides
compute HMAC-SHA256 over the two nonces and the node id. The cortex answers with a
counter-proof over the same values under another label, so a neuron also knows it joined
the cortex that holds its token (and not an impostor on the same address).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32
_JOIN = b"helexa/join/v1\x00"
_WELCOME = b"helexa/welcome/v1\x00"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_token() -> str:
    """A fresh join token (printable, 256 bits of entropy)."""
    return "hlx1." + secrets.token_urlsafe(32)


def _mac(label: bytes, token: str, cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    msg = b"".join([label, cortex_nonce, neuron_nonce, node_id.encode()])
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def join_proof(token: str, cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    return _mac(_JOIN, token, cortex_nonce, neuron_nonce, node_id)


def welcome_proof(token: str, cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    return _mac(_WELCOME, token, cortex_nonce, neuron_nonce, node_id)


def verify(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)
