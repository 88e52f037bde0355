"""The direct channel's ticket book and grant wire, without I/O."""

import pytest

from helexa.mesh.direct_tickets import GRANT_SIZE, Grant, TicketBook
from helexa.protocol import DecodeError

NONCE = b"n" * 32


def test_a_grant_round_trips_and_nothing_else_decodes():
    grant = TicketBook(4242, ttl=600, max_tickets=8).issue("peer-a", 0.0)
    assert Grant.decode(grant.encode()) == grant and len(grant.encode()) == GRANT_SIZE
    assert grant.port == 4242 and grant.ttl == 600 and len(grant.secret) == 32
    for bad in (b"", grant.encode()[:-1], grant.encode() + b"x", b"XXXX" + grant.encode()[4:]):
        with pytest.raises(DecodeError):
            Grant.decode(bad)


def test_a_ticket_opens_connections_for_its_peer_only_until_it_expires():
    book = TicketBook(1, ttl=10, max_tickets=8)
    grant = book.issue("peer-a", 100.0)
    assert book.redeem(grant.ticket_id, b"1" * 32, 105.0) == ("peer-a", grant.secret)
    assert book.redeem(grant.ticket_id, b"2" * 32, 109.9) == ("peer-a", grant.secret)
    assert book.redeem(grant.ticket_id, b"3" * 32, 110.0) is None
    assert len(book) == 0  # an expired ticket is dropped when presented
    assert book.redeem(b"x" * 16, b"4" * 32, 100.0) is None


def test_a_replayed_nonce_is_refused():
    book = TicketBook(1, ttl=10, max_tickets=8)
    grant = book.issue("peer-a", 0.0)
    assert book.redeem(grant.ticket_id, NONCE, 1.0) is not None
    assert book.redeem(grant.ticket_id, NONCE, 2.0) is None
    assert book.redeem(grant.ticket_id, b"m" * 32, 2.0) is not None


def test_a_ticket_is_used_up_after_its_connections():
    book = TicketBook(1, ttl=10, max_tickets=8, max_uses=2)
    grant = book.issue("peer-a", 0.0)
    assert grant.max_uses == 2
    assert book.redeem(grant.ticket_id, b"1" * 32, 0.0) and book.redeem(grant.ticket_id, b"2" * 32, 0.0)
    assert book.redeem(grant.ticket_id, b"3" * 32, 0.0) is None


def test_the_book_is_bounded_per_peer_and_in_all():
    book = TicketBook(1, ttl=10, max_tickets=3, per_peer=2)
    a1, a2, a3 = (book.issue("a", 0.0) for _ in range(3))
    assert book.redeem(a1.ticket_id, NONCE, 0.0) is None  # a's oldest made room for its newest
    assert book.redeem(a2.ticket_id, NONCE, 0.0) and book.redeem(a3.ticket_id, NONCE, 0.0)
    b1, b2 = book.issue("b", 0.0), book.issue("b", 0.0)
    assert len(book) == 3
    assert book.redeem(a2.ticket_id, b"m" * 32, 0.0) is None  # the oldest of all went first
    assert book.redeem(b1.ticket_id, NONCE, 0.0) and book.redeem(b2.ticket_id, NONCE, 0.0)


def test_issuing_drops_expired_tickets():
    book = TicketBook(1, ttl=10, max_tickets=8)
    book.issue("a", 0.0)
    book.issue("b", 5.0)
    book.issue("c", 12.0)
    assert len(book) == 2


def test_a_ticket_remembers_only_its_recent_nonces():
    # Bounded memory per ticket; an older replay still fails, at its first record
    # (the listener's fresh nonce gives it other keys: test_direct_session.py).
    from helexa.mesh.direct_tickets import RECENT_NONCES

    book = TicketBook(1, ttl=10, max_tickets=8)
    grant = book.issue("a", 0.0)
    nonces = [i.to_bytes(32, "big") for i in range(RECENT_NONCES + 1)]
    for n in nonces:
        assert book.redeem(grant.ticket_id, n, 0.0)
    assert book.redeem(grant.ticket_id, nonces[-1], 0.0) is None
    assert book.redeem(grant.ticket_id, nonces[1], 0.0) is None
    assert book.redeem(grant.ticket_id, nonces[0], 0.0) is not None
