"""The gateway between real processes: ``helexa cortex`` and ``helexa neuron`` started as a
user would, driven by the official ``openai`` client (and raw HTTP for the error cases).

The default models answer for real (SmolLM2 through llama.cpp, MiniLM embeddings), each
cold-loaded by its first request. Slow ``synthetic`` models make streams long enough to
kill a neuron or hang up in the middle of one. The failover test has its own cortex.
"""

from __future__ import annotations

import signal
import time

import httpx
import ollama
import openai
import pytest

from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_BODY = 65536

MODELS_TOML = f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = 300
max_context = 2048
[models."{CHAT}".config]
metadata = {{ n_ctx = 4096 }}

[models."{EMBED}"]
backend = "embeddings"
workloads = ["embedding"]
memory_mb = 100
max_context = 256

# 2,000 tokens at 50/s: a 40 s stream, to hang up on.
[models."slow"]
backend = "synthetic"
pinned_on = ["n1"]
[models."slow".config]
metadata = {{ tokens = 2000, tokens_per_second = 50 }}

# The same, on the neurons that get killed.
[models."slow-doomed"]
backend = "synthetic"
pinned_on = ["doomed", "doomed2"]
[models."slow-doomed".config]
metadata = {{ tokens = 2000, tokens_per_second = 50 }}
"""


_clients: list[openai.OpenAI] = []


def client(cortex: Cortex) -> openai.OpenAI:
    """The official client, no retries (closed at the end of the module: an idle keep-alive
    connection would hold the cortex's graceful stop for its whole shutdown_grace)."""
    c = openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    _clients.append(c)
    return c


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("gateway-e2e")) as group:
        try:
            yield group
        finally:
            while _clients:
                _clients.pop().close()
    for proc in group.procs:
        if proc.name in ("cortex", "failover-cortex", "n1"):
            assert proc.popen.returncode == 0, f"{proc.name} did not stop cleanly:\n{proc.tail()}"


@pytest.fixture(scope="module")
def cortex(procs: ProcGroup) -> Cortex:
    # Lenient heartbeats: loading SmolLM2 (xllamacpp.Server, in a worker thread) has been
    # seen to stall the neuron's event loop for over 3 s on a busy 2-core machine, and
    # 3 missed 1 s heartbeats would then drop the neuron in the middle of its first load.
    cortex = procs.cortex(models=MODELS_TOML, env={"HELEXA_GATEWAY__MAX_BODY_BYTES": str(MAX_BODY),
                                                   "HELEXA_MISSED_HEARTBEATS": "10"})
    procs.neuron(cortex, "n1")
    return cortex


def test_the_models_are_listed_before_anything_is_loaded(cortex: Cortex) -> None:
    models = {m.id: m for m in client(cortex).models.list().data}
    assert {CHAT, EMBED, "slow"} <= set(models)
    chat = models[CHAT].model_dump()
    assert chat["object"] == "model" and chat["feasible_on"] == ["n1"]
    assert chat["loaded"] is False and chat["locations"] == []


def test_the_first_chat_cold_loads_smollm2_which_answers_paris(cortex: Cortex) -> None:
    assert CHAT not in cortex.neuron_view("n1")["models"]
    resp = client(cortex).chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=32)
    answer = resp.choices[0].message.content
    assert "Paris" in answer, answer
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert cortex.neuron_view("n1")["models"][CHAT]["state"] == "loaded"
    assert cortex.models()[CHAT]["locations"] == ["n1"]


def test_streamed_chat_arrives_in_chunks_and_says_paris(cortex: Cortex) -> None:
    stream = client(cortex).chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=32,
                                                    stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "Paris" in "".join(pieces), pieces
    assert len([p for p in pieces if p]) > 2
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def test_completions_streamed_and_not(cortex: Cortex) -> None:
    c = client(cortex)
    resp = c.completions.create(model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert resp.object == "text_completion" and resp.choices[0].text.strip()
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True) if ch.choices)
    assert streamed == resp.choices[0].text


