"""A neuron killed with SIGKILL, between real processes: until the cortex removes it
(``remove_after``), ``helexa status`` (and ``/admin/fleet``, ``/admin/models``) shows it
``offline`` and none of its models as loaded."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

MODELS_TOML = """
[models."kept"]
backend = "synthetic"
"""


def status(cortex, *extra: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run([*helexa_command(), "status", "--cortex", cortex.admin_url, "--data-dir",
                           str(cortex.data_dir), "--timeout", "5", *extra],
                          capture_output=True, text=True, timeout=60)


def test_a_killed_neurons_models_show_offline_not_loaded_until_it_is_removed(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS_TOML, env={"HELEXA_REMOVE_AFTER": "120"})
        neuron = procs.neuron(cortex, "victim")
        loaded = httpx.post(cortex.gateway_url + "/v1/completions", json={"model": "kept", "prompt": "hi"}, timeout=60)
        assert loaded.status_code == 200, loaded.text
        cortex.wait_model("victim", "kept", "loaded", timeout=30)
        before = status(cortex)
        assert before.returncode == 0 and "kept:loaded" in before.stdout, before.stderr

        neuron.kill()
        cortex.wait_neuron("victim", "offline", timeout=15)
        text, as_json = status(cortex), status(cortex, "--json")
        models = cortex.admin("GET", "/admin/models/kept").json()
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("victim"))
    assert "offline" in line and "kept:offline" in line and "loaded" not in line
    (victim,) = json.loads(as_json.stdout)["neurons"]
    assert victim["health"] == "offline" and victim["connected"] is False
    assert victim["models"]["kept"]["state"] == "offline" and victim["models"]["kept"]["last_state"] == "loaded"
    assert models["neurons"]["victim"]["state"] == "offline"
