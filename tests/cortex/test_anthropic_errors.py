"""Anthropic's Messages API's errors on a real socket, over in-memory neuron doubles, in
Anthropic's own shape (``{"type": "error", "error": {"type", "message"}}``) as the official
``anthropic`` client reads them, and count_tokens; what a request that works gets is in
``test_anthropic_surface.py``."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from anthropic_clients import ASK, client, in_thread, keyed
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, Workload
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from portals import acme, new_key, portals
from serving import serving


# --- errors ------------------------------------------------------------------------------


async def test_a_wrong_key_is_an_authentication_error() -> None:
    fleet, _, _, _ = keyed()
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        def ask() -> None:
            with client(urls["acme"], "sk-hlx-wrong_key") as c:
                c.messages.create(model="fast", max_tokens=4, messages=ASK)

        with pytest.raises(anthropic.AuthenticationError) as info:
            await in_thread(ask)
    assert info.value.status_code == 401 and info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert info.value.response.headers["x-should-retry"] == "false"


async def test_an_unknown_model_is_not_found() -> None:
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask() -> None:
            with client(urls["acme"], key) as c:
                c.messages.create(model="chat2", max_tokens=4, messages=ASK)  # in the catalogue, not on acme

        with pytest.raises(anthropic.NotFoundError) as info:
            await in_thread(ask)
    assert info.value.body["error"]["type"] == "not_found_error" and "chat2" in info.value.body["error"]["message"]


async def test_a_model_the_key_may_not_use_is_not_found_for_messages_and_counts() -> None:
    # As its listing answers (/v1/models/fast is a 404): a 403 would confirm the model is here.
    fleet, neuron, store, _ = keyed()
    key = new_key(store, "acme", models=("embed",))
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask() -> list[anthropic.NotFoundError]:
            errors = []
            with client(urls["acme"], key) as c:
                for call in (lambda: c.messages.create(model="fast", max_tokens=4, messages=ASK),
                             lambda: c.messages.count_tokens(model="fast", messages=ASK)):
                    with pytest.raises(anthropic.NotFoundError) as info:
                        call()
                    errors.append(info.value)
            return errors

        errors = await in_thread(ask)
    assert [e.body["error"]["type"] for e in errors] == ["not_found_error"] * 2
    assert not neuron.requests


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "fast", "messages": ASK}, "max_tokens"),
    ({"model": "fast", "max_tokens": 0, "messages": ASK}, "max_tokens"),
    ({"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "fast", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "messages[0]': role must be"),
    ({"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages[0].content[0]': type must be"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "temperature": 1.5}, "temperature"),
    ({"model": "fast", "max_tokens": "3", "messages": ASK, "stream": "yes"}, "'max_tokens': Input should be a valid "
                                                                             "integer (got a string)"),
    ({"model": "fast", "max_tokens": 3.0, "messages": ASK}, "'max_tokens': Input should be a valid integer"),
    ({"model": "fast", "max_tokens": True, "messages": ASK}, "'max_tokens': Input should be a valid integer"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "stream": "yes"}, "'stream': Input should be a valid boolean"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "stream": "x"}, "'stream': Input should be a valid boolean"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "top_k": "5"}, "'top_k'"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "stop_sequences": [""]}, "stop_sequences[0]"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "tools": [{"name": "f", "input_schema": {}}],
      "tool_choice": {"type": "tool", "name": "g"}}, "tool_choice.name"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "tools": [{"name": "f f", "input_schema": {}}]},
     "tools[0].name"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "tools": [{"name": "f", "input_schema": {"type": "wat"}}]},
     "'tools.0.input_schema': not a valid JSON schema"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "tools": [{"name": "f", "input_schema": {"type": "object"}},
                                                                    {"name": "g", "input_schema": {"$ref": "#/x"}}]},
     "'tools.1.input_schema': $ref '#/x' does not resolve"),
    ({"model": "fast", "max_tokens": 4, "messages": ASK, "tools": [{"name": "web_search", "type": "web_search_20250305",
                                                                     "input_schema": {}}]}, "tools[0].type"),
    ({"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "data": "x", "media_type": "text/plain"}}]}]},
     "messages[0].content[0]"),
    ({"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
     "messages[0].content[0]"),
])
async def test_a_malformed_request_is_a_400_naming_the_field_before_any_neuron(body, field) -> None:
    fleet, neuron, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask() -> None:
            with client(urls["acme"], key) as c:
                c.post("/v1/messages", cast_to=object, body=body)

        with pytest.raises(anthropic.BadRequestError) as info:
            await in_thread(ask)
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error" and field in error["message"], error
    assert info.value.response.headers["x-should-retry"] == "false"
    assert not neuron.requests


@pytest.mark.parametrize(("method", "path", "status", "kind"), [
    ("POST", "/v1/messages/batches", 404, "not_found_error"),
    ("POST", "/v1/messages/nosuch", 404, "not_found_error"),
    ("GET", "/v1/messages", 405, "invalid_request_error"),
    ("GET", "/v1/messages/count_tokens", 405, "invalid_request_error"),
])
async def test_a_path_under_v1_messages_no_route_takes_is_answered_in_anthropics_shape(method, path, status,
                                                                                      kind) -> None:
    fleet, neuron, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            r = await http.request(method, urls["acme"] + path, headers={"x-api-key": key}, json={})

        def batches() -> None:
            with client(urls["acme"], key) as c:
                c.messages.batches.list()

        with pytest.raises(anthropic.NotFoundError) as info:
            await in_thread(batches)
    assert r.status_code == status
    assert r.json() == {"type": "error", "error": {"type": kind, "message": r.json()["error"]["message"]}}, r.text
    assert path in r.json()["error"]["message"] and r.headers["x-should-retry"] == "false"
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"


async def test_an_openai_path_no_route_takes_is_still_openais_envelope() -> None:
    fleet, neuron, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            nothing = await http.post(urls["acme"] + "/v1/messagesX", headers={"x-api-key": key}, json={})
            wrong = await http.get(urls["acme"] + "/v1/chat/completions", headers={"x-api-key": key})
    assert nothing.status_code == 404 and nothing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_an_image_names_the_models_that_can_see() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    catalogue = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1),
                           CatalogueEntry(id="eyes", backend="synthetic", memory_mb=1, workloads=(Workload.VISION,))])
    image = {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}}
    async with serving(fleet, catalogue) as (_, url):
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(url + "/v1/messages", json={"model": "chat", "max_tokens": 4, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages[0].content[1]: model 'chat' cannot see images (models that can: eyes)"}}


async def test_over_quota_is_a_rate_limit_error_and_a_spent_budget_says_do_not_retry() -> None:
    fleet, _, store, rpm = keyed(rpm=1)
    spent = new_key(store, "acme", budget=0.0)
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask(key: str) -> None:
            with client(urls["acme"], key) as c:
                c.messages.create(model="fast", max_tokens=4, messages=ASK)

        await in_thread(ask, rpm)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await in_thread(ask, rpm)
        with pytest.raises(anthropic.RateLimitError) as budget:
            await in_thread(ask, spent)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert "x-should-retry" not in limited.value.response.headers
    assert budget.value.body["error"]["type"] == "rate_limit_error"
    assert budget.value.response.headers["x-should-retry"] == "false"


async def test_no_capacity_is_529_overloaded() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet).refuse_load = True
    catalogue = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)])
    async with serving(fleet, catalogue, orchestrator={"retry_after": 9}) as (_, url):
        def ask() -> None:
            with client(url) as c:
                c.messages.create(model="chat", max_tokens=4, messages=ASK)

        with pytest.raises(anthropic.APIStatusError) as info:
            await in_thread(ask)
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
    assert info.value.response.headers["retry-after"] == "9"


# --- count_tokens ---------------------------------------------------------------------------


async def test_count_tokens_estimates_for_a_model_without_a_tokenizer_here() -> None:
    fleet, neuron, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def count():
            with client(urls["acme"], key) as c:
                return c.messages.with_raw_response.count_tokens(model="fast", messages=ASK)

        raw = await in_thread(count)
    assert raw.headers["x-helexa-token-count"] == "estimate" and raw.parse().input_tokens > 0
    assert not neuron.requests


async def test_count_tokens_of_a_model_nobody_has_is_not_found() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)])) as (_, url):
        def count() -> None:
            with client(url) as c:
                c.messages.count_tokens(model="nope", messages=ASK)

        with pytest.raises(anthropic.NotFoundError) as info:
            await in_thread(count)
    assert info.value.body["error"]["type"] == "not_found_error" and "nope" in info.value.body["error"]["message"]