def test_embeddings_cold_load_and_answer(cortex: Cortex) -> None:
    assert EMBED not in cortex.neuron_view("n1")["models"]
    resp = client(cortex).embeddings.create(model=EMBED, input=["Paris is in France", "Berlin is in Germany"])
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 384 for d in resp.data)
    assert cortex.neuron_view("n1")["models"][EMBED]["state"] == "loaded"


def test_an_embedding_input_over_the_models_context_is_refused_or_cut_as_asked(cortex: Cortex) -> None:
    """MiniLM takes 256 tokens (with its [CLS] and [SEP]): OpenAI's API refuses a longer
    input (400 naming ``input``), Ollama's truncates it unless ``truncate: false``. Such an
    input used to be cut silently everywhere."""
    fits, too_long = "word " * 254, "word " * 255
    c = client(cortex)
    assert c.embeddings.create(model=EMBED, input=fits).usage.prompt_tokens == 256
    with pytest.raises(openai.BadRequestError) as refused:
        c.embeddings.create(model=EMBED, input=["short", too_long])
    error = refused.value.body
    assert error["param"] == "input" and error["code"] == "context_length_exceeded", error
    assert "input[1]" in error["message"] and "256" in error["message"]
    with pytest.raises(openai.BadRequestError) as many:
        c.embeddings.create(model=EMBED, input=["x"] * 2049)
    assert many.value.body["param"] == "input", many.value.body
    o = ollama.Client(host=cortex.gateway_url, timeout=60)
    cut = o.embed(model=EMBED, input=too_long)
    assert cut.prompt_eval_count == 256 and len(cut.embeddings[0]) == 384
    assert o.embed(model=EMBED, input=too_long, truncate=True).embeddings == cut.embeddings
    with pytest.raises(ollama.ResponseError) as kept:
        o.embed(model=EMBED, input=too_long, truncate=False)
    assert kept.value.status_code == 400 and "256" in kept.value.error


def test_a_model_asked_for_the_wrong_workload_is_refused_at_the_edge_naming_model(cortex: Cortex) -> None:
    """An embeddings request for a chat model cold-loaded it on the neuron to be refused
    there (param null); the catalogue says what each model does."""
    c = client(cortex)
    with pytest.raises(openai.BadRequestError) as embed:
        c.embeddings.create(model=CHAT, input="hello")
    assert embed.value.body["param"] == "model" and embed.value.body["code"] == "unsupported", embed.value.body
    with pytest.raises(openai.BadRequestError) as chat:
        c.chat.completions.create(model=EMBED, messages=QUESTION, max_tokens=4)
    assert chat.value.body["param"] == "model" and "only does embeddings" in chat.value.body["message"]
    with pytest.raises(ollama.ResponseError) as ol:
        ollama.Client(host=cortex.gateway_url, timeout=60).embed(model="slow", input="hello")
    assert ol.value.status_code == 400 and "does not do embeddings" in ol.value.error


def _neuron_in_flight(cortex: Cortex, node_id: str) -> tuple[int, int]:
    """(what the cortex counts on its link, what the neuron itself last reported)."""
    n = cortex.neuron_view(node_id)
    return n["in_flight"], n["metrics"]["in_flight"]


def test_a_client_hanging_up_mid_stream_cancels_the_generation_on_the_neuron(cortex: Cortex) -> None:
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cortex.gateway_url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            seen = 0
            while seen < 5:
                seen += next(lines).startswith("data: ")
            # The neuron itself reports the generation (in its heartbeat).
            cortex.wait_for(lambda f: _neuron_in_flight(cortex, "n1") == (1, 1), "the neuron to report it", 10)
    hung_up = time.monotonic()
    # Unless cancelled, the neuron would go on for ~40 s.
    cortex.wait_for(lambda f: _neuron_in_flight(cortex, "n1") == (0, 0), "the neuron to stop generating", 10)
    assert time.monotonic() - hung_up < 5


