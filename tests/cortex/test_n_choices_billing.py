"""OpenAI's ``n`` choices bill the prompt once, as OpenAI counts it, over real sockets with
the official ``openai`` client: the answer's usage (streamed and not, chat and the legacy
completions), the ledger, the key's spent budget and the portal's token counters.

The neuron double reads every prompt as 5 tokens and answers ``tokens`` tokens; the portal
sells ``fast`` at 1,000 EUR per million tokens each way."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals
from serving import admin_headers

USER = [{"role": "user", "content": "x"}]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


async def test_n_choices_count_the_prompt_once_in_the_answer_the_ledger_the_budget_and_the_metrics() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=4)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=100.0)
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():
            c = client(urls["acme"], key)
            whole = c.chat.completions.create(model="fast", messages=USER, n=3)
            streamed = [chunk.usage for chunk in c.chat.completions.create(
                model="fast", messages=USER, n=3, stream=True, stream_options={"include_usage": True})
                if chunk.usage is not None]
            legacy = c.completions.create(model="fast", prompt="x", n=2)
            return whole.usage, streamed, legacy.usage

        whole, streamed, legacy = await trio.to_thread.run_sync(run)
        async with httpx.AsyncClient() as http:
            mine = (await http.get(urls["acme"] + "/v1/usage", headers=bearer(key))).json()
            metrics = (await http.get(urls["default"] + "/metrics", headers=admin_headers())).text
    assert len(neuron.requests) == 8  # every choice ran as a generation of its own
    assert (whole.prompt_tokens, whole.completion_tokens, whole.total_tokens) == (5, 12, 17)
    assert len(streamed) == 1 and (streamed[0].prompt_tokens, streamed[0].completion_tokens) == (5, 12)
    assert (legacy.prompt_tokens, legacy.completion_tokens) == (5, 8)

    # Each choice has its record; the prompt is on choice 0's alone.
    records = store.records()
    assert len(records) == 8
    requests: dict[str, list] = {}
    for row in records:
        requests.setdefault(row.request_id.rsplit("-", 1)[0], []).append(row)
    assert sorted((sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows))
                  for rows in requests.values()) == [(5, 8), (5, 12), (5, 12)]
    for row in records:
        assert row.prompt_tokens == (5 if row.request_id.endswith("-0") else 0)
        assert row.cost == pytest.approx((row.prompt_tokens + row.completion_tokens) * 1000 / 1e6)
    spent = (3 * 5 + 32) * 1000 / 1e6
    assert mine["spent"] == {"money": pytest.approx(spent), "tokens": 3 * 5 + 32}
    assert mine["remaining_budget"] == pytest.approx(100.0 - spent)
    # Three calls, as rpm counted them (it counted each call once whatever its n), not 8 choices.
    assert [(m["model"], m["requests"], m["prompt_tokens"], m["completion_tokens"]) for m in mine["models"]] == [
        ("fast", 3, 15, 32)]
    assert [r["requests"] for r in store.report(by="key")] == [3]
    assert 'helexa_portal_tokens_total{kind="prompt",model="fast",portal="acme"} 15.0' in metrics
    assert 'helexa_portal_tokens_total{kind="completion",model="fast",portal="acme"} 32.0' in metrics


async def test_n_choices_a_client_leaves_bill_the_estimated_prompt_once() -> None:
    """A stream the client cuts is billed for the tokens it produced plus its prompt
    estimated from its bytes: once for the request, on choice 0's record, not per choice."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=50, token_delay=0.02)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=100.0)
    body = {"model": "fast", "max_tokens": 50, "n": 2, "stream": True, "messages": USER}
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=10) as http:
            seen: set[int] = set()
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if '"content":"t' in line:
                        seen.add(int(line.split('"index":')[1].split(",")[0]))
                    if seen == {0, 1}:
                        break  # the client leaves once both choices have answered
            with trio.fail_after(5):
                while len(store.records()) < 2:
                    await trio.sleep(0.02)
            mine = (await http.get("/v1/usage")).json()
    first, second = sorted(store.records(), key=lambda row: row.request_id)
    assert first.request_id.endswith("-0") and second.request_id.endswith("-1")
    assert first.outcome == second.outcome == "client_gone"
    assert first.completion_tokens > 0 and second.completion_tokens > 0
    assert first.prompt_tokens > 0 and second.prompt_tokens == 0
    assert mine["spent"]["tokens"] == first.prompt_tokens + first.completion_tokens + second.completion_tokens


async def test_n_choices_count_as_one_request_against_rpm() -> None:
    """OpenAI counts one request per call against requests-per-minute, whatever ``n``: a key
    of ``rpm`` 2 takes two ``n=3`` calls (each choosing three answers) and refuses a third
    call; each remaining-requests header drops by one. Each call was refused outright when
    every choice took a request of its own."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", rpm=2)
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():
            c = client(urls["acme"], key)
            raw = [c.chat.completions.with_raw_response.create(model="fast", messages=USER, n=3) for _ in range(2)]
            try:
                c.chat.completions.create(model="fast", messages=USER, n=3)
            except openai.RateLimitError as exc:
                refused = exc
            else:
                refused = None
            return [(r.headers.get("x-ratelimit-remaining-requests"), len(r.parse().choices)) for r in raw], refused

        answered, refused = await trio.to_thread.run_sync(run)
    assert answered == [("1", 3), ("0", 3)]
    assert refused is not None and refused.code == "rate_limit_exceeded" and "requests per minute" in refused.message
    assert len(neuron.requests) == 6  # two calls of three choices each, the third call none
