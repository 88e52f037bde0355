import dataclasses

import pytest

from helexa.mesh import peer_id_from_ed25519
from helexa.protocol import encode
from helexa.protocol.federation import Announcement, OfferedModel, PolicySummary
from helexa.roles.cortex.federation.announcements import (
    AnnouncementRejected,
    PeerTable,
    check_announcement,
    sign_announcement,
)
from helexa.roles.cortex.federation.policy import AskPolicy, Outbound

from conftest import new_identity

NOW = 1_000_000.0


def announce(ident, *, models=(OfferedModel("m", True),), spare=1, issued_at=NOW, ttl=30.0, seq=1, operator="op"):
    return sign_announcement(ident, operator=operator, models=tuple(models), spare_slots=spare,
                             policy=PolicySummary(), addrs=("/ip4/127.0.0.1/tcp/1",), issued_at=issued_at,
                             ttl=ttl, sequence=seq)


def test_a_signed_announcement_validates():
    ident = new_identity()
    ann = announce(ident)
    assert check_announcement(encode(ann), origin=ann.peer_id, now=NOW) == ann


@pytest.mark.parametrize("change, reason", [
    (lambda a: dataclasses.replace(a, operator="someone else"), "bad_signature"),
    (lambda a: dataclasses.replace(a, models=(OfferedModel("m", True, price_output=0.0),
                                              OfferedModel("n", True))), "bad_signature"),
    (lambda a: dataclasses.replace(a, public_key=new_identity().public_bytes), "bad_key"),
    (lambda a: dataclasses.replace(a, format_version=2), "version"),
])
def test_forged_announcements_are_rejected(change, reason):
    ann = change(announce(new_identity()))
    with pytest.raises(AnnouncementRejected) as err:
        check_announcement(encode(ann), origin=ann.peer_id, now=NOW)
    assert err.value.reason == reason


def test_announcement_republished_by_another_peer_is_rejected():
    ann = announce(new_identity())
    with pytest.raises(AnnouncementRejected) as err:
        check_announcement(encode(ann), origin=peer_id_from_ed25519(new_identity().public_bytes), now=NOW)
    assert err.value.reason == "impersonation"


def test_stale_future_and_overlong_announcements_are_rejected():
    ident = new_identity()
    for ann, reason in [
        (announce(ident, issued_at=NOW - 31), "stale"),
        (announce(ident, issued_at=NOW + 3600), "future"),
        (announce(ident, ttl=10_000), "bad_ttl"),
    ]:
        with pytest.raises(AnnouncementRejected) as err:
            check_announcement(encode(ann), origin=None, now=NOW)
        assert err.value.reason == reason


def test_oversized_and_garbage_payloads_are_rejected():
    with pytest.raises(AnnouncementRejected) as err:
        check_announcement(b"\x00" * 70_000, origin=None, now=NOW)
    assert err.value.reason == "oversized"
    with pytest.raises(AnnouncementRejected):
        check_announcement(b"not msgpack", origin=None, now=NOW)


def test_table_drops_replays_and_expires_peers():
    ident = new_identity()
    table = PeerTable()
    assert table.ingest(encode(announce(ident, seq=5)), origin=None, now=NOW)
    assert table.ingest(encode(announce(ident, seq=5)), origin=None, now=NOW) is None
    assert table.ingest(encode(announce(ident, seq=4)), origin=None, now=NOW) is None
    assert table.rejected["replay"] == 2
    assert table.offers("m", NOW + 29)
    assert table.offers("m", NOW + 30) == []
    assert table.expire(NOW + 30) == [peer_id_from_ed25519(ident.public_bytes)]
    assert table.peers() == []


def test_best_peer_is_warm_then_cheap_then_least_loaded():
    table = PeerTable()
    cold_cheap = new_identity()
    warm_pricey = new_identity()
    warm_cheap_busy = new_identity()
    warm_cheap_idle = new_identity()
    table.ingest(encode(announce(cold_cheap, models=[OfferedModel("m", False, 5.0, 0.1, 0.1)])), origin=None, now=NOW)
    table.ingest(encode(announce(warm_pricey, models=[OfferedModel("m", True, None, 1.0, 9.0)])), origin=None, now=NOW)
    table.ingest(encode(announce(warm_cheap_busy, spare=0, models=[OfferedModel("m", True, None, 1.0, 2.0)])),
                 origin=None, now=NOW)
    table.ingest(encode(announce(warm_cheap_idle, spare=4, models=[OfferedModel("m", True, None, 1.0, 2.0)])),
                 origin=None, now=NOW)
    order = [o.peer_id for o in table.candidates("m", NOW, AskPolicy())]
    ids = [peer_id_from_ed25519(i.public_bytes) for i in (warm_cheap_idle, warm_cheap_busy, warm_pricey, cold_cheap)]
    assert order == ids
    capped = table.candidates("m", NOW, AskPolicy(max_price_output=5.0))
    assert [o.peer_id for o in capped] == [ids[0], ids[1], ids[3]]
    assert table.candidates("m", NOW, AskPolicy(outbound=Outbound.NEVER)) == []
    listed = AskPolicy(outbound=Outbound.LISTED, peers=frozenset({ids[2]}))
    assert [o.peer_id for o in table.candidates("m", NOW, listed)] == [ids[2]]


