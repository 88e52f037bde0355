"""Every route that runs a model is metered: the proof walks the app's own route table.

Each route of a keyed default portal's socket (which serves the admin API too) is called
once over that socket (a sample request per route, below); the orchestrator is watched. Every request that reached the
orchestrator must have its ledger row (only the metered path writes one), and the routes
that reach it must be exactly those declared ``metered``. A new route fails here until it
has a sample, so nobody adds a route that runs a model without this test seeing it.
"""

from __future__ import annotations

import httpx

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.reload import ReloadReport
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals
from serving import admin_headers

CHAT = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}

# (method, route path) -> (path to call, JSON body or None)
SAMPLES: dict[tuple[str, str], tuple[str, object]] = {
    ("POST", "/v1/chat/completions"): ("/v1/chat/completions", CHAT),
    ("POST", "/v1/completions"): ("/v1/completions", {"model": "fast", "prompt": "x", "stream": True}),
    ("POST", "/v1/embeddings"): ("/v1/embeddings", {"model": "embed", "input": ["a"]}),
    ("POST", "/v1/messages"): ("/v1/messages", {"model": "fast", "max_tokens": 4, "messages": CHAT["messages"]}),
    ("POST", "/v1/messages/count_tokens"): ("/v1/messages/count_tokens", {"model": "fast", "messages": CHAT["messages"]}),
    ("GET", "/v1/models"): ("/v1/models", None),
    ("GET", "/v1/models/"): ("/v1/models/fast", None),
    ("GET", "/v1/usage"): ("/v1/usage", None),
    ("POST", "/v1/responses"): ("/v1/responses", {"model": "fast", "input": "x", "store": False}),
    ("GET", "/v1/responses/"): ("/v1/responses/RESPONSE", None),
    ("DELETE", "/v1/responses/"): ("/v1/responses/RESPONSE", None),
    ("POST", "/v1/responses/"): ("/v1/responses/RESPONSE/cancel", None),
    ("GET", "/api/version"): ("/api/version", None),
    ("GET", "/api/tags"): ("/api/tags", None),
    ("POST", "/api/show"): ("/api/show", {"model": "fast"}),
    ("GET", "/api/ps"): ("/api/ps", None),
    ("POST", "/api/chat"): ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/api/generate"): ("/api/generate", {"model": "fast:latest", "prompt": "x", "stream": False}),
    ("POST", "/api/embed"): ("/api/embed", {"model": "embed", "input": "a"}),
    ("POST", "/api/embeddings"): ("/api/embeddings", {"model": "embed", "prompt": "a"}),
    ("POST", "/api/pull"): ("/api/pull", {"model": "fast"}),
    ("DELETE", "/api/delete"): ("/api/delete", {"model": "embed"}),
    ("POST", "/api/copy"): ("/api/copy", {"source": "fast", "destination": "mine"}),
    ("POST", "/api/create"): ("/api/create", {"model": "mine", "from": "fast"}),
    ("POST", "/api/push"): ("/api/push", {"model": "fast"}),
    ("GET", "/health"): ("/health", None),
    ("GET", "/metrics"): ("/metrics", None),
    ("GET", "/admin/fleet"): ("/admin/fleet", None),
    ("GET", "/admin/portals"): ("/admin/portals", None),
    ("GET", "/admin/keys"): ("/admin/keys", None),
    ("POST", "/admin/keys"): ("/admin/keys", {"portal": "default", "name": "sample"}),
    ("GET", "/admin/keys/"): ("/admin/keys/KEY", None),
    ("PATCH", "/admin/keys/"): ("/admin/keys/KEY", {"rpm": 100}),
    ("POST", "/admin/keys/"): ("/admin/keys/KEY/rotate", None),
    ("GET", "/admin/usage"): ("/admin/usage", None),
    ("GET", "/admin/usage/records"): ("/admin/usage/records", None),
    ("POST", "/admin/reload"): ("/admin/reload", None),
    ("GET", "/admin/models"): ("/admin/models", None),
    ("GET", "/admin/models/"): ("/admin/models/chat", None),
    ("POST", "/admin/models/"): ("/admin/models/chat/load", {"neuron": "n1"}),
}
# Routes that exist to refuse clearly (in their API's own shape) what a fabric does not do.
REFUSING = {"POST /v1/responses/", "POST /api/copy", "POST /api/create", "POST /api/push"}
# Routes of the operator's, on a portal socket: called with the admin token.
OPERATOR = {"/api/pull", "/api/delete"}
# The web pages (helexa/roles/cortex/web) are mounted under these paths; a page never runs a
# model itself (the playground's script calls /v1/chat/completions like any client), and
# this test proves it the same way. They may answer a redirect or a 4xx (no session, a
# POST without its form), never a 5xx.
WEB_SAMPLES = {"/": "/", "/console": "/console/login", "/console/": "/console/login", "/portal": "/portal/",
               "/portal/": "/portal/snippets", "/static": "/static/style.css", "/static/": "/static/console.js"}
