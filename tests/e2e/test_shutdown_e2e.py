"""A cortex stopped (SIGTERM) while answers are still running past its ``shutdown_grace``:
every client gets a clean end in its own API's shape (a stream: its error event and the
end of the body; a whole answer, or a request still waiting in the queue: a 503), never a
connection cut in the middle of a body, and the cortex exits 0."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

# 2,000 tokens at 50/s: 40 s, far past the 1 s grace.
MODELS = """
[models.slow]
backend = "synthetic"
[models.slow.config]
metadata = { tokens = 2000, tokens_per_second = 50 }
"""

CONFIG = """
shutdown_grace = 1.0
[orchestrator]
default_slots = 4
"""

MESSAGES = [{"role": "user", "content": "x"}]


def _stream(url: str, body: dict, started: list[str]) -> tuple[int, list[str]]:
    lines: list[str] = []
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        for line in r.iter_lines():  # raises on a body cut short
            if line.strip():
                lines.append(line)
                if len(lines) == 3:
                    started.append(url)
    return r.status_code, lines


def _whole(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=30)


def test_sigterm_past_the_grace_ends_every_answer_cleanly_in_its_own_shape(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        procs.neuron(cortex, "n1")
        base = cortex.gateway_url
        started: list[str] = []
        with ThreadPoolExecutor(5) as pool:
            streams = {
                "chat": pool.submit(_stream, base + "/v1/chat/completions",
                                    {"model": "slow", "messages": MESSAGES, "stream": True}, started),
                "messages": pool.submit(_stream, base + "/v1/messages",
                                        {"model": "slow", "messages": MESSAGES, "max_tokens": 4000, "stream": True},
                                        started),
                "ollama": pool.submit(_stream, base + "/api/chat", {"model": "slow", "messages": MESSAGES}, started),
            }
            whole = pool.submit(_whole, base + "/v1/chat/completions", {"model": "slow", "messages": MESSAGES})
            deadline = time.monotonic() + 30  # the first request cold-loads it
            while len(started) < 3 or cortex.fleet()["neurons"][0]["in_flight"] < 4:
                assert time.monotonic() < deadline, (started, cortex.fleet())
                time.sleep(0.05)
            queued = pool.submit(_whole, base + "/v1/chat/completions", {"model": "slow", "messages": MESSAGES})
            time.sleep(0.5)  # in the queue: the 4 slots are busy
            t0 = time.monotonic()
            cortex.terminate()

            status, lines = streams["chat"].result()
            assert status == 200
            assert lines[-1].startswith("data: {") and json.loads(lines[-1][6:])["error"]["code"] == "shutting_down"
            status, lines = streams["messages"].result()
            assert status == 200
            assert lines[-2:-1] == ["event: error"] and "the cortex is stopping" in lines[-1]
            status, lines = streams["ollama"].result()
            assert status == 200 and "the cortex is stopping" in json.loads(lines[-1])["error"]
            for r in (whole.result(), queued.result()):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
        assert cortex.popen.wait(15) == 0
        assert time.monotonic() - t0 < 10
        assert "ended with 503 shutting_down" in cortex.log()
