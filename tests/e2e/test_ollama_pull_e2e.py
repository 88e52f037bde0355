"""Ollama's ``/api/pull`` and ``/api/delete`` against real processes, with Ollama's own
client: a catalogue model with an ``hf://`` source (the test's local hub) is pulled onto
the neuron with the neuron's real download progress in Ollama's progress lines, answered
from the cache (the hub is not asked again), then deleted (unloaded) from the fabric."""

from __future__ import annotations

import hashlib

import ollama
import pytest

from local_hub import serve_hub
from procs import ProcGroup

pytestmark = pytest.mark.slow

REPO = "tiny-org/tiny-llama-GGUF"
FILE = "tiny-llama.gguf"


def test_the_ollama_client_pulls_with_the_neurons_progress_chats_and_deletes(tmp_path, tiny_gguf) -> None:
    data = tiny_gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    models = f"""
[models."tiny"]
backend = "llama_cpp"
memory_mb = 100
source = "hf://{REPO}/{FILE}"
sha256 = "{digest}"
[models."tiny".config]
metadata = {{ n_ctx = 512, n_threads = 1 }}
"""
    with serve_hub() as hub, ProcGroup(tmp_path) as procs:
        hub.add_repo(REPO, {FILE: data})
        hub.rate = 8 * 1024 * 1024  # long enough for several progress events
        cortex = procs.cortex(models=models)
        procs.neuron(cortex, "n1", env={"HF_ENDPOINT": hub.url, "HELEXA_DATA_DIR": str(tmp_path / "n1-data")})
        operator = ollama.Client(host=cortex.gateway_url, headers={"authorization": f"Bearer {cortex.admin_token}"},
                                 timeout=120)

        lines = list(operator.pull("tiny:latest", stream=True))
        assert lines[0].status == "pulling tiny:latest on n1" and lines[-1].status == "success"
        progress = [line for line in lines if line.digest]
        assert len(progress) >= 2 and all(line.digest == f"sha256:{digest}" for line in progress)
        assert progress[-1].completed == progress[-1].total == len(data)
        assert [line.completed for line in progress] == sorted(line.completed for line in progress)
        assert hub.gets("/cdn/") == [None]

        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=cortex.gateway_url, timeout=30).pull("tiny")
        assert refused.value.status_code == 401

        answer = ollama.Client(host=cortex.gateway_url, timeout=120).generate(
            model="tiny", prompt="Hi", options={"num_predict": 3})
        assert answer.done and answer.eval_count == 3
        assert hub.gets("/cdn/") == [None]  # loaded from the cache the pull filled

        assert operator.delete("tiny").status == "success"
        cortex.wait_model("n1", "tiny", state="configured")
