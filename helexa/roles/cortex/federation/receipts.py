"""Usage receipts: signed by the serving cortex, verified by the asking one (pure)."""

from __future__ import annotations

import math

from helexa.identity import Identity, verify_signature
from helexa.mesh.peer_id import peer_id_from_ed25519
from helexa.protocol import encode
from helexa.protocol.federation import Receipt, cost_of

from .peer_usage import plausible_completion


TIME_SKEW = 30.0
"""Seconds a serving peer's clock may be off the asker's (as an announcement's may)."""


def receipt_payload(receipt: Receipt) -> bytes:
    """The bytes a receipt's signature covers: the same bytes as
    :func:`helexa.protocol.federation.signed_payload` gives (the wire is unchanged),
    made in one encoding instead of three. ``signed_payload`` encodes, decodes and
    encodes again so that the bytes do not depend on how the signer typed a value (an
    ``int`` for a ``float`` field); here each field is converted to the type decoding
    gives it, which is what the round trip did (``test_receipt_payload_is_signed_payload``).
    Signing and verifying one on every federated request's answer path made the round
    trip ~40 us of CPU on each side."""
    r = receipt
    return encode(Receipt(
        str(r.request_id), str(r.model_id), int(r.prompt_tokens), int(r.completion_tokens), float(r.price_input),
        float(r.price_output), float(r.cost), float(r.started_at), float(r.ended_at), str(r.server_peer_id),
        str(r.client_peer_id), bytes(r.server_public_key), str(r.outcome), b""))


def sign_receipt(
    identity: Identity,
    *,
    request_id: str,
    model_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    price_input: float,
    price_output: float,
    started_at: float,
    ended_at: float,
    client_peer_id: str,
    outcome: str = "ok",
) -> Receipt:
    fields = (request_id, model_id, prompt_tokens, completion_tokens, price_input, price_output,
              cost_of(prompt_tokens, completion_tokens, price_input, price_output), started_at, ended_at,
              peer_id_from_ed25519(identity.public_bytes), client_peer_id, identity.public_bytes, outcome)
    # Built twice from the same fields rather than with ``dataclasses.replace`` (which
    # re-reads every field by name): a serving cortex signs one per federated answer.
    return Receipt(*fields, signature=identity.sign(receipt_payload(Receipt(*fields))))


def verify_receipt(
    receipt: Receipt,
    *,
    server_peer_id: str,
    client_peer_id: str,
    request_id: str | None = None,
    model_id: str | None = None,
    completion_tokens_seen: int | None = None,
    price_input: float | None = None,
    price_output: float | None = None,
    window: tuple[float, float] | None = None,
) -> list[str]:
    """Everything wrong with ``receipt`` (an empty list: it verifies).

    Checks the signature, that the key is the server's, both peer ids, and, where
    given, the request, the model, the prices agreed from the announcement, the cost
    arithmetic (no negative or non-finite figure), that the billed completion tokens
    are plausible for what the asker saw (:func:`.peer_usage.plausible_completion`), and
    that its times are finite and, given the asker's ``window`` (when it asked, when the
    answer ended), within it give or take :data:`TIME_SKEW` (a peer signs what it likes:
    a receipt dated 1e300 sorted after every other for good).
    """
    problems = []
    try:
        key_peer = peer_id_from_ed25519(receipt.server_public_key)
    except ValueError:
        key_peer = None
    if key_peer != server_peer_id or receipt.server_peer_id != server_peer_id:
        problems.append("signer is not the serving peer")
    if not verify_signature(receipt.server_public_key, receipt.signature, receipt_payload(receipt)):
        problems.append("bad signature")
    if receipt.client_peer_id != client_peer_id:
        problems.append("receipt names another client")
    if request_id is not None and receipt.request_id != request_id:
        problems.append("receipt is for another request")
    if model_id is not None and receipt.model_id != model_id:
        problems.append("receipt is for another model")
    if receipt.prompt_tokens < 0 or receipt.completion_tokens < 0:
        problems.append("negative token count")
    if not all(math.isfinite(v) and v >= 0 for v in (receipt.price_input, receipt.price_output, receipt.cost)):
        problems.append("price or cost negative or not a number")
    if price_input is not None and receipt.price_input > price_input + 1e-9:
        problems.append("input price above the announced one")
    if price_output is not None and receipt.price_output > price_output + 1e-9:
        problems.append("output price above the announced one")
    expected = cost_of(receipt.prompt_tokens, receipt.completion_tokens, receipt.price_input, receipt.price_output)
    if not abs(receipt.cost - expected) <= 1e-9 * max(1.0, abs(expected)):
        problems.append("cost does not match tokens and prices")
    seen = completion_tokens_seen
    if seen is not None and not plausible_completion(receipt.completion_tokens, seen):
        problems.append("bills far more completion tokens than were streamed")
    if not (math.isfinite(receipt.started_at) and math.isfinite(receipt.ended_at)):
        problems.append("times not finite")
    elif receipt.ended_at < receipt.started_at:
        problems.append("ends before it starts")
    elif window is not None and (receipt.started_at < window[0] - TIME_SKEW
                                 or receipt.ended_at > window[1] + TIME_SKEW):
        problems.append("times outside the request's")
    return problems
