"""The glue between the gateway and the federation: error statuses, the offer, the router."""

from __future__ import annotations

import json

import pytest

from helexa.roles.cortex.catalogue import Catalogue
from helexa.roles.cortex.config import OrchestratorConfig
from helexa.roles.cortex.errors import envelope
from helexa.roles.cortex.federation import (
    NoPeerOffers,
    OutboundRefused,
    PeerFailed,
    PeerRefused,
    PeerUnreachable,
    PeerVanished,
)
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.peering import FleetOffer

from neuron_double import NeuronDouble, hardware


@pytest.mark.parametrize("exc, status, type_, code, retry_after", [
    (OutboundRefused("no"), 403, "permission_error", "outbound_refused", None),
    (NoPeerOffers("none"), 404, "invalid_request_error", "model_not_found", None),
    (PeerRefused("no", code="denied"), 403, "permission_error", "peer_denied", None),
    # A peer refusing a model it announced: its offer went stale (it restarted, its neuron
    # left), not a policy about us: once a 403, which the official clients never retry.
    (PeerRefused("no", code="model_not_offered"), 503, "service_unavailable", "peer_model_not_offered", b"1"),
    (PeerRefused("no", code="not_serving"), 503, "service_unavailable", "peer_not_serving", b"1"),
    (PeerRefused("slow down", code="rate_limited", retry_after=2.5), 429, "rate_limit_error", "peer_rate_limited", b"3"),
    (PeerRefused("full", code="busy", retry_after=1.0), 503, "service_unavailable", "peer_busy", b"1"),
    (PeerUnreachable("cannot open it"), 502, "upstream_error", "peer_unreachable", None),
    (PeerUnreachable("peer p did not answer: no frame from p in time"), 504, "timeout", "peer_timeout", None),
    (PeerVanished("gone"), 502, "upstream_error", "peer_vanished", None),
    (PeerFailed("bad", code="context_length_exceeded", retryable=False), 400, "invalid_request_error",
     "context_length_exceeded", None),
    (PeerFailed("full", code="no_capacity", retryable=True), 503, "service_unavailable", "no_capacity", b"1"),
    (PeerFailed("broke", code="backend_error", retryable=False), 502, "upstream_error", "backend_error", None),
])
def test_federation_errors_become_the_right_status_and_envelope(exc, status, type_, code, retry_after) -> None:
    got_status, headers, body = envelope(exc)
    error = json.loads(body)["error"]
    assert (got_status, error["type"], error["code"]) == (status, type_, code)
    assert error["message"] == str(exc)
    assert dict(headers).get(b"retry-after") == retry_after


def test_offer_lists_catalogue_models_the_fleet_can_hold_warm_when_loaded() -> None:
    catalogue = Catalogue.from_dict({"models": {
        "small": {"backend": "synthetic", "memory_mb": 100, "price_in": 1.0, "price_out": 2.0},
        "huge": {"backend": "synthetic", "memory_mb": 10_000_000},
        "cold": {"backend": "synthetic", "memory_mb": 100},
    }})
    fleet = Fleet()
    NeuronDouble("n1", fleet, hw=hardware(ram_gb=16), loaded=("small", "foreign"))

    class Prov:
        load_times = {"cold": 1.25}
        settings = OrchestratorConfig()

    offer = FleetOffer(fleet, catalogue, Prov(), slots_per_neuron=3)  # type: ignore[arg-type]
    by_id = {m.model_id: m for m in offer.offer()}
    assert set(by_id) == {"small", "cold"}  # not "huge" (fits nowhere), not "foreign" (not catalogued)
    assert by_id["small"].warm and (by_id["small"].price_input, by_id["small"].price_output) == (1.0, 2.0)
    assert not by_id["cold"].warm and by_id["cold"].load_time_s == 1.25
    assert offer.spare() == 3
    # The one-model lookup a peer's every request is checked with says the same.
    for model_id in ("small", "huge", "cold", "foreign", "unknown"):
        assert offer.offered(model_id) == by_id.get(model_id)


def test_nothing_is_offered_without_a_usable_neuron() -> None:
    catalogue = Catalogue.from_dict({"models": {"small": {"backend": "synthetic"}}})

    class Prov:
        load_times: dict = {}
        settings = OrchestratorConfig()

    offer = FleetOffer(Fleet(), catalogue, Prov())  # type: ignore[arg-type]
    assert offer.offer() == [] and offer.spare() == 0 and offer.offered("small") is None


class _Router:
    def __init__(self, offered: set[str]) -> None:
        self.offered = offered

    def can_route(self, model_id: str) -> bool:
        return model_id in self.offered

    def unavailable(self, model_id: str) -> float | None:
        return None

    def listing(self) -> dict:
        return {m: {"federated": True, "operators": ["op-b"], "peers": ["p"], "loaded": True} for m in self.offered}

    async def route(self, request):  # noqa: ANN001, ANN201
        return None


def test_requests_go_to_peers_only_for_models_the_fleet_cannot_serve() -> None:
    from helexa.protocol import GenerateRequest, Task, WorkloadClass

    from serving import build

    catalogue = Catalogue.from_dict({"models": {"small": {"backend": "synthetic", "memory_mb": 100}}})
    fleet = Fleet()
    gateway = build(fleet, catalogue)
    orch = gateway.orchestrator

    def mode(model: str) -> str:
        return orch.decide(GenerateRequest("r", model, Task.CHAT), WorkloadClass.CHAT_INTERACTIVE).mode

    assert mode("unknown") == "none" and mode("small") == "cold_load"  # no router: 404, and the local 503 path
    orch.set_remote_router(_Router({"small", "remote-only"}))
    assert mode("small") == "peer" and mode("unknown") == "peer"  # catalogued, but no neuron here could hold it
    NeuronDouble("n1", fleet, hw=hardware(ram_gb=16))
    assert mode("small") == "cold_load"  # now it can be cold-loaded here
    models = {m["id"]: m for m in gateway.models()}
    assert models["small"]["federated"] is False
    assert models["remote-only"]["federated"] is True and models["remote-only"]["operators"] == ["op-b"]
