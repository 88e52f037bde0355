"""The web pages' pure parts: console sessions, the traffic ring, the fleet feed (under
the autojump clock) and a portal's theme colours."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from helexa.protocol.hardware import Hardware, NeuronDescriptor, NeuronMetrics
from helexa.protocol.model import ModelState, ModelStatus
from helexa.roles.cortex.portal.config import PortalConfig
from helexa.roles.cortex.fleet import Fleet, Health
from helexa.roles.cortex.portal.portal import Portal
from helexa.roles.cortex.web.fleet_feed import FleetFeed, finite
from helexa.roles.cortex.web.app import _SECURITY_HEADERS
from helexa.roles.cortex.web.portal_site import colors, logo_src
from helexa.roles.cortex.web.sessions import SHOW_FOR, Sessions
from helexa.roles.cortex.web.traffic import BUCKET, SPAN, Traffic


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_session_is_kept_only_as_the_hash_of_its_secret_and_ends_with_the_admin_token() -> None:
    clock = Clock()
    sessions = Sessions(ttl=60, clock=clock)
    secret, session = sessions.open("token-1")
    assert secret not in repr(sessions.__dict__) and "token-1" not in repr(sessions.__dict__)
    assert hashlib.sha256(secret.encode()).digest() in sessions._by_digest
    assert sessions.find(secret, "token-1") is session
    assert sessions.find(secret + "x", "token-1") is None
    assert sessions.find(secret, "token-2") is None  # the token was rotated: the session is over
    assert sessions.find(secret, "token-1") is None and len(sessions) == 0


def test_a_session_expires_and_the_csrf_token_must_match() -> None:
    clock = Clock()
    sessions = Sessions(ttl=60, clock=clock)
    secret, session = sessions.open("t")
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("nope") and not session.csrf_ok(None)
    clock.t += 59
    assert sessions.find(secret, "t") is session
    clock.t += 1
    assert sessions.find(secret, "t") is None


def test_a_new_key_waits_in_its_session_for_one_page_and_a_minute_at_most() -> None:
    clock = Clock()
    _, session = Sessions(clock=clock).open("t")
    session.keep_for_showing({"key": "sk-hlx-1"}, clock.t)
    assert session.hand_over(clock.t + 1) == {"key": "sk-hlx-1"}
    assert session.hand_over(clock.t + 2) is None  # shown once
    session.keep_for_showing({"key": "sk-hlx-2"}, clock.t)
    assert session.hand_over(clock.t + SHOW_FOR) is None  # nobody came for it: gone
    assert session._new_key is None


def test_sessions_are_bounded() -> None:
    sessions = Sessions(limit=3, clock=Clock())
    secrets = [sessions.open("t")[0] for _ in range(5)]
    assert len(sessions) == 3
    assert sessions.find(secrets[0], "t") is None and sessions.find(secrets[-1], "t") is not None


def test_traffic_counts_per_ten_seconds_and_forgets_after_an_hour() -> None:
    clock = Clock(10_000.0)
    traffic = Traffic(clock)
    traffic.observe("acme", "fast", ok=True, prompt_tokens=10, completion_tokens=30, ttft=0.2, key_id="k1")
    traffic.observe("acme", "fast", ok=False, prompt_tokens=5, completion_tokens=0, ttft=None)
    clock.t += BUCKET
    traffic.observe("acme", "fast", ok=True, prompt_tokens=0, completion_tokens=10, ttft=0.4)
    view = traffic.view()
    (series,) = view["series"]
    assert len(series["requests_per_s"]) == SPAN
    assert series["requests_per_s"][-2:] == [0.2, 0.1]
    assert series["tokens_per_s"][-2:] == [4.5, 1.0]
    assert series["ttft"][-2:] == [0.2, 0.4] and series["errors"][-2:] == [1, 0]
    assert series["totals"] == {"requests": 3, "errors": 1, "tokens": 55, "ttft": 0.3}
    assert traffic.key_seen == {"k1": 10_000.0}
    clock.t += SPAN * BUCKET
    assert traffic.view()["series"] == []  # an hour later, nothing is left to draw


def test_traffic_keeps_a_bounded_number_of_series() -> None:
    traffic = Traffic(Clock(), max_series=2)
    for model in ("a", "b", "c"):
        traffic.observe("p", model, ok=True, prompt_tokens=1, completion_tokens=1, ttft=None)
    assert [s["model"] for s in traffic.view()["series"]] == ["a", "b"]


async def test_the_fleet_feed_builds_only_while_watched_and_at_most_once_a_min_gap(autojump_clock) -> None:
    fleet = Fleet()
    feed = FleetFeed(fleet, None, interval=1.0, min_gap=0.25)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        await trio.sleep(10)
        assert feed.documents == 0  # nobody watches: nothing is built
        with feed.subscribe() as sub:
            first = await sub.next()
            t0 = trio.current_time()
            assert b'"neurons":[]' in first
            for _ in range(3):
                await sub.next()
            assert trio.current_time() - t0 == 3.0  # one a second while nothing changes
            for _ in range(10):
                fleet.notify()  # a burst of changes
            await sub.next()
            assert trio.current_time() - t0 == 3.25
        built = feed.documents
        await trio.sleep(10)
        assert feed.documents <= built + 1
        nursery.cancel_scope.cancel()


async def test_a_slow_watcher_gets_the_newest_document_not_a_queue(autojump_clock) -> None:
    feed = FleetFeed(Fleet(), None, interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        with feed.subscribe() as sub:
            await trio.sleep(30.5)  # thirty documents went by
            await sub.next()
            with trio.move_on_after(0.4) as scope:
                await sub.next()
            assert scope.cancelled_caught  # only the newest one was waiting
        nursery.cancel_scope.cancel()


async def test_closing_the_feed_ends_every_watch_now_and_later(autojump_clock) -> None:
    feed = FleetFeed(Fleet(), None, interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        with feed.subscribe() as sub:
            assert await sub.next() is not None
            feed.close()  # the cortex is stopping: an event stream must not wait for more
            with trio.fail_after(0.01):
                assert await sub.next() is None
        with feed.subscribe() as late, trio.fail_after(0.01):
            assert await late.next() is None
        nursery.cancel_scope.cancel()


def test_the_fleet_document_carries_no_nan_or_infinity() -> None:
    def link(node_id: str, hostname: str, cpu: float) -> SimpleNamespace:
        hardware = Hardware(cpu_cores=2, cpu_model="x", ram_total=8 << 30, gpus=())
        return SimpleNamespace(node_id=node_id, descriptor=NeuronDescriptor(node_id, hardware, hostname=hostname),
                               metrics=NeuronMetrics(cpu_percent=cpu, ram_used=1 << 30, ram_total=8 << 30),
                               models={"m": ModelStatus("m", ModelState.LOADING, "synthetic", progress=float("nan"))},
                               health=Health.HEALTHY, last_heartbeat=1_000_000.0, in_flight=0)

    def strict(text: bytes) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the fleet document"))

    # orjson's path, and json's for what orjson refuses (a lone surrogate in a hostname)
    for hostname in ("h", "h\ud800"):
        feed = FleetFeed([link("ok", hostname, 12.5), link("odd", hostname, float("nan"))],  # type: ignore[arg-type]
                         None, clock=Clock())
        neurons = {n["id"]: n for n in strict(feed.document())["neurons"]}
        assert neurons["odd"]["cpu"] is None and neurons["ok"]["cpu"] == 12.5
        assert neurons["odd"]["models"][0]["progress"] is None
    nan, inf = float("nan"), float("inf")
    assert finite({"cpu": nan, "gpus": [{"util": inf}, {"util": 0.5}], "n": 3, "t": (-inf, "x")}) == {
        "cpu": None, "gpus": [{"util": None}, {"util": 0.5}], "n": 3, "t": [None, "x"]}


def test_the_fleet_document_names_the_build_each_neuron_runs() -> None:
    """The console's Fleet page shows each neuron's version: every release said 0.1.0, and the
    page said nothing, so an upgrade's progress across the fleet could not be seen."""
    hardware = Hardware(cpu_cores=2, cpu_model="x", ram_total=8 << 30, gpus=())

    def link(node_id: str, software: str) -> SimpleNamespace:
        return SimpleNamespace(node_id=node_id, descriptor=NeuronDescriptor(node_id, hardware, software=software),
                               metrics=NeuronMetrics(), models={}, health=Health.HEALTHY, last_heartbeat=0.0,
                               in_flight=0)

    feed = FleetFeed([link("new", "helexa 0.1.0+g47c558a"), link("old", "")], None,  # type: ignore[arg-type]
                     clock=Clock())
    neurons = {n["id"]: n for n in json.loads(feed.document())["neurons"]}
    assert neurons["new"]["version"] == "0.1.0+g47c558a" and neurons["old"]["version"] is None


