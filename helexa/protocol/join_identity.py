"""Who a joining neuron says it is, as the join judges it: its node id, its identity key,
and the key its node id is bound to on the cortex, pure.

A node id must be printable and short (:func:`node_id_problem`). From handshake version 2
a join carries the neuron's Ed25519 identity key and a signature over both nonces and its
node id (:func:`~helexa.protocol.auth.identity_statement`); the cortex refuses a join whose
signature does not verify, whose node id is bound to another key (or that carries none),
with :data:`IDENTITY_MISMATCH`, and, enrolling strictly, one whose node id is bound to no
key, with :data:`NOT_ENROLLED` (:func:`identity_refusal`). The binding itself, trust on
first use, is the shell's: :mod:`helexa.roles.cortex.neuron_keys`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from helexa.identity import fingerprint, verify_signature

from .takeover import forget_command

MAX_NODE_ID = 256
"""The longest node id a cortex admits (a machine id is 32 characters, a host name at most 253)."""

IDENTITY_MISMATCH = "identity_mismatch"
"""The refusal of a join under a node id bound to another identity key (or sent without one)."""

NOT_ENROLLED = "not_enrolled"
"""The refusal, on a cortex that enrols strictly, of a join under a node id bound to no key."""

PUBLIC_KEY_BYTES = 32


def node_id_problem(node_id: str) -> str | None:
    """Why ``node_id`` cannot name a neuron (empty, too long, or holding a character that
    is not printable: a newline in one forged the cortex's log lines), or None when it can."""
    if not node_id:
        return "the node id is empty"
    if len(node_id) > MAX_NODE_ID:
        return f"the node id is {len(node_id)} characters long; at most {MAX_NODE_ID}"
    if not node_id.isprintable():
        return f"the node id {node_id[:64]!r} holds a control or other unprintable character"
    return None


def enrol_command(node_id: str, key: str = "KEY") -> str:
    """The ``helexa neurons enrol`` command line for ``node_id``, quoted as :func:`forget_command`."""
    return f"helexa neurons enrol {'-- ' if node_id.startswith('-') else ''}{shlex.quote(node_id)} {key}"


def identity_refusal(node_id: str, key: bytes, signature: bytes, statement: bytes,
                     bound_to: Callable[[str], bytes | None], *, strict: bool) -> tuple[str, str] | None:
    """Why a join under ``node_id`` carrying ``key`` (empty: none) and its ``signature`` over
    ``statement`` is refused, as ``(code, reason)``, or None to admit it. ``bound_to``: the key a
    node id is bound to (None: none), asked once its signature verifies; ``strict``: refuse a
    node id bound to no key."""
    if key or signature:
        if len(key) != PUBLIC_KEY_BYTES or not verify_signature(key, signature, statement):
            return "unauthorized", f"neuron {node_id!r}: the identity key's signature does not verify"
    bound = bound_to(node_id)
    if bound is None and strict:
        older = "" if key else " (and it sent no identity key: an older neuron, upgrade it first)"
        return NOT_ENROLLED, (f"node id {node_id!r} is not enrolled on this cortex{older}: on the neuron run "
                              f"`helexa neuron-key`, then on the cortex `{enrol_command(node_id)}`")
    if bound is not None and bound != key:
        theirs = f"its key {fingerprint(key)}" if key else "it sent no identity key (an older neuron)"
        return IDENTITY_MISMATCH, (
            f"node id {node_id!r} is bound to another identity key on this cortex ({fingerprint(bound)}; "
            f"{theirs}); if this is a new machine, the operator runs `{forget_command(node_id)}`")
    return None
