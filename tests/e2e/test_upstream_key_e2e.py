"""A supervised OpenAI-style server behind real ``helexa cortex`` and ``helexa neuron``
processes: the official ``openai`` client is served through it, while a request straight to
its port, without the key the neuron drew for it, is refused; the key is nowhere in the
neuron's log (its command line and the server's own lines are logged, masked)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

KEYED_SERVER = Path(__file__).parent.parent / "runtime" / "keyed_server.py"


def test_the_neuron_serves_through_a_server_nobody_else_can_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = f"""
[models."keyed"]
backend = "openai_proxy"
memory_mb = 64
pinned_on = ["n1"]
[models."keyed".config]
command = "{sys.executable}"
args = ["{KEYED_SERVER}", "{port}", "--key-env", "VLLM_API_KEY"]
listen_endpoint = "http://127.0.0.1:{port}"
metadata = {{ dialect = "openai", api_key_env = "VLLM_API_KEY", ready_timeout = 30 }}
"""
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=models)
        neuron = procs.neuron(cortex, "n1")
        with openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=60, max_retries=0) as client:
            messages = [{"role": "user", "content": "hi"}]
            assert client.chat.completions.create(model="keyed", messages=messages).choices[0].message.content == "ok"
            pieces = client.chat.completions.create(model="keyed", messages=messages, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == "ok"
        (server,) = [p for p in psutil.Process(neuron.pid).children(recursive=True) if str(KEYED_SERVER) in p.cmdline()]
        key = server.environ()["VLLM_API_KEY"]
        body = {"model": "keyed", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        log = neuron.log()
        assert "keyed: starting" in log and "non-default args" in log
        assert key not in log
