"""Signing and validating announcements, and the table of peers they describe (pure).

The gossip validator calls :func:`check_announcement` (stateless: size, decoding,
version, signature, key-to-peer-id binding, freshness); the table then applies the
stateful checks (sequence numbers) and expires what it learned.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

from helexa.identity import Identity, verify_signature
from helexa.mesh.peer_id import peer_id_from_ed25519
from helexa.protocol import ProtocolError, decode
from helexa.protocol.federation import (
    ANNOUNCEMENT_VERSION,
    MAX_ANNOUNCEMENT_BYTES,
    Announcement,
    OfferedModel,
    PolicySummary,
    signed_payload,
)
from helexa.protocol.model import MAX_NAME, Workload, bounded_text, model_id_problem

from .offer_memory import OfferMemory
from .policy import AskPolicy

MAX_TTL = 600.0
MAX_CLOCK_SKEW = 30.0
MAX_MODELS = 256
"""Models one announcement may offer (a peer's whole offer: the table keeps its latest)."""
MAX_ADDRS = 32
"""Multiaddrs taken from one announcement (a node listens on a few)."""
_WARNED_PEERS = 1024
"""Peers whose dropped model ids were logged, remembered so each is logged once."""

log = logging.getLogger(__name__)


class AnnouncementRejected(ValueError):
    """An announcement failed validation; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sign_announcement(
    identity: Identity,
    *,
    operator: str,
    models: tuple[OfferedModel, ...],
    spare_slots: int,
    policy: PolicySummary,
    addrs: tuple[str, ...],
    issued_at: float,
    ttl: float,
    sequence: int,
) -> Announcement:
    unsigned = Announcement(
        operator=operator,
        peer_id=peer_id_from_ed25519(identity.public_bytes),
        public_key=identity.public_bytes,
        models=models,
        spare_slots=spare_slots,
        policy=policy,
        addrs=addrs,
        issued_at=issued_at,
        ttl=ttl,
        sequence=sequence,
    )
    return dataclasses.replace(unsigned, signature=identity.sign(signed_payload(unsigned)))


def check_announcement(data: bytes, *, origin: str | None, now: float) -> Announcement:
    """Decode and validate one gossiped announcement.

    Args:
        data: the gossip payload.
        origin: the gossip message's signed author, which must be the announced peer
            (``None`` skips that check, for announcements not received by gossip).
        now: the current Unix time.

    Raises:
        AnnouncementRejected: oversized, malformed, unknown version, bad signature, key
            not matching the peer id, author not the peer, too many models, issued in the
            future, expired, with an unreasonable ttl, or a time, price or load time that
            is not a finite number (or is negative).
    """
    if len(data) > MAX_ANNOUNCEMENT_BYTES:
        raise AnnouncementRejected("oversized", f"{len(data)} bytes")
    try:
        ann = decode(data, max_size=MAX_ANNOUNCEMENT_BYTES)
    except ProtocolError as exc:
        raise AnnouncementRejected("malformed", str(exc)) from None
    if not isinstance(ann, Announcement):
        raise AnnouncementRejected("malformed", f"a {type(ann).__name__}, not an announcement")
    if ann.format_version != ANNOUNCEMENT_VERSION:
        raise AnnouncementRejected("version", f"format {ann.format_version}")
    try:
        key_peer = peer_id_from_ed25519(ann.public_key)
    except ValueError:
        raise AnnouncementRejected("bad_key") from None
    if key_peer != ann.peer_id:
        raise AnnouncementRejected("bad_key", "public key does not match the peer id")
    if origin is not None and origin != ann.peer_id:
        raise AnnouncementRejected("impersonation", f"published by {origin}, announces {ann.peer_id}")
    if not verify_signature(ann.public_key, ann.signature, signed_payload(ann)):
        raise AnnouncementRejected("bad_signature")
    if len(ann.models) > MAX_MODELS:
        raise AnnouncementRejected("oversized", f"{len(ann.models)} models")
    if not 0 < ann.ttl <= MAX_TTL:
        raise AnnouncementRejected("bad_ttl", f"{ann.ttl}")
    if not math.isfinite(ann.issued_at):
        raise AnnouncementRejected("bad_figures", f"issued_at {ann.issued_at}")
    for m in ann.models:
        # A NaN compares false with every ceiling and every other price (a price cap it
        # would pass, an ordering it would upset); a negative price ranks first.
        figures = (m.price_input, m.price_output, 0.0 if m.load_time_s is None else m.load_time_s)
        if not all(math.isfinite(v) and v >= 0 for v in figures):
            raise AnnouncementRejected("bad_figures", f"model {m.model_id!r}: a price or load time not a number >= 0")
    if ann.issued_at > now + MAX_CLOCK_SKEW:
        raise AnnouncementRejected("future", f"issued {ann.issued_at - now:.0f}s ahead")
    if ann.issued_at + ann.ttl <= now:
        raise AnnouncementRejected("stale", f"expired {now - ann.issued_at - ann.ttl:.0f}s ago")
    return ann


def usable_models(ann: Announcement) -> tuple[Announcement, list[str]]:
    """``ann`` less the models whose ids no request could name here (longer than
    :data:`~helexa.protocol.model.MAX_MODEL_ID`, or unprintable:
    :func:`~helexa.protocol.model.model_id_problem`), and why they went (empty, and ``ann``
    itself, when none did). They are dropped rather than the announcement refused: the
    rest of the peer's offer stays usable. Its signature was checked on the whole."""
    problems = [p for m in ann.models if (p := model_id_problem(m.model_id)) is not None]
    if not problems:
        return ann, []
    kept = tuple(m for m in ann.models if model_id_problem(m.model_id) is None)
    return dataclasses.replace(ann, models=kept), problems


def addr_problem(addr: object) -> str | None:
    """Why ``addr`` cannot be a peer's multiaddr here (not a string of 1 to
    :data:`~helexa.protocol.model.MAX_NAME` printable characters starting with ``/``), or None."""
    if not isinstance(addr, str) or not addr.startswith("/") or len(addr) > MAX_NAME or not addr.isprintable():
        shown = repr(addr[:64]) if isinstance(addr, str) else type(addr).__name__
        return f"the address {shown} is not a multiaddr of at most {MAX_NAME} printable characters"
    return None


def bounded_peer(ann: Announcement) -> tuple[Announcement, list[str]]:
    """``ann`` with its operator name and addresses as this cortex keeps them, and what was
    wrong (empty, and ``ann`` itself, when nothing was): the operator name, which consoles,
    the ledger and logs show, kept to :data:`~helexa.protocol.model.MAX_NAME` printable
    characters (:func:`~helexa.protocol.model.bounded_text`: cut with a mark, an unprintable
    character as its escape); each address :func:`addr_problem` refuses dropped, and past
    :data:`MAX_ADDRS` the rest (they are dialled). Bounded rather than the announcement
    refused: a peer of an earlier release, which bounds neither, stays usable."""
    operator, addrs = ann.operator, ann.addrs
    if (len(operator) <= MAX_NAME and operator.isprintable() and len(addrs) <= MAX_ADDRS
            and all(addr_problem(a) is None for a in addrs)):
        return ann, []
    problems: list[str] = []
    if (kept := bounded_text(operator, MAX_NAME)) is not operator:
        problems.append(f"its operator name {operator[:64]!r} is over {MAX_NAME} characters or unprintable: cut")
    bad = [p for a in addrs[:MAX_ADDRS] if (p := addr_problem(a)) is not None]
    if bad:
        problems.append(f"{bad[0]}: dropped")
        if len(bad) > 1:
            problems.append(f"{len(bad) - 1} more address(es) dropped")
    if len(addrs) > MAX_ADDRS:
        problems.append(f"it gave {len(addrs)} addresses, at most {MAX_ADDRS} are taken")
    good = tuple(a for a in addrs[:MAX_ADDRS] if addr_problem(a) is None)
    return dataclasses.replace(ann, operator=kept, addrs=good), problems


@dataclass(frozen=True, slots=True)
class PeerOffer:
    """One peer's offer of one model, as a routing candidate."""

    peer_id: str
    operator: str
    model: OfferedModel
    spare_slots: int
    expires_at: float


class PeerTable:
    """What live peers offer, from their latest valid announcements."""

    def __init__(self, self_peer_id: str | None = None, *, unavailable_grace: float = 30.0) -> None:
        self._self = self_peer_id
        self._latest: dict[str, Announcement] = {}
        self.recent = OfferMemory(unavailable_grace)
        """Models whose offers expired lately (:mod:`.offer_memory`)."""
        self.rejected: dict[str, int] = {}
        self._warned: OrderedDict[str, None] = OrderedDict()  # peers whose dropped model ids were logged
        self.version = 0
        """Bumped whenever the set of announcements changes (for callers' memos)."""

    def update(self, ann: Announcement, now: float) -> bool:
        """Take a validated announcement; False (ignored) for our own, a replay or an
        out-of-order older one, or an expired one."""
        if ann.peer_id == self._self or ann.issued_at + ann.ttl <= now:
            return False
        prev = self._latest.get(ann.peer_id)
        if prev is not None and ann.sequence <= prev.sequence:
            self.rejected["replay"] = self.rejected.get("replay", 0) + 1
            return False
        ann, problems = usable_models(ann)
        ann, odd = bounded_peer(ann)
        if problems:
            self.rejected["bad_model_id"] = self.rejected.get("bad_model_id", 0) + len(problems)
        if odd:
            self.rejected["bad_peer_field"] = self.rejected.get("bad_peer_field", 0) + 1
        if (problems or odd) and ann.peer_id not in self._warned:
            self._warned[ann.peer_id] = None
            if len(self._warned) > _WARNED_PEERS:
                self._warned.popitem(last=False)
            if problems:
                log.warning("federation: peer %s (operator %r) offers %d model(s) no request could name, dropped "
                            "(logged once a peer): %s", ann.peer_id, ann.operator[:64], len(problems), problems[0])
            if odd:
                log.warning("federation: peer %s (operator %r): %s (logged once a peer)", ann.peer_id,
                            ann.operator[:64], "; ".join(odd))
        self._latest[ann.peer_id] = ann
        self.version += 1
        offered = list(ann.models) if ann.policy.serves_peers else []
        before = [m.model_id for m in prev.models] if prev is not None and prev.policy.serves_peers else []
        if ann.policy.serves_peers and not offered and before:
            # Nothing offered at all while still serving peers: its capacity went to zero (its
            # neurons gone, or not back yet after a restart), not a withdrawal: for the grace,
            # "temporarily unavailable" (503), as when its offer expires, not "unknown" (404).
            self.recent.lapsed(ann.peer_id, before, now)
            return True
        self.recent.offered(ann.peer_id, offered, ann.issued_at + ann.ttl,
                            withdrawn=set(before) - {m.model_id for m in offered}, operator=ann.operator)
        return True

    def ingest(self, data: bytes, *, origin: str | None, now: float) -> Announcement | None:
        """Validate and take ``data``; None if it was rejected (counted in ``rejected``)."""
        try:
            ann = check_announcement(data, origin=origin, now=now)
        except AnnouncementRejected as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            return None
        return self._latest[ann.peer_id] if self.update(ann, now) else None  # as kept (:func:`bounded_peer`)

    def expire(self, now: float) -> list[str]:
        """Forget peers whose announcement expired; returns their ids."""
        gone = [p for p, a in self._latest.items() if a.issued_at + a.ttl <= now]
        for p in gone:
            del self._latest[p]
        self.recent.forget(now)
        if gone:
            self.version += 1
        return gone

    def unavailable(self, model_id: str, now: float) -> bool:
        """Whether ``model_id`` is offered by no live peer now but was within the grace
        (a partition, a peer restarting): temporarily unavailable rather than unknown."""
        return not self.offers(model_id, now) and self.recent.unavailable(model_id, now)

    def get(self, peer_id: str) -> Announcement | None:
        return self._latest.get(peer_id)

    def peers(self) -> list[Announcement]:
        return list(self._latest.values())

    def offers(self, model_id: str, now: float, *, workload: Workload | None = None) -> list[PeerOffer]:
        """Every live peer's offer of ``model_id``, unordered."""
        out = []
        for ann in self._latest.values():
            if ann.issued_at + ann.ttl <= now or not ann.policy.serves_peers:
                continue
            for m in ann.models:
                if m.model_id == model_id and (workload is None or workload in m.workloads):
                    out.append(PeerOffer(ann.peer_id, ann.operator, m, ann.spare_slots, ann.issued_at + ann.ttl))
        return out

    def candidates(
        self, model_id: str, now: float, policy: AskPolicy, *,
        workload: Workload | None = None, exclude: frozenset[str] = frozenset(),
    ) -> list[PeerOffer]:
        """Offers of ``model_id`` that ``policy`` allows, best first: warm before cold,
        then cheaper (output price, then input), then more spare capacity, then the
        faster cold load."""
        allowed = [
            o for o in self.offers(model_id, now, workload=workload)
            if o.peer_id not in exclude and policy.allows_peer(o.peer_id, o.operator) and policy.allows_price(o.model)
        ]
        allowed.sort(key=lambda o: (
            not o.model.warm,
            o.model.price_output,
            o.model.price_input,
            -o.spare_slots,
            o.model.load_time_s if o.model.load_time_s is not None else float("inf"),
            o.peer_id,
        ))
        return allowed

    def models(self, now: float) -> dict[str, list[PeerOffer]]:
        """Every model some live peer offers, with its offers (for ``/v1/models``)."""
        out: dict[str, list[PeerOffer]] = {}
        for ann in self._latest.values():
            if ann.issued_at + ann.ttl <= now or not ann.policy.serves_peers:
                continue
            for m in ann.models:
                out.setdefault(m.model_id, []).append(
                    PeerOffer(ann.peer_id, ann.operator, m, ann.spare_slots, ann.issued_at + ann.ttl))
        return out
