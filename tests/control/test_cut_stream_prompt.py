"""A stream cut short, of a model the cortex cannot tokenize, bills the prompt's exact count.

A real cortex and a real neuron (llama.cpp, the tiny model with SmolLM2's tokenizer) over
real sockets. The model comes from a URL (a local hub), which only the neuron fetches: the
cortex has no tokenizer for it. A stream the client leaves gets no usage from the neuron
(that comes with the result), so its prompt was billed at an estimate, a quarter of its
bytes; the neuron's first chunk now says how many tokens llama.cpp read for it. A cortex of
an earlier release does not get that field, which its codec would refuse."""

from __future__ import annotations

import hashlib
import math
from functools import partial

import httpx
import pytest
import trio

from helexa.protocol import GenerateRequest, Task
from helexa.protocol.join import CortexJoin
from helexa.roles.cortex import control_server
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.prompt_size import prompt_bytes

from local_hub import serve_hub
from test_earlier_release import earlier_codec  # noqa: F401 (a fixture)
from test_neuron_identity import Setup

PROMPT = [{"role": "user", "content": "Tell me a long story about the sea, the wind and a small boat."}]


def models(url: str, data: bytes) -> str:
    return f"""
[models.tiny]
backend = "llama_cpp"
memory_mb = 100
source = "{url}"
sha256 = "{hashlib.sha256(data).hexdigest()}"
[models.tiny.config]
metadata = {{ n_ctx = 4096, n_threads = 1, n_parallel = 1 }}
"""


@pytest.mark.slow
async def test_a_stream_the_client_cuts_bills_the_prompt_count_the_neuron_sent(tmp_path, nursery, tiny_gguf):
    data = tiny_gguf.read_bytes()
    with serve_hub() as hub:
        s = Setup(tmp_path)
        (tmp_path / "models.toml").write_text(models(hub.add_url("tiny.gguf", data), data))
        s.config = CortexConfig(data_dir=tmp_path / "cortex", control_socket="127.0.0.1:0",
                                gateway_socket="127.0.0.1:0", usage_store=":memory:",
                                models_file=tmp_path / "models.toml", portals={"default": {"record_usage": True}})
        cortex = await s.start_cortex(nursery)
        running = s.start(nursery, "n")
        await s.joined(running)
        # The premise: the edge cannot count this model's prompt.
        counter = cortex.gateway.metering.limits.counter
        assert await counter.count(GenerateRequest("x", "tiny", Task.CHAT, messages=tuple(PROMPT))) is None

        async with httpx.AsyncClient(base_url=s.addrs.gateway_url, timeout=120) as http:
            whole = await http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": PROMPT})
            assert whole.status_code == 200, whole.text
            exact = whole.json()["usage"]["prompt_tokens"]
            body = {"model": "tiny", "max_tokens": 3000, "stream": True, "messages": PROMPT}
            chunks = 0
            with trio.fail_after(60):
                async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                    assert answer.status_code == 200
                    async for line in answer.aiter_lines():
                        if line.startswith("data: {") and '"content"' in line:
                            chunks += 1
                            if chunks == 3:
                                break  # the client leaves mid-stream
        with trio.fail_after(30):
            while len(rows := cortex.gateway.store.records()) < 2:
                await trio.sleep(0.05)
    cut = next(r for r in rows if r.outcome == "client_gone")
    estimate = math.ceil(prompt_bytes(GenerateRequest("x", "tiny", Task.CHAT, messages=tuple(PROMPT)))[0] / 4)
    assert exact > estimate  # (SmolLM2's template adds its own system prompt)
    assert 1 <= cut.completion_tokens < 3000  # (not every event the client read held a token)
    assert cut.prompt_tokens == exact


@pytest.mark.slow
async def test_a_neuron_of_this_release_streams_to_a_cortex_of_the_earlier_one_without_the_count(
        tmp_path, nursery, monkeypatch, earlier_codec, tiny_gguf):
    """That cortex's codec refuses a field it does not know, closing the connection: the
    first chunk's ``prompt_tokens`` is left out for it (``protocol.compat.for_earlier``)."""
    monkeypatch.setattr(control_server, "CortexJoin", partial(CortexJoin, versions=(1, 1)))
    s = Setup(tmp_path)
    (tmp_path / "models.toml").write_text(f"""
[models.tiny]
backend = "llama_cpp"
memory_mb = 100
[models.tiny.config]
metadata = {{ path = "{tiny_gguf}", n_ctx = 2048, n_threads = 1 }}
""")
    cortex = await s.start_cortex(nursery)
    running = s.start(nursery, "n")
    await s.joined(running)
    link = cortex.fleet.get("n1")
    assert running.neuron.connection.earlier
    body = {"model": "tiny", "max_tokens": 8, "stream": True, "messages": PROMPT}
    async with httpx.AsyncClient(base_url=s.addrs.gateway_url, timeout=120) as http:
        for _ in range(2):
            async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                assert answer.status_code == 200
                lines = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and any('"content"' in line for line in lines)
            assert not any('"error"' in line for line in lines), lines
    assert cortex.fleet.get("n1") is link and link.connected and running.neuron.joins == 1
