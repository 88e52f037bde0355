"""The orchestrator between real processes with SmolLM2: a model evicted while one of its
streams runs lets the stream finish before it unloads, and requests beyond a model's slots
wait in the admission queue (their streams told their place) and all complete."""

from __future__ import annotations

import re
import threading

import httpx
import openai
import psutil
import pytest

from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
SWAP = "other"
# Each model takes 60% of this machine's memory, as the neuron reports it: one at a time.
HALF_PLUS = int(psutil.virtual_memory().total / 2**20 * 0.6)

MODELS_TOML = f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = {HALF_PLUS}
max_context = 1024
[models."{CHAT}".config]
metadata = {{ n_ctx = 1024, n_parallel = 1 }}

[models."{SWAP}"]
backend = "synthetic"
memory_mb = {HALF_PLUS}
[models."{SWAP}".config]
metadata = {{ tokens = 3 }}
"""

CORTEX_TOML = """
[orchestrator]
swap_drain = 0.5        # SmolLM2's running stream holds off the swap this long, then drains
min_residency = 0.0
drain_grace = 120.0
keepalive_interval = 0.25
"""


@pytest.fixture(scope="module")
def cortex(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("orchestrator-e2e")) as group:
        cortex = group.cortex(models=MODELS_TOML, config=CORTEX_TOML)
        cortex.neuron = group.neuron(cortex, "n1")  # type: ignore[attr-defined]
        yield cortex


def ask(cortex: Cortex, model: str, max_tokens: int = 8) -> openai.types.chat.ChatCompletion:
    with openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=180, max_retries=0) as c:
        return c.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                         messages=[{"role": "user", "content": "Count from one to fifty."}])


def stream_raw(cortex: Cortex, max_tokens: int, lines: list[str], first: threading.Event | None = None) -> None:
    """Stream a chat over plain HTTP, keeping every SSE line (keep-alive comments too)."""
    body = {"model": CHAT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Count from one to fifty."}]}
    with httpx.stream("POST", cortex.gateway_url + "/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if first is not None and line.startswith("data: {") and '"content":"' in line:
                first.set()


def usage_of(lines: list[str]) -> dict:
    import json

    for line in reversed(lines):
        if line.startswith("data: {") and '"usage":{' in line:
            return json.loads(line[6:])["usage"]
    raise AssertionError(f"no usage in {lines[-5:]}")


def test_a_model_evicted_mid_stream_lets_the_stream_finish_first(cortex: Cortex) -> None:
    ask(cortex, CHAT)  # loaded
    lines: list[str] = []
    first = threading.Event()
    streamer = threading.Thread(target=stream_raw, args=(cortex, 96, lines, first))
    streamer.start()
    assert first.wait(120), "the stream never started"
    other = ask(cortex, SWAP)  # needs SmolLM2's memory: waits for the stream to end, then swaps
    streamer.join(180)
    assert not streamer.is_alive()
    assert lines[-1] == "data: [DONE]" and not any("error" in line for line in lines if line.startswith("data: {"))
    usage = usage_of(lines)
    assert usage["completion_tokens"] > 0
    assert other.choices[0].message.content.startswith("tok0")
    log = cortex.log()
    assert re.search(rf"unloaded {CHAT} from n1 \(swap\)", log), log[-3000:]
    assert "still running after" not in log  # nothing was cut at the grace
    neuron_log = cortex.neuron.log()  # type: ignore[attr-defined]
    # llama.cpp finished the stream's task, then its server was destroyed: no task cancelled.
    assert "cancel task" not in neuron_log
    assert neuron_log.rindex("stop processing") < neuron_log.index("~Server: waiting for main loop exit")
    view = cortex.neuron_view("n1")
    assert view["models"][SWAP]["state"] == "loaded" and view["models"][CHAT]["state"] == "configured"


def test_requests_beyond_the_slots_wait_their_turn_and_all_complete(cortex: Cortex) -> None:
    ask(cortex, CHAT)  # SmolLM2 back (the swap the other way), one slot
    before = _queue_count(cortex)
    streams: list[list[str]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=stream_raw, args=(cortex, 24, lines)) for lines in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    for lines in streams:
        assert lines[-1] == "data: [DONE]" and usage_of(lines)["completion_tokens"] > 0
    told = [line for lines in streams for line in lines if line.startswith(": queued for")]
    assert told, "no waiting stream was told its place"
    assert any("position" in line for line in told)
    assert _queue_count(cortex) - before >= 3  # one ran at once, three waited


def _queue_count(cortex: Cortex) -> float:
    text = cortex.admin("GET", "/metrics").text
    m = re.search(rf'helexa_queue_wait_seconds_count{{model="{CHAT}",portal="default"}} (\S+)', text)
    return float(m.group(1)) if m else 0.0
