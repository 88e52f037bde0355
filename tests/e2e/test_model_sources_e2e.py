"""A catalogue entry with an ``hf://`` source, served by a local hub (``tests/local_hub.py``
with ``HF_ENDPOINT`` pointing at it): a real ``helexa neuron`` fetches it on the first
request, the waiting stream's keep-alives and the fleet view show the download, and the
official ``openai`` client gets an answer through a real ``helexa cortex``."""

from __future__ import annotations

import hashlib
import threading

import httpx
import openai
import pytest

from local_hub import serve_hub
from procs import ProcGroup

pytestmark = pytest.mark.slow

REPO = "tiny-org/tiny-llama-GGUF"
FILE = "tiny-llama.gguf"


def test_an_hf_source_is_fetched_by_a_real_neuron_and_answers(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    models = f"""
[models."tiny"]
backend = "llama_cpp"
memory_mb = 100
source = "hf://{REPO}/{FILE}"
sha256 = "{hashlib.sha256(data).hexdigest()}"
[models."tiny".config]
metadata = {{ n_ctx = 512, n_threads = 1 }}
"""
    with serve_hub() as hub, ProcGroup(tmp_path) as procs:
        hub.add_repo(REPO, {FILE: data})
        hub.rate = 4 * 1024 * 1024  # a ~3.5 s download, long enough to watch
        cortex = procs.cortex(models=models, env={"HELEXA_ORCHESTRATOR__KEEPALIVE_INTERVAL": "0.3"})
        procs.neuron(cortex, "n1", env={"HF_ENDPOINT": hub.url, "HELEXA_DATA_DIR": str(tmp_path / "n1-data")})

        body = {"model": "tiny", "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hello"}]}
        comments, chunks, seen = [], 0, []
        stop = threading.Event()

        def watch_fleet() -> None:  # what `helexa status` shows meanwhile
            while not stop.wait(0.1):
                view = cortex.neuron_view("n1")
                if view and "tiny" in view["models"]:
                    seen.append((view["models"]["tiny"]["state"], view["models"]["tiny"].get("progress")))

        watcher = threading.Thread(target=watch_fleet)
        watcher.start()
        with httpx.stream("POST", cortex.gateway_url + "/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith(":"):
                    comments.append(line)
                elif line.startswith("data: {"):
                    chunks += 1
        stop.set()
        watcher.join()
        assert chunks >= 1
        assert any(state == "loading" and progress and 0 < progress < 1 for state, progress in seen), seen
        assert any("loading tiny: download" in c for c in comments), comments
        assert hub.gets("/cdn/") == [None]

        client = openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            answer = client.chat.completions.create(model="tiny", max_tokens=4,
                                                    messages=[{"role": "user", "content": "Hi"}])
        finally:
            client.close()
        assert answer.choices[0].message.content is not None and answer.usage.completion_tokens >= 1
        assert hub.gets("/cdn/") == [None]  # loaded once, from the neuron's cache
        assert (tmp_path / "n1-data" / "models" / "blobs" / hashlib.sha256(data).hexdigest()).is_file()
