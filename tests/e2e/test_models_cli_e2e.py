"""``helexa models`` against real processes: a catalogue entry with an ``hf://`` source
(the test's local hub) is listed as feasible and not cached, pulled onto the neuron with
the neuron's download progress streamed to the command, listed as cached, loaded from the
cache (the hub is not asked again), pinned, unpinned and unloaded."""

from __future__ import annotations

import hashlib
import json
import subprocess

import httpx
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


def test_a_restarted_neuron_shows_what_its_cache_holds_at_once(tmp_path) -> None:
    """docs/operations.md: a restarted neuron keeps its model cache. ``helexa models list``
    showed "-" under CACHED ON for it until each model was pulled or loaded there again;
    the neuron's join says what the cache holds, so the first listing after it shows it."""
    data = b"GGUF" + bytes(range(256)) * 64  # pulled, never loaded: any bytes do
    models = f"""
[models."tiny"]
backend = "llama_cpp"
memory_mb = 100
source = "hf://{REPO}/{FILE}"
sha256 = "{hashlib.sha256(data).hexdigest()}"

[models."other"]
backend = "llama_cpp"
memory_mb = 100
source = "hf://{REPO}/other.gguf"
"""
    with serve_hub() as hub, ProcGroup(tmp_path) as procs:
        hub.add_repo(REPO, {FILE: data, "other.gguf": data[::-1]})
        cortex = procs.cortex(models=models)
        env = {"HF_ENDPOINT": hub.url, "HELEXA_DATA_DIR": str(tmp_path / "n1-data")}
        neuron = procs.neuron(cortex, "n1", env=env)
        events = [json.loads(line) for line in models_cli(cortex, "pull", "tiny", "--json").splitlines()]
        assert events[-1] == {"event": "end", "ok": True}, events

        neuron.terminate()
        assert neuron.popen.wait(30) == 0
        procs.neuron(cortex, "n1", env=env)  # returns once the cortex lists it healthy
        table = models_cli(cortex, "list")
        header, *lines = table.splitlines()
        at = header.index("CACHED ON")  # the table's columns are aligned
        cached_on = {line.split()[0]: line[at:].split()[0] for line in lines}
        assert cached_on == {"tiny": "n1", "other": "-"}, table
        shown = json.loads(models_cli(cortex, "show", "tiny", "--json"))
        assert shown["neurons"]["n1"] == {**shown["neurons"]["n1"], "state": "cached", "cached": True}
        assert hub.gets("/cdn/") == [None]  # fetched once, by the pull
        with httpx.Client(base_url=cortex.admin_url, timeout=10) as http:  # the console's Models page too
            login = http.post("/console/login", data={"token": cortex.admin_token})
            assert login.status_code == 303, login.text[:300]
            page = http.get("/console/models", headers={"cookie": login.headers["set-cookie"].split(";")[0]})
        assert page.status_code == 200 and 'class="state state-cached" data-node="n1">n1: cached' in page.text
