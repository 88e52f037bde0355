"""Models in worker processes, between real processes: ``helexa cortex`` and ``helexa neuron``
as a user starts them, the official ``openai`` client, and a worker killed with ``SIGKILL``
in the middle of a stream (as the kernel's out-of-memory killer would)."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me a very long story."}]


def models_toml(gguf: Path) -> str:
    entries = []
    for name in ("tiny-a", "tiny-b"):
        entries.append(f"""
[models."{name}"]
backend = "llama_cpp"
memory_mb = 64
max_context = 2048
pinned_on = ["n1"]
[models."{name}".config]
metadata = {{ path = "{gguf}", n_threads = 1, n_parallel = 2, n_ctx = 4096 }}
""")
    return "".join(entries)


def worker_of(neuron_pid: int, model_id: str) -> psutil.Process:
    """The worker process running ``model_id`` under the neuron, found as ``ps`` shows it."""
    for child in psutil.Process(neuron_pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "helexa.runtime.worker" in argv and argv[argv.index("--model") + 1] == model_id:
            return child
    raise AssertionError(f"no worker process runs {model_id!r}")


@pytest.fixture
def cluster(tmp_path: Path, tiny_gguf: Path):
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=models_toml(tiny_gguf))
        neuron = procs.neuron(cortex, "n1")
        client = openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=60, max_retries=0)
        try:
            yield cortex, neuron, client
        finally:
            client.close()


def test_a_worker_killed_mid_stream_ends_that_stream_and_the_other_model_keeps_serving(cluster) -> None:
    cortex, neuron, client = cluster
    assert client.chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=4).choices[0].message.content
    stream = client.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=1500, stream=True)
    chunks = 0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            chunks += 1
            if chunks == 3:
                victim = worker_of(neuron.pid, "tiny-a")
                victim.send_signal(signal.SIGKILL)
                killed = time.monotonic()
    assert chunks >= 3
    assert time.monotonic() - killed < 5, "the stream did not end promptly"
    assert "SIGKILL" in str(info.value.message)
    assert (info.value.body or {}).get("code") == "backend_crashed"
    # The neuron stays, the other model keeps answering, and the cortex knows why tiny-a failed.
    assert neuron.alive
    again = client.chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=4)
    assert again.choices[0].message.content
    status = cortex.wait_model("n1", "tiny-a", "failed")["models"]["tiny-a"]
    assert "SIGKILL" in status["error"]
    # The next request for it loads it again, in a new worker.
    reloaded = client.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=4)
    assert reloaded.choices[0].message.content
    assert worker_of(neuron.pid, "tiny-a").pid != victim.pid


def test_a_request_whose_worker_is_killed_before_it_answers_is_served_by_the_model_loaded_again(cluster) -> None:
    """The request had not started answering, so the cortex tries it again. The only neuron
    is the one it failed on, but the model loaded there again runs in a new process: the
    request goes to it (before, it waited out the queue's deadline, 300 s)."""
    cortex, neuron, client = cluster
    assert client.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=4).choices[0].message.content
    victim = worker_of(neuron.pid, "tiny-a")
    victim.send_signal(signal.SIGSTOP)  # it is sent the request but cannot answer it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        answer = pool.submit(client.chat.completions.create, model="tiny-a", messages=PROMPT, max_tokens=8)
        time.sleep(1.0)  # the request is in the stopped worker's pipe by now
        victim.send_signal(signal.SIGKILL)
        result = answer.result(timeout=60)
    assert result.choices[0].finish_reason in ("stop", "length")
    assert worker_of(neuron.pid, "tiny-a").pid != victim.pid
    assert time.monotonic() - started < 60


def test_a_neuron_stopped_with_a_hung_worker_kills_it_and_exits_within_seconds(tmp_path: Path) -> None:
    """SIGTERM to a neuron whose worker is frozen (SIGSTOP): the worker gets a short grace
    to unload, then SIGKILL, and the neuron exits 0 within seconds (not after the
    worker's 30 s ``unload_timeout``), leaving no process behind."""
    models = """
[models.frozen]
backend = "synthetic"
[models.frozen.config]
metadata = { isolate = true }
"""
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=models)
        neuron = procs.neuron(cortex, "n1")
        r = httpx.post(cortex.gateway_url + "/v1/chat/completions", timeout=60,
                       json={"model": "frozen", "max_tokens": 2, "messages": PROMPT})  # loads it, in a worker
        assert r.status_code == 200, r.text
        worker = worker_of(neuron.pid, "frozen")
        worker.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        neuron.terminate()
        try:
            code = neuron.popen.wait(20)
        except Exception:
            worker.send_signal(signal.SIGKILL)
            raise
        took = time.monotonic() - began
        assert code == 0, neuron.tail()
        assert took < 8, (took, neuron.tail())
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
        assert "killing its processes" in neuron.log()
