"""A real cortex and neuron logging JSON at debug level: every line is one JSON object,
lines about a request carry its id and portal, and neither an API key nor the admin token
appears anywhere in the logs, whatever the requests did with them."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
[models."synth".config]
metadata = { tokens = 4 }
"""

CONFIG = """
[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"
"""

CHAT = {"model": "synth", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def test_json_logs_carry_request_fields_and_never_a_secret(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG, extra_args=["--log-format", "json", "--log-level", "debug"])
        neuron = procs.neuron(cortex, "n1", extra_args=["--log-format", "json", "--log-level", "debug"])
        done = subprocess.run([*helexa_command(), "keys", "create", "--portal", "acme", "--name", "logs",
                               "--cortex", cortex.admin_url, "--data-dir", str(cortex.data_dir)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        key = done.stdout.strip()
        acme = cortex.portal_urls["acme"][0]
        assert httpx.post(acme + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"},
                          timeout=30).status_code == 200
        assert httpx.post(acme + "/v1/chat/completions", json=CHAT, headers={"x-api-key": key + "x"},
                          timeout=30).status_code == 401
        assert httpx.get(cortex.admin_url + "/admin/keys", headers={"authorization": "Bearer wrong-admin-token"},
                         timeout=30).status_code == 401
        assert cortex.admin("GET", "/admin/fleet").status_code == 200
        secrets = [key, key.split("_", 1)[1], cortex.admin_token, cortex.join_token_file.read_text().strip()]
        cortex_log, neuron_log = cortex.log(), neuron.log()
    for text in (cortex_log, neuron_log):
        for secret in secrets:
            assert secret not in text
    records = [json.loads(line) for line in cortex_log.splitlines() if line.startswith("{")]
    assert len(records) == len([line for line in cortex_log.splitlines() if line.strip()])
    served = [r for r in records if r.get("portal") == "acme" and r["message"].startswith("POST /v1/chat")]
    assert [r["message"].rsplit(" ", 1)[1] for r in served] == ["200", "401"]
    assert all(len(r["request_id"]) == 32 for r in served)
    neuron_records = [json.loads(line) for line in neuron_log.splitlines() if line.startswith("{")]
    assert neuron_records and all("level" in r and "logger" in r for r in neuron_records)