def test_a_killed_neuron_ends_its_stream_with_an_error_event_at_once(procs: ProcGroup, cortex: Cortex) -> None:
    doomed = procs.neuron(cortex, "doomed")
    stream = client(cortex).chat.completions.create(
        model="slow-doomed", messages=[{"role": "user", "content": "go"}], stream=True)
    chunks = 0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            chunks += 1
            if chunks == 5:
                doomed.kill()
                killed = time.monotonic()
    assert chunks >= 5
    assert time.monotonic() - killed < 5, "the stream did not end promptly"
    assert "doomed" in str(info.value) or info.value.body is not None
    # The rest of the fleet is unaffected.
    resp = client(cortex).chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in resp.choices[0].message.content


def test_a_killed_neurons_stream_carries_the_openai_error_envelope(procs: ProcGroup, cortex: Cortex) -> None:
    doomed = procs.neuron(cortex, "doomed2")
    body = {"model": "slow-doomed", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    events: list[str] = []
    with httpx.stream("POST", cortex.gateway_url + "/v1/chat/completions", json=body, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    doomed.kill()
    assert events[-1] != "[DONE]"
    error = httpx.Response(200, content=events[-1]).json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "[DONE]" not in events


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"model": "smollm2-135m-instruct", "messages": [', 400, None),
        (b'{"model": "smollm2-135m-instruct", "messages": "not a list"}', 400, None),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
        (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "'
         + b"x" * (MAX_BODY + 10) + b'"}]}', 413, None),
    ],
    ids=["malformed-json", "wrong-type", "unknown-model", "over-the-limit"],
)
def test_bad_requests_get_the_envelope_and_status(cortex: Cortex, content: bytes, status: int, code: str | None) -> None:
    resp = httpx.post(cortex.gateway_url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=10)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


def test_the_official_client_raises_its_own_errors(cortex: Cortex) -> None:
    with pytest.raises(openai.NotFoundError):
        client(cortex).chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client(cortex).chat.completions.create(model=CHAT, messages=QUESTION, temperature="hot")  # type: ignore[arg-type]


# --- failover, on a cortex of its own ----------------------------------------------------

ECHO_TOML = """
[models."echo"]
backend = "synthetic"
[models."echo".config]
metadata = { tokens = 8 }
"""


@pytest.fixture(scope="module")
def pair(procs: ProcGroup) -> tuple[Cortex, dict]:
    # A frozen neuron is found out only after 15 s: the test kills it long before that.
    cortex = procs.cortex(name="failover-cortex", models=ECHO_TOML,
                          env={"HELEXA_HEARTBEAT_INTERVAL": "0.5", "HELEXA_MISSED_HEARTBEATS": "30"})
    neurons = {nid: procs.neuron(cortex, nid) for nid in ("f1", "f2")}
    return cortex, neurons


def _holders(fleet: dict, model: str) -> set[str]:
    return {n["node_id"] for n in fleet["neurons"]
            if n["health"] == "healthy" and n["models"].get(model, {}).get("state") == "loaded"}


def _echo(cortex: Cortex) -> str:
    resp = client(cortex).chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    return resp.choices[0].message.content


def test_requests_not_started_on_a_killed_neuron_are_retried_on_the_other(pair) -> None:
    cortex, neurons = pair
    assert _echo(cortex) == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    (first,) = cortex.wait_for(lambda f: _holders(f, "echo"), "echo loaded")
    other = ({"f1", "f2"} - {first}).pop()
    # Freeze the one holder: requests sent to it now sit unstarted in its socket (it is
    # the only neuron with the model, so every one goes there). Kill it, and every one of
    # them must still be answered, by the other, which loads the model for them.
    victim = neurons[first]
    victim.signal(signal.SIGSTOP)
    results: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(_echo(cortex))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    import threading

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    # Every request sits on the frozen neuron before it dies (the cortex counts them).
    cortex.wait_for(lambda f: sum(n["in_flight"] for n in f["neurons"] if n["node_id"] == first) == len(threads),
                    "all requests waiting on the frozen neuron", 20)
    victim.kill()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == ["tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"] * 16
    retried = cortex.log().count(f"not started on {first}")
    assert retried >= 1, "no request went to the frozen neuron; nothing was failed over"
    assert _holders(cortex.fleet(), "echo") == {other}
