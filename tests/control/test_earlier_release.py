"""A cortex and a neuron of different releases (a rolling upgrade), between a real cortex
and a real neuron agent in this process: every control-plane frame is decoded as the
release of 2026-11-30 decodes it (``tests/fixtures/wire_2026-11-30.json``: a frame with a
field it does not know is a protocol error that closes the connection), and the side of
that release joins at handshake version 1.

The cortex sent every embedding a ``truncate`` such a neuron refused (each embedding
request dropped its connection, and the request got a 503), and the neuron sent a
non-streamed answer's ``first_token_s`` such a cortex refused, the same way."""

from __future__ import annotations

import hashlib
from functools import partial

import httpx
import pytest
import trio

from helexa.protocol.join import CortexJoin, NeuronJoin
from helexa.roles.cortex import control_server
from helexa.protocol import cache_key
from helexa.roles.neuron import connection
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import SourcesConfig
from helexa.roles.neuron.registry import ModelRegistry
from helexa.roles.neuron.sources import ModelSources
from helexa.transport import ws_channel

from earlier_wire import kinds_of, strict
from test_neuron_identity import Running, Setup

EARLIER = kinds_of("2026-11-30")
BEFORE_CACHE = kinds_of("2026-12-02")
"""The tree of 2026-12-02 (handshake version 2): everything but the model cache report."""

MODELS = """
[models.synth]
backend = "synthetic"
memory_mb = 10
[models.synth.config]
metadata = { tokens = 3, tokens_per_second = 1000 }

[models."all-minilm-l6-v2"]
backend = "embeddings"
workloads = ["embedding"]
memory_mb = 100
max_context = 256
"""


def strict_codec(monkeypatch, kinds: dict[str, list[str]]) -> None:
    """Every control-plane frame decoded under ``kinds``' field lists first."""
    monkeypatch.setattr(ws_channel, "decode", strict(ws_channel.decode, kinds))


@pytest.fixture
def earlier_codec(monkeypatch):
    """Every control-plane frame decoded under that release's field lists first."""
    strict_codec(monkeypatch, EARLIER)


def setup(tmp_path) -> Setup:
    s = Setup(tmp_path)
    (tmp_path / "models.toml").write_text(MODELS)
    return s


async def test_a_neuron_of_this_release_answers_a_cortex_of_the_earlier_one(tmp_path, nursery, monkeypatch,
                                                                           earlier_codec):
    """A non-streamed answer (its first text timed) reaches the older cortex, an embedding
    is cut as that release's neurons cut it, and the neuron stays on the connection it
    joined with."""
    monkeypatch.setattr(control_server, "CortexJoin", partial(CortexJoin, versions=(1, 1)))
    s = setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    running = s.start(nursery, "n")
    await s.joined(running)
    link = cortex.fleet.get("n1")
    assert running.neuron.connection.earlier
    for _ in range(2):
        answer = await s.chat()
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    # That cortex sends an embedding no truncate (it always cut an input over the context): cut.
    async with httpx.AsyncClient(base_url=s.addrs.gateway_url, timeout=60) as http:
        long = await http.post("/api/embed", json={"model": "all-minilm-l6-v2", "input": "word " * 300})
    assert long.status_code == 200, long.text
    assert long.json()["prompt_eval_count"] == 256
    assert cortex.fleet.get("n1") is link and link.connected and running.neuron.joins == 1


async def test_a_neuron_of_the_earlier_release_serves_embeddings_for_a_cortex_of_this_one(tmp_path, nursery,
                                                                                         monkeypatch, earlier_codec):
    """OpenAI's embeddings (no truncation) and Ollama's (truncate by default) both reach the
    older neuron, which keeps its connection."""
    monkeypatch.setattr(connection, "NeuronJoin", partial(NeuronJoin, versions=(1, 1)))
    s = setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    running = s.start(nursery, "n")
    await s.joined(running)
    link = cortex.fleet.get("n1")
    assert not link.scopes_cache
    async with httpx.AsyncClient(base_url=s.addrs.gateway_url, timeout=60) as http:
        openai = await http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a", "b"]})
        assert openai.status_code == 200, openai.text
        assert len(openai.json()["data"]) == 2
        ollama = await http.post("/api/embed", json={"model": "all-minilm-l6-v2", "input": "hello"})
        assert ollama.status_code == 200, ollama.text
        assert len(ollama.json()["embeddings"]) == 1
    assert cortex.fleet.get("n1") is link and link.connected and running.neuron.joins == 1