def test_the_fleet_document_names_the_catalogue_models_a_neurons_cache_holds() -> None:
    """The console's Models page showed a restarted neuron's cached models nowhere: the
    document lists, per neuron, the catalogue models its model cache holds that are not
    configured there (the page shows them as cached)."""
    from helexa.protocol import cache_key
    from helexa.roles.cortex.catalogue import Catalogue

    catalogue = Catalogue.from_dict({"models": {
        "tiny": {"backend": "llama_cpp", "memory_mb": 10, "source": "hf://org/repo/tiny.gguf"},
        "held": {"backend": "llama_cpp", "memory_mb": 10, "source": "https://example.test/held.gguf"},
        "other": {"backend": "llama_cpp", "memory_mb": 10, "source": "hf://org/repo/other.gguf"},
        "local": {"backend": "synthetic", "memory_mb": 10}}})
    hardware = Hardware(cpu_cores=2, cpu_model="x", ram_total=8 << 30, gpus=())
    link = SimpleNamespace(node_id="n1", descriptor=NeuronDescriptor("n1", hardware), metrics=NeuronMetrics(),
                           models={"held": ModelStatus("held", ModelState.LOADED, "llama_cpp", cached=True)},
                           health=Health.HEALTHY, last_heartbeat=0.0, in_flight=0,
                           cached=frozenset({cache_key("hf://org/repo/tiny.gguf"),
                                             cache_key("https://example.test/held.gguf")}))
    provisioner = SimpleNamespace(catalogue=catalogue, load_progress={},
                                  operator=SimpleNamespace(pins=lambda: {}))
    feed = FleetFeed([link], provisioner, clock=Clock())  # type: ignore[arg-type]
    (neuron,) = json.loads(feed.document())["neurons"]
    assert neuron["cached"] == ["tiny"]  # "held" shows as its own state, "other" is not there


