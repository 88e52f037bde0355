"""Portals between real processes: a key made with ``helexa keys create``, used with the
official client, billed in the ledger; ``kill -9`` of the cortex right after the answers
ended loses no record and keeps the budget spent; ``helexa usage`` reads it back.

The budget is in tokens so the arithmetic is plain: a request here asks ``max_tokens`` 5
with the prompt ``"hi"`` from ``user`` (6 bytes + 8 + 16 tokens of allowance), so its
worst case is 35 tokens; the synthetic model really uses 8 prompt + 5 completion = 13.
A budget of 50 admits two (0 + 35, then 13 + 35), and after them (26 spent) not a third
(26 + 35 > 50) — unless a restart forgot the 26.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
[models."synth".config]
metadata = { tokens = 64, prompt_tokens = 8 }
"""

CONFIG = """
[portals.acme]
name = "Acme AI"
listen = ["127.0.0.1:0"]
auth = "keys"
aliases = { fast = "synth" }
currency = "EUR"
prices = { fast = { input = 2000.0, output = 4000.0 } }
"""

ASK = {"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def cli(*args: str, data_dir, admin_url: str) -> str:  # noqa: ANN001
    done = subprocess.run([*helexa_command(), *args, "--cortex", admin_url, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kill_9_after_an_answer_loses_no_record_and_keeps_the_budget_spent(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        procs.neuron(cortex, "n1")
        data = cortex.data_dir
        assert (data / "admin-token").stat().st_mode & 0o777 == 0o600
        key = cli("keys", "create", "--portal", "acme", "--name", "e2e", "--budget", "50", "--budget-unit", "tokens",
                  "--period", "month", data_dir=data, admin_url=cortex.admin_url).strip()
        assert key.startswith("sk-hlx-")
        acme = cortex.portal_urls["acme"][0]
        with openai.OpenAI(base_url=acme + "/v1", api_key=key, max_retries=0, timeout=60) as client:
            answer = client.chat.completions.create(**ASK)
            stream = client.chat.completions.create(**ASK, stream=True, stream_options={"include_usage": True})
            usage = [c.usage for c in stream if c.usage is not None][0]
        cortex.kill()  # SIGKILL the moment the stream's [DONE] arrived

        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (8, 5)
        assert (usage.prompt_tokens, usage.completion_tokens) == (8, 5)
        again = procs.cortex(name="cortex", data_dir=data, models=MODELS, config=CONFIG)
        acme = again.portal_urls["acme"][0]
        rows = json.loads(cli("usage", "--by", "key", "--json", data_dir=data, admin_url=again.admin_url))
        assert len(rows) == 1 and rows[0]["requests"] == 2 and rows[0]["total_tokens"] == 26
        assert rows[0]["cost"] == pytest.approx(2 * (8 * 2000 + 5 * 4000) / 1e6) and rows[0]["currency"] == "EUR"
        mine = httpx.get(acme + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=10).json()
        assert mine["spent"]["tokens"] == 26 and mine["remaining_budget"] == 24
        refused = httpx.post(acme + "/v1/chat/completions", json=ASK, headers={"authorization": f"Bearer {key}"},
                             timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        table = cli("usage", "--by", "model", data_dir=data, admin_url=again.admin_url)
        assert "fast" in table and "0.072000 EUR" in table
        listed = cli("keys", "list", "--portal", "acme", data_dir=data, admin_url=again.admin_url)
        assert "e2e" in listed and "budget=50 tokens/month" in listed and key not in listed
        for path in data.iterdir():
            if path.name.startswith("usage.sqlite"):
                assert key.encode() not in path.read_bytes()
        for proc in procs.procs:
            assert key not in proc.log()


EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "examples" / "models.toml"

SMOL_PORTAL = """
[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"
aliases = { fast = "smollm2-135m-instruct" }
quotas = { tpm = 100000 }              # a limit: the portal reserves a worst case, so it bounds the answer
"""


def test_a_keyed_portal_answers_a_request_that_sets_no_max_tokens(tmp_path) -> None:
    """The portal's Snippets page shows a chat with no ``max_tokens``: the limit the portal
    sets to bound its worst case must leave the prompt its room in SmolLM2's 2048 tokens
    (it was the whole context, and every such request got 400 context_length_exceeded)."""
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=EXAMPLE_MODELS, config=SMOL_PORTAL, env={"HELEXA_MISSED_HEARTBEATS": "10"})
        procs.neuron(cortex, "n1")
        key = cli("keys", "create", "--portal", "acme", "--name", "snippet", data_dir=cortex.data_dir,
                  admin_url=cortex.admin_url).strip()
        acme = cortex.portal_urls["acme"][0]
        hello = [{"role": "user", "content": "Hello"}]
        with openai.OpenAI(base_url=acme + "/v1", api_key=key, max_retries=0, timeout=120) as client:
            stream = client.chat.completions.create(model="fast", messages=hello, stream=True, temperature=0)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            answer = client.chat.completions.create(model="fast", messages=hello, temperature=0)
        assert text and answer.choices[0].message.content
        generated = httpx.post(acme + "/api/chat", json={"model": "fast", "messages": hello, "stream": False},
                               headers={"authorization": f"Bearer {key}"}, timeout=120)
        assert generated.status_code == 200, generated.text