def test_peers_that_do_not_serve_are_not_candidates():
    ident = new_identity()
    ann = sign_announcement(ident, operator="op", models=(OfferedModel("m", True),), spare_slots=1,
                            policy=PolicySummary(serves_peers=False), addrs=(), issued_at=NOW, ttl=30, sequence=1)
    table = PeerTable()
    table.ingest(encode(ann), origin=None, now=NOW)
    assert table.candidates("m", NOW, AskPolicy()) == []
    assert isinstance(ann, Announcement)


@pytest.mark.parametrize("models, issued_at", [
    ((OfferedModel("m", True, price_output=float("nan")),), NOW),
    ((OfferedModel("m", True, price_input=float("inf")),), NOW),
    ((OfferedModel("m", False, load_time_s=-1.0),), NOW),
    ((OfferedModel("m", False, load_time_s=float("nan")),), NOW),
    ((OfferedModel("m", True),), float("nan")),
])
def test_announcements_with_figures_that_are_not_numbers_are_rejected(models, issued_at):
    # A NaN price passes every price ceiling (NaN > cap is false) and a negative one ranks
    # first; a NaN issued_at never expires.
    ann = announce(new_identity(), models=models, issued_at=issued_at)
    with pytest.raises(AnnouncementRejected) as err:
        check_announcement(encode(ann), origin=ann.peer_id, now=NOW)
    assert err.value.reason == "bad_figures"


def test_a_model_whose_offer_expired_is_unavailable_for_the_grace_then_forgotten():
    """A partition: the peer's last offer expires; for ``unavailable_grace`` after that the
    model is temporarily unavailable (not unknown), then forgotten."""
    ident = new_identity()
    table = PeerTable(unavailable_grace=20.0)
    table.update(announce(ident, ttl=30.0), NOW)
    assert table.offers("m", NOW + 29) and not table.unavailable("m", NOW + 29)  # offered: not "unavailable"
    assert table.unavailable("m", NOW + 30) and table.unavailable("m", NOW + 49.9)
    assert not table.unavailable("m", NOW + 50) and not table.unavailable("other", NOW + 30)
    table.expire(NOW + 49)
    assert len(table.recent) == 1
    table.expire(NOW + 50)
    assert len(table.recent) == 0


def test_a_model_its_peer_withdrew_is_unknown_at_once():
    """No partition: the peer's next announcement no longer offers it (unloaded, a policy
    change), so it is not remembered for that peer."""
    ident = new_identity()
    table = PeerTable(unavailable_grace=20.0)
    table.update(announce(ident, models=(OfferedModel("m", True), OfferedModel("n", True)), seq=1), NOW)
    table.update(announce(ident, models=(OfferedModel("n", True),), issued_at=NOW + 5, seq=2), NOW + 5)
    assert not table.unavailable("m", NOW + 6) and not table.offers("m", NOW + 6)
    assert table.unavailable("n", NOW + 36)


def test_a_peer_whose_offer_went_empty_leaves_its_models_unavailable_for_the_grace_not_unknown():
    """Its capacity went to zero (its neurons gone, or not back yet after it restarted: a
    cortex announces before its neurons rejoin): still serving peers but offering nothing.
    Before, that was taken for a withdrawal of every model, and its clients got 404
    model_not_found (not retried by SDKs) while it restarted."""
    ident = new_identity()
    table = PeerTable(unavailable_grace=20.0)
    table.update(announce(ident, models=(OfferedModel("m", True),), seq=1), NOW)
    table.update(announce(ident, models=(), issued_at=NOW + 5, seq=2), NOW + 5)
    assert not table.offers("m", NOW + 6) and table.unavailable("m", NOW + 6)
    table.update(announce(ident, models=(), issued_at=NOW + 10, seq=3), NOW + 10)  # still empty: the same grace
    assert table.unavailable("m", NOW + 24.9) and not table.unavailable("m", NOW + 25)
    table.update(announce(ident, models=(OfferedModel("m", True),), issued_at=NOW + 30, seq=4), NOW + 30)
    assert table.offers("m", NOW + 31) and not table.unavailable("m", NOW + 31)  # back


