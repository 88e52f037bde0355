"""A cheap look at a join's raw frames, before they are decoded, for an address that failed
its join proofs too often (sans-IO, no trio).

Decoding a join costs the cortex in proportion to its size (up to a megabyte of model
configs: some 12 ms of CPU), and a stranger without the join token can send one join after
another. Turning such an address away unheard kept that cost bounded, but it also turned
away every neuron behind the same address (a shared NAT, other users of the same host),
token or not. :func:`screen` keeps the cost bounded without that: the hello must be small,
and the join's proof, which the neuron's codec writes as the frame's first field, is checked
(an HMAC) straight from the frame's first bytes. A join that proves the token is then decoded
and judged like any other; one that does not is refused without its rest being read.
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack

HELLO_SCREEN_BYTES = 4096
"""The largest hello a screened connection may send (a real one is under 200 bytes)."""


def screen(frame: bytes, *, awaiting_join: bool, proves: Callable[[bytes], bool]) -> str | None:
    """Why ``frame`` is refused unread (None: decode and judge it as usual).

    ``awaiting_join``: the hello was answered, so ``frame`` should be the join. ``proves``
    says whether a proof is the one this join must carry. Before the join only the size is
    looked at (a hello); a join must open with its proof, which must be right."""
    if not awaiting_join:
        if len(frame) > HELLO_SCREEN_BYTES:
            return f"a hello of {len(frame)} bytes (at most {HELLO_SCREEN_BYTES} from an address being throttled)"
        return None
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(frame), 1))
    unpacker.feed(frame)
    try:
        unpacker.read_map_header()
        key = unpacker.unpack()
        proof = unpacker.unpack() if key == "proof" else None
    except Exception:  # msgpack raises a zoo of types for bad input
        return "a join that is not a msgpack map opening with its proof"
    if not isinstance(proof, bytes):
        return "a join that does not open with its proof"
    if not proves(proof):
        return "a join proof that does not match this cortex's join token"
    return None