async def test_a_neuron_that_cannot_read_a_frame_of_ours_is_logged_as_too_old_not_as_sending_a_bad_one(
        tmp_path, nursery, caplog):
    """A neuron of 2026-11-23 joins, then refuses the first model config it is sent (fields
    it does not know) with a Fault: the cortex said it "sent a bad frame: unexpected Fault
    from a neuron", which hid what the neuron said and that it is of a release too old."""
    from helexa.protocol import Fault

    s = setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    running = s.start(nursery, "n")
    await s.joined(running)
    link = cortex.fleet.get("n1")
    said = "upsert_model_config.config: unknown field(s) ['sha256', 'source']"
    await running.neuron.connection.send(Fault("malformed", said))
    with trio.fail_after(10):
        while link.connected:
            await trio.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "helexa.roles.cortex.neuron_link"]
    assert any("neuron n1 could not read a frame of this cortex's" in line and said in line
               and "earlier release" in line for line in lines), lines
    assert not any("sent a bad frame" in line for line in lines)


SOURCE = "https://models.example/tiny.gguf"


def with_cache(s: Setup, data: str) -> Running:
    """A neuron (not started) whose model cache holds ``SOURCE``: as after a pull and a restart."""
    cache_dir = s.tmp / data / "models"
    neuron = Neuron(s.neuron(data).config,
                    registry=ModelRegistry(sources=ModelSources(SourcesConfig(cache_dir=cache_dir))))
    cache = neuron.registry.sources.cache
    blob = cache.blob(hashlib.sha256(b"weights").hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(b"weights")
    cache.commit(cache_key(SOURCE), SOURCE, {"tiny.gguf": blob.name}, file="tiny.gguf")
    return Running(neuron)


async def beats(link, n: int) -> None:
    with trio.fail_after(10):
        while link.heartbeats < n:
            await trio.sleep(0.02)


async def test_a_neuron_reporting_its_cache_keeps_its_connection_to_a_cortex_before_the_report(
        tmp_path, nursery, monkeypatch):
    """The cortex of 2026-12-02 (handshake version 2) refuses a join or heartbeat with
    ``cached``: this neuron sends it neither, and stays joined through its heartbeats."""
    strict_codec(monkeypatch, BEFORE_CACHE)
    monkeypatch.setattr(control_server, "CortexJoin", partial(CortexJoin, versions=(1, 2)))
    s = setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    running = with_cache(s, "n")
    nursery.start_soon(running.run)
    await s.joined(running)
    link = cortex.fleet.get("n1")
    assert running.neuron.connection.version == 2 and not running.neuron.connection.earlier
    await beats(link, 3)
    assert link.cached == frozenset()  # that cortex is not told
    assert (await s.chat()).status_code == 200
    assert cortex.fleet.get("n1") is link and link.connected and running.neuron.joins == 1


async def test_a_cortex_with_the_report_serves_a_neuron_before_it_and_hears_one_of_its_own_release(
        tmp_path, nursery, monkeypatch):
    """A neuron of 2026-12-02 (version 2) joins and serves as before, reporting nothing; one
    of this release reports its cache in its join, before any heartbeat."""
    strict_codec(monkeypatch, BEFORE_CACHE)  # what this cortex sends a version-2 neuron decodes there
    monkeypatch.setattr(connection, "NeuronJoin", partial(NeuronJoin, versions=(1, 2)))
    s = setup(tmp_path)
    cortex = await s.start_cortex(nursery)
    old = with_cache(s, "n")
    nursery.start_soon(old.run)
    await s.joined(old)
    link = cortex.fleet.get("n1")
    await beats(link, 2)
    assert link.cached == frozenset() and (await s.chat()).status_code == 200
    assert link.connected and old.neuron.joins == 1
    old.scope.cancel()
    monkeypatch.undo()
    new = with_cache(s, "n")  # the same machine, upgraded
    nursery.start_soon(new.run)
    await s.joined(new)
    link = cortex.fleet.get("n1")
    assert link.cached == {cache_key(SOURCE)}  # from its join: registered before the welcome
    assert new.neuron.connection.version == 3