def test_the_memory_of_expired_offers_is_bounded():
    from helexa.roles.cortex.federation.offer_memory import OfferMemory

    memory = OfferMemory(grace=60.0, capacity=3)
    for i in range(10):
        memory.offered("p", [OfferedModel(f"m{i}", True)], NOW + i)
    assert len(memory) == 3
    assert [memory.unavailable(f"m{i}", NOW + 10) for i in (6, 7, 8, 9)] == [False, True, True, True]


def test_model_ids_no_request_could_name_are_dropped_from_a_peers_offer_and_logged_once(caplog):
    """Only the 64 KiB announcement bounded a peer's model ids: one could offer a 60,000
    character name, or one that forges log lines, into ``/v1/models`` and the console. They
    are dropped (the rest of its offer stands), logged once for the peer."""
    ident = new_identity()
    table = PeerTable()
    models = (OfferedModel("m", True), OfferedModel("x" * 60_000, True), OfferedModel("a\nb", True),
              OfferedModel("n" * 256, True))
    with caplog.at_level("WARNING", logger="helexa.roles.cortex.federation.announcements"):
        for seq in (1, 2, 3):
            ann = announce(ident, models=models, seq=seq, issued_at=NOW + seq)
            assert table.ingest(encode(ann), origin=ann.peer_id, now=NOW + seq) is not None
    assert set(table.models(NOW + 4)) == {"m", "n" * 256}
    assert not table.offers("x" * 60_000, NOW + 4) and not table.offers("a\nb", NOW + 4)
    assert table.rejected["bad_model_id"] == 6
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "2 model(s)" in warned[0] and "60000 characters long" in warned[0]
    assert "\n" not in warned[0] and len(warned[0]) < 1000
    table.expire(NOW + 40)
    assert not table.unavailable("x" * 60_000, NOW + 40) and table.unavailable("m", NOW + 40)


def test_a_peers_operator_name_and_addresses_are_bounded_and_logged_once(caplog):
    """Only the 64 KiB announcement bounded a peer's operator name (shown by consoles, the
    ledger and logs) and its addresses (dialled): a 50,000 character name, one that forges
    log lines, or thousands of addresses. The name is cut at 256 printable characters with a
    mark (an unprintable one as its escape); a bad address is dropped, past 32 the rest;
    the peer's offer stands, logged once. An honest announcement is kept as it is."""
    ident, honest = new_identity(), new_identity()
    table = PeerTable()
    good = "/ip4/10.0.0.1/tcp/4001"
    addrs = (good, "x" * 3000, "/ip4/1.2.3.4/tcp/1\n12:00 forged", "not/a/multiaddr",
             *(f"/ip4/10.0.0.{i}/tcp/1" for i in range(100)))
    with caplog.at_level("WARNING", logger="helexa.roles.cortex.federation.announcements"):
        for seq, operator in ((1, "o" * 50_000), (2, "evil\n12:00:00 WARNING forged")):
            unsigned = announce(ident, seq=seq, issued_at=NOW + seq, operator=operator)
            ann = sign_announcement(ident, operator=operator, models=unsigned.models, spare_slots=1,
                                    policy=PolicySummary(), addrs=addrs, issued_at=NOW + seq, ttl=30.0, sequence=seq)
            kept = table.ingest(encode(ann), origin=ann.peer_id, now=NOW + seq)
            assert kept is not None and kept is table.get(ann.peer_id)
            if seq == 1:
                assert kept.operator == "o" * 256 + "... [cut from 50000 characters]"
            assert kept.addrs[0] == good and len(kept.addrs) <= 32
            assert all(a.startswith("/") and a.isprintable() and len(a) <= 256 for a in kept.addrs)
        plain = announce(honest, operator="Acme GmbH")
        assert table.ingest(encode(plain), origin=plain.peer_id, now=NOW) == plain
    assert table.get(ident_peer(ident)).operator == "evil\\n12:00:00 WARNING forged"
    assert [o.operator for o in table.offers("m", NOW + 3)].count("evil\\n12:00:00 WARNING forged") == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "\n" not in warned[0] and len(warned[0]) < 2000, warned
    assert "operator name" in warned[0] and "dropped" in warned[0] and "at most 32" in warned[0]


def ident_peer(ident) -> str:
    return peer_id_from_ed25519(ident.public_bytes)
