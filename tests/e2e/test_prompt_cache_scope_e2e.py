"""Prompt caches are per tenant: SmolLM2 through llama.cpp in real processes, two keys.

A tenant must not be able to tell from its time to first token that another tenant sent
the same prompt (a system prompt, a document) moments ago; hosted APIs never share prompt
caches between organisations. Timings are not asserted here: what llama.cpp reports is.
Its cached prompt tokens come back as Anthropic's ``cache_read_input_tokens``: zero for a
key sending a prompt another key just ran, nearly all of it when a key sends its own again,
and shared between keys only where the portal says ``prompt_cache = "portal"``.
"""

from __future__ import annotations

import subprocess

import anthropic
import pytest

from procs import Cortex, ProcGroup, helexa_command

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
MODELS_TOML = f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = 300
[models."{CHAT}".config]
metadata = {{ n_ctx = 2048, n_threads = 1 }}
"""
CONFIG = """
[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"

[portals.team]
listen = ["127.0.0.1:0"]
auth = "keys"
prompt_cache = "portal"
"""
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def document(tag: str, words: int = 50) -> str:
    return f"Document {tag}: " + " ".join(WORDS[(i * 5) % 13] + tag + str(i) for i in range(words))


def key(cortex: Cortex, portal: str, name: str) -> str:
    done = subprocess.run([*helexa_command(), "keys", "create", "--portal", portal, "--name", name,
                           "--cortex", cortex.admin_url, "--data-dir", str(cortex.data_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def cached(client: anthropic.Anthropic, prompt: str) -> tuple[int, int]:
    """(prompt tokens llama.cpp reused from its cache, prompt tokens in all)."""
    usage = client.messages.create(model=CHAT, max_tokens=2,
                                   messages=[{"role": "user", "content": prompt}]).usage
    return usage.cache_read_input_tokens or 0, (usage.cache_read_input_tokens or 0) + usage.input_tokens


@pytest.fixture(scope="module")
def cortex(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("cache-scope-e2e")) as procs:
        cortex = procs.cortex(models=MODELS_TOML, config=CONFIG, env={"HELEXA_MISSED_HEARTBEATS": "10"})
        procs.neuron(cortex, "n1")
        yield cortex


def clients(cortex: Cortex, portal: str) -> tuple[anthropic.Anthropic, anthropic.Anthropic]:
    url = cortex.portal_urls[portal][0]
    return tuple(anthropic.Anthropic(base_url=url, api_key=key(cortex, portal, name), timeout=120, max_retries=0)
                 for name in ("a", "b"))  # type: ignore[return-value]


def test_a_key_never_reuses_the_prefix_another_key_cached_and_each_reuses_its_own(cortex: Cortex) -> None:
    a, b = clients(cortex, "acme")
    prompt = document("s")
    reused, total = cached(b, prompt)
    assert reused == 0 and total > 200
    assert cached(a, prompt) == (0, total)  # b's prompt, all of it computed afresh for a
    for client in (b, a):  # then each finds its own
        reused, _ = cached(client, prompt)
        assert reused >= total - 8, (reused, total)


def test_a_portal_sharing_its_prompt_cache_lets_its_keys_reuse_each_others_prefix(cortex: Cortex) -> None:
    a, b = clients(cortex, "team")
    prompt = document("t")
    reused, total = cached(a, prompt)
    assert reused == 0 and total > 200
    reused, _ = cached(b, prompt)
    assert reused >= total - 8, (reused, total)
    # never across portals: acme's keys cannot reuse what team's keys cached
    acme, _ = clients(cortex, "acme")
    assert cached(acme, prompt) == (0, total)