for _method in ("GET", "POST", "HEAD"):
    for _path, _sample in WEB_SAMPLES.items():
        SAMPLES.setdefault((_method, _path), (_sample, None))


async def test_every_route_that_reaches_the_orchestrator_is_metered_and_recorded() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    store = SqliteStore(":memory:")
    key = new_key(store, "default")
    key_id = key.split("_")[0].removeprefix("sk-hlx-")
    admin_key = new_key(store, "default")  # rotated by the sample; the requests use `key`
    admin_key_id = admin_key.split("_")[0].removeprefix("sk-hlx-")
    reached: list[tuple[str, str]] = []
    async with portals(fleet, {"default": acme(listen=[])}, store=store, reload=ReloadReport) as (gateway, urls):
        app = gateway.apps[urls["default"]]
        orchestrator = gateway.orchestrator
        real_generate, real_embed = orchestrator.generate, orchestrator.embed

        def generate(request, **kw):  # noqa: ANN001, ANN202
            reached.append((current[0], request.request_id))
            return real_generate(request, **kw)

        async def embed(request, **kw):  # noqa: ANN001, ANN202
            reached.append((current[0], request.request_id))
            return await real_embed(request, **kw)

        orchestrator.generate, orchestrator.embed = generate, embed  # type: ignore[method-assign]
        current = [""]
        statuses = {}
        async with httpx.AsyncClient(base_url=urls["default"]) as http:
            # A stored response for the GET and DELETE samples (made before the walk, so unwatched).
            response_id = (await http.post("/v1/responses", json={"model": "fast", "input": "x"},
                                           headers=bearer(key))).json()["id"]
            reached.clear()
            for route in app.routes:
                sample = SAMPLES.get((route.method, route.path))
                assert sample is not None, (
                    f"{route.method} {route.path} is a new route: add a sample request to SAMPLES so this test "
                    f"checks whether it runs a model outside the metered path")
                path, body = sample
                path = path.replace("KEY", admin_key_id).replace("RESPONSE", response_id)
                operator = route.path.startswith(("/admin", "/metrics")) or route.path in OPERATOR
                headers = admin_headers() if operator else bearer(key)
                current[0] = f"{route.method} {route.path}"
                r = await http.request(route.method, path, json=body, headers=headers)
                statuses[current[0]] = r.status_code
    web = {f"{m} {p}" for m, p in SAMPLES if p in WEB_SAMPLES}
    assert all(s < 300 for name, s in statuses.items() if name not in web | REFUSING), statuses
    assert all(400 <= statuses[name] < 500 for name in REFUSING), statuses
    assert all(s < 500 for s in statuses.values()), statuses
    metered = {f"{r.method} {r.path}" for r in app.routes if r.metered}
    assert {name for name, _ in reached} == metered == {
        "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "POST /v1/responses",
        "POST /api/chat", "POST /api/generate", "POST /api/embed", "POST /api/embeddings", "POST /v1/messages"}
    for name, request_id in reached:
        rows = store.records(request_id=request_id)
        assert len(rows) == 1 and rows[0].key_id == key_id and rows[0].outcome == "ok", name
