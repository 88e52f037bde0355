"""The ring of recent routing decisions the console shows."""

from helexa.protocol import WorkloadClass
from helexa.roles.cortex.routing_log import RoutingLog
from helexa.roles.cortex.scheduler import RoutingDecision


def decision(model: str, **kw) -> RoutingDecision:
    return RoutingDecision(model, WorkloadClass.CHAT_INTERACTIVE, ("n1",), **kw)


def test_the_newest_decision_comes_first_with_its_cache_wait_and_evictions() -> None:
    log = RoutingLog()
    log.record(decision("a", mode="cold_load", waited=2.34567, evictions=("b",), reason="loaded"), "n1", 100.0)
    log.record(decision("a", cache="hit", matched=3, blocks=4, reason="holds 3/4 prompt blocks"), "n2", 101.0)
    newest, oldest = log.view()
    assert newest == {"at": 101.0, "model": "a", "node": "n2", "mode": "local", "cache": "hit", "matched": 3,
                      "blocks": 4, "waited": None, "evictions": [], "reason": "holds 3/4 prompt blocks"}
    assert oldest["mode"] == "cold_load" and oldest["waited"] == 2.346 and oldest["evictions"] == ["b"]


def test_the_ring_is_bounded_and_a_view_can_be_limited() -> None:
    log = RoutingLog(capacity=3)
    for i in range(5):
        log.record(decision(f"m{i}"), None, float(i))
    assert len(log) == 3
    assert [d["model"] for d in log.view()] == ["m4", "m3", "m2"]
    assert [d["model"] for d in log.view(limit=1)] == ["m4"]
    assert log.view()[0]["node"] is None


def test_a_name_nothing_serves_is_kept_cut_and_masked_and_a_catalogue_name_whole() -> None:
    log = RoutingLog()
    catalogued = "hf.co/some-org/" + "a-long-model-name-" * 5
    log.record(decision(catalogued), "n1", 1.0)
    log.record(decision("sk-hlx-0123456789abcdef_" + "S" * 43, mode="none"), None, 2.0, known=False)
    log.record(decision("m" * 1_000_000, mode="none"), None, 3.0, known=False)
    long_name, key, whole = (d["model"] for d in log.view())
    assert whole == catalogued  # the operator's own name, whole (the page matches rows by it)
    assert key == "sk-hlx-***"
    assert len(long_name) == 64 and long_name.endswith("\u2026")
