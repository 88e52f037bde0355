"""``helexa models`` against real processes: a catalogue entry with an ``hf://`` source
(the test's local hub) is listed as feasible and not cached, pulled onto the neuron with
the neuron's download progress streamed to the command, listed as cached, loaded from the
cache (the hub is not asked again), pinned, unpinned and unloaded."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from local_hub import serve_hub
from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

REPO = "tiny-org/tiny-llama-GGUF"
FILE = "tiny-llama.gguf"


def models_cli(cortex, *args: str) -> str:  # noqa: ANN001
    done = subprocess.run([*helexa_command(), "models", *args, "--cortex", cortex.admin_url, "--data-dir",
                           str(cortex.data_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_models_pull_load_pin_unload_on_a_real_neuron(tmp_path, tiny_gguf) -> None:
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
        hub.rate = 8 * 1024 * 1024  # long enough for several progress events
        cortex = procs.cortex(models=models)
        procs.neuron(cortex, "n1", env={"HF_ENDPOINT": hub.url, "HELEXA_DATA_DIR": str(tmp_path / "n1-data")})

        listed = {m["id"]: m for m in json.loads(models_cli(cortex, "list", "--json"))}
        assert listed["tiny"]["feasible_on"] == ["n1"]
        assert listed["tiny"]["neurons"] == {}  # not even configured there yet

        events = [json.loads(line) for line in models_cli(cortex, "pull", "tiny", "--json").splitlines()]
        progress = [e for e in events if e["event"] == "progress"]
        assert progress and all(e["stage"] == "download" and e["neuron"] == "n1" for e in progress)
        assert progress[-1]["done"] == progress[-1]["total"] == len(data)
        assert events[-2:] == [{"event": "done", "neuron": "n1"}, {"event": "end", "ok": True}]
        assert hub.gets("/cdn/") == [None]

        table = models_cli(cortex, "list")
        assert table.splitlines()[0].split()[:3] == ["MODEL", "BACKEND", "MEMORY"]
        row = next(line for line in table.splitlines() if line.startswith("tiny"))
        assert "n1" in row  # feasible and cached on n1

        shown = json.loads(models_cli(cortex, "show", "tiny", "--json"))
        assert shown["neurons"]["n1"]["cached"] is True and shown["neurons"]["n1"]["state"] == "configured"

        out = models_cli(cortex, "load", "tiny", "--neuron", "n1")
        assert "tiny: loaded on n1" in out
        cortex.wait_model("n1", "tiny")
        assert hub.gets("/cdn/") == [None]  # from the cache

        assert "pinned on n1" in models_cli(cortex, "pin", "tiny", "--neuron", "n1")
        assert json.loads(models_cli(cortex, "show", "tiny", "--json"))["pinned_on"] == ["n1"]
        assert "unpinned from n1" in models_cli(cortex, "unpin", "tiny", "--neuron", "n1")
        assert "unloaded from n1" in models_cli(cortex, "unload", "tiny")
        cortex.wait_model("n1", "tiny", state="configured")

        bad = subprocess.run([*helexa_command(), "models", "load", "nope", "--cortex", cortex.admin_url,
                              "--data-dir", str(cortex.data_dir)], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
