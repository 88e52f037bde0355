"""The per-peer gossip rate limit, as pure bookkeeping at exact times."""

from helexa.mesh.gossip_limit import GossipLimiter


def test_a_peer_gets_its_burst_then_its_rate_and_others_are_untouched() -> None:
    limit = GossipLimiter(per_second=2.0, burst=3)
    assert [limit.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.dropped == {"a": 1}
    assert limit.allow("b", 0.0)  # another peer has its own bucket
    assert not limit.allow("a", 0.25)  # half a token back
    assert limit.allow("a", 0.5) and not limit.allow("a", 0.5)
    assert [limit.allow("a", 10.0) for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more
    assert limit.dropped == {"a": 4}


def test_it_remembers_a_bounded_number_of_peers() -> None:
    limit = GossipLimiter(per_second=1.0, burst=1, capacity=2)
    for peer in "abc":
        limit.allow(peer, 0.0)
        limit.allow(peer, 0.0)
    assert set(limit.dropped) == {"b", "c"}
    assert limit.allow("a", 0.0)  # forgotten, so a full bucket again
