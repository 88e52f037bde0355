"""Join-token proofs, as pure functions.

The neuron proves it holds the operator's join token without sending it: both sides
compute HMAC-SHA256 over the two nonces and the node id. The cortex answers with a
counter-proof over the same values under another label, so a neuron also knows it joined
the cortex that holds its token (and not an impostor on the same address).

A neuron also signs the same nonces and its node id with its own Ed25519 identity key
(:func:`identity_statement`): the cortex binds a node id to the first key that joins as
it, so the token alone does not let one neuron pass for another.

A join token handed to neurons may carry the cortex's TLS certificate fingerprint, as a
k3s token carries its CA's hash: ``hlx1.<secret>::sha256:<64 hex>``. The neuron then
verifies a ``wss://`` cortex by that pin, with no public CA; only ``<secret>`` enters the
proofs (:func:`split_token`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32
_JOIN = b"helexa/join/v1\x00"
_WELCOME = b"helexa/welcome/v1\x00"
_IDENTITY = b"helexa/neuron-identity/v1\x00"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_token() -> str:
    """A fresh join token (printable, 256 bits of entropy)."""
    return "hlx1." + secrets.token_urlsafe(32)


PIN_MARK = "::sha256:"


def cert_fingerprint(der: bytes) -> str:
    """The pin of a certificate: SHA-256 of its DER bytes, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def with_pin(token: str, fingerprint: str) -> str:
    """``token`` carrying the certificate pin ``fingerprint`` (replacing any it had)."""
    return split_token(token)[0] + PIN_MARK + fingerprint.lower()


def split_token(text: str) -> tuple[str, str | None]:
    """``(secret, pin)`` of a join token; ``pin`` is None when it carries none.

    Raises ``ValueError`` for a pin that is not 64 hex digits.
    """
    secret, mark, pin = text.strip().partition(PIN_MARK)
    if not mark:
        return secret, None
    pin = pin.lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise ValueError("the join token's certificate pin must be 64 hex digits after '::sha256:'")
    return secret, pin


def _mac(label: bytes, token: str, cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    msg = b"".join([label, cortex_nonce, neuron_nonce, node_id.encode()])
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def join_proof(token: str, cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    return _mac(_JOIN, token, cortex_nonce, neuron_nonce, node_id)


def welcome_proof(token: str, cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    return _mac(_WELCOME, token, cortex_nonce, neuron_nonce, node_id)


def identity_statement(cortex_nonce: bytes, neuron_nonce: bytes, node_id: str) -> bytes:
    """What a neuron signs with its identity key at a join: the cortex's nonce, its own and
    its node id, under a label of their own (a signature made for anything else never
    passes for one; the nonces are fixed-length, so the node id cannot shift them)."""
    return b"".join([_IDENTITY, cortex_nonce, neuron_nonce, node_id.encode()])


def verify(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)