def test_a_portal_theme_takes_plain_css_colours_only_and_picks_readable_text_on_its_primary() -> None:
    portal = Portal("acme", PortalConfig(name="Acme", theme={"colors": {
        "primary": "#ffe14d", "background": "red;} body{display:none", "text": "#111"}}))
    c = colors(portal)
    assert c["primary"] == "#ffe14d" and c["on_primary"] == "#000000"  # dark text on yellow
    assert c["background"] == "#f7f8fa"  # the injection attempt is ignored
    assert colors(Portal("b", PortalConfig(theme={"colors": {"primary": "#0b1f5c"}})))["on_primary"] == "#ffffff"


def test_a_portal_logo_is_one_the_pages_content_security_policy_lets_load() -> None:
    csp = dict(d.strip().split(" ", 1) for d in _SECURITY_HEADERS["Content-Security-Policy"].split(";"))
    allowed = csp["img-src"].split()

    def loads(src: str) -> bool:
        return (src.startswith("/") and "'self'" in allowed) or any(
            s.endswith(":") and src.startswith(s) for s in allowed)

    for logo, src in (("https://acme.example/logo.svg", "https://acme.example/logo.svg"),
                      ("data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,iVBORw0KGgo="),
                      ("/etc/helexa/acme.svg", "/portal/logo"),
                      ("http://acme.example/logo.svg", None)):  # was put on the page, and blocked there
        got = logo_src(Portal("acme", PortalConfig(theme={"logo": logo})))
        assert got == src, logo
        assert got is None or loads(got), got
