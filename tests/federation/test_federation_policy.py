from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation.policy import Admission, AskPolicy, Outbound, ServePolicy, TokenBucket


def test_token_bucket_refills_at_its_rate():
    b = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert b.take(0.0) and b.take(0.0)
    assert not b.take(0.0)
    assert b.wait_time(0.0) == 0.5
    assert b.take(0.5)
    assert not b.take(0.5)


def test_deny_list_wins_over_allow_list():
    p = ServePolicy(allow_operators=frozenset({"acme"}), deny_peers=frozenset({"P2"}))
    assert p.permits("P1", "acme")
    assert not p.permits("P2", "acme")
    assert not p.permits("P3", "other")


def test_open_policy_serves_everyone_but_a_closed_one_nobody():
    assert ServePolicy().permits("P", "x")
    assert not ServePolicy(serve_peers=False).permits("P", "x")


def test_admission_enforces_concurrency_then_rate():
    adm = Admission(ServePolicy(max_concurrent_per_peer=1, rate_per_second=1.0, burst=1))
    assert adm.admit("P", "op", "m", 0.0).admitted
    busy = adm.admit("P", "op", "m", 0.0)
    assert (busy.admitted, busy.code) == (False, "busy")
    adm.release("P")
    limited = adm.admit("P", "op", "m", 0.1)
    assert (limited.admitted, limited.code) == (False, "rate_limited")
    assert limited.retry_after == 0.9
    assert adm.admit("P", "op", "m", 1.0).admitted


def test_admission_refuses_unoffered_models_and_denied_peers():
    adm = Admission(ServePolicy(models=frozenset({"a"}), deny_operators=frozenset({"evil"})))
    assert adm.admit("P", "op", "b", 0).code == "model_not_offered"
    assert adm.admit("P", "evil", "a", 0).code == "denied"
    assert Admission(ServePolicy(serve_peers=False)).admit("P", "op", "a", 0).code == "not_serving"


def test_offer_is_filtered_by_the_models_offered_to_peers():
    offer = [OfferedModel("a", True), OfferedModel("b", True)]
    assert [m.model_id for m in ServePolicy(models=frozenset({"b"})).filter_offer(offer)] == ["b"]
    assert ServePolicy(serve_peers=False).filter_offer(offer) == ()


def test_ask_policy_never_listed_and_price_ceiling():
    assert not AskPolicy(outbound=Outbound.NEVER).allows_peer("P", "op")
    listed = AskPolicy(outbound=Outbound.LISTED, operators=frozenset({"acme"}))
    assert listed.allows_peer("P", "acme") and not listed.allows_peer("P", "other")
    ceiling = AskPolicy(max_price_output=2.0)
    assert ceiling.allows_price(OfferedModel("m", True, price_output=2.0))
    assert not ceiling.allows_price(OfferedModel("m", True, price_output=2.5))


def test_a_reloaded_policy_applies_to_the_next_request_and_keeps_those_in_flight():
    adm = Admission(ServePolicy(rate_per_second=1.0, burst=1, max_concurrent_per_peer=2))
    assert adm.admit("p1", "op", "m", 0.0).admitted
    assert adm.admit("p1", "op", "m", 0.0).code == "rate_limited"
    adm.set_policy(ServePolicy(rate_per_second=10.0, burst=5, max_concurrent_per_peer=2))
    assert adm.in_flight == {"p1": 1}  # the request admitted before stays counted
    assert adm.admit("p1", "op", "m", 0.0).admitted  # a fresh bucket at the new rate
    assert adm.admit("p1", "op", "m", 0.0).code == "busy"
    adm.set_policy(ServePolicy(deny_operators=frozenset({"op"})))
    assert adm.admit("p2", "op", "m", 0.0).code == "denied"


def test_peers_that_stopped_asking_leave_no_rate_bucket_behind():
    """Peer ids cost nothing to make: each one that ever asked kept its rate bucket, for
    good. A refilled bucket is a new one, so those are forgotten; a peer still limited
    keeps its own (the limit holds)."""
    adm = Admission(ServePolicy(max_concurrent_per_peer=100, rate_per_second=1.0, burst=1))
    for i in range(20_000):
        assert adm.admit(f"peer-{i}", "op", "a", i * 0.01).admitted
        adm.release(f"peer-{i}")
    assert len(adm._buckets) <= 4096
    assert adm.admit("peer-19999", "op", "a", 199.995).code == "rate_limited"  # the recent ones are kept
    assert adm.admit("peer-19950", "op", "a", 199.995).code == "rate_limited"
