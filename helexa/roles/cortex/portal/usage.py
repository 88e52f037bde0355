"""A request's usage record (one ledger row) and how reports group them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GROUPS = ("key", "model", "day", "portal")
"""What a usage report may be grouped by (``--by``)."""

OUTCOMES = ("ok", "client_gone", "error")

OPEN_KEY = "(open)"
"""The key cell of an open portal's usage, by ``helexa usage`` and the console (its rows
carry no key id: the ledger's is ``""``, which the data and CSV keep)."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request used and cost, as the ledger keeps it.

    ``model_asked`` is the public name the client sent (an alias, maybe), ``model_served``
    the catalogue model that ran. ``node_id`` is the neuron (``federation`` when a peer
    served it; then ``peer_id`` and ``receipt_signature``, hex, name the peer and its
    signed receipt in the federation ledger). ``cost`` is at the portal's price, in its
    ``currency``. ``outcome``: ``ok``; ``client_gone`` (the client left; billed for what
    it was sent); ``error`` (``error_code`` says which; billed for what was generated).
    Times are Unix seconds; ``latency`` and ``ttft`` seconds (``ttft`` whenever the
    generation began, however it ended; None when no output came).
    """

    request_id: str
    portal: str
    key_id: str
    endpoint: str
    model_asked: str
    model_served: str
    started_at: float
    ended_at: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    currency: str = ""
    latency: float = 0.0
    ttft: float | None = None
    node_id: str = ""
    peer_id: str = ""
    receipt_signature: str = ""
    outcome: str = "ok"
    error_code: str = ""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = tuple(UsageRecord.__dataclass_fields__)

CALL_SQL = "request_id NOT GLOB '*-[1-9]*'"
"""True (1) for the record that counts a client's call as a request in a report: every
record but those of choices 1.. of OpenAI's ``n``. The cortex's request ids are hex (no
``-``); the ``n`` choices of one call are ``<id>-0`` ... ``<id>-<n-1>``, each a record of
its own (its tokens billed on it), and the call is one request, as ``rpm`` counts it."""

