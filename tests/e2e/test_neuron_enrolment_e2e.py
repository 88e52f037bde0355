"""Strict enrolment between real ``helexa cortex`` and ``helexa neuron`` processes, enrolled
through the real CLI.

Under trust on first use, anyone holding the join token could claim a node id the cortex had
never seen. With ``enrolment = "strict"`` a neuron whose node id is not enrolled is refused
and exits 4 (no retrying) with one line naming the two commands; ``helexa neuron-key`` on its
data directory prints the key that ``helexa neurons enrol`` takes, after which it joins.
"""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from helexa import identity
from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
memory_mb = 10
[models."synth".config]
metadata = { tokens = 3 }
"""
FAST = {"HELEXA_RECONNECT_INITIAL": "0.1", "HELEXA_RECONNECT_MAX": "0.5"}


def test_an_unenrolled_neuron_exits_4_and_the_key_neuron_key_prints_lets_it_join(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, env={"HELEXA_ENROLMENT": "strict"})
        neuron_env = {**FAST, "HELEXA_DATA_DIR": str(tmp_path / "n1-data")}

        refused = procs.neuron(cortex, "n1", env=neuron_env, wait=False)
        assert refused.popen.wait(30) == 4  # as identity_mismatch, and no retrying
        log = refused.log()
        assert "node id 'n1' is not enrolled on this cortex" in log and "Traceback" not in log
        assert "helexa neuron-key" in log and "helexa neurons enrol n1 KEY" in log

        printed = subprocess.run([*helexa_command(), "neuron-key", "--data-dir", str(tmp_path / "n1-data"),
                                  "--node-id", "n1"], capture_output=True, text=True, timeout=60)
        assert printed.returncode == 0, printed.stderr
        key = printed.stdout.strip()
        mine = identity.load_or_create(tmp_path / "n1-data" / "identity.key")  # the one the neuron made
        assert key == mine.public_bytes.hex()
        assert f"helexa neurons enrol n1 {key}" in printed.stderr and mine.fingerprint in printed.stderr

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*helexa_command(), "neurons", *args, "--cortex", cortex.admin_url,
                                   "--data-dir", str(cortex.data_dir)], capture_output=True, text=True, timeout=60)

        bad = cli("enrol", "n1", "not-a-key")
        assert bad.returncode == 1 and "public_key" in bad.stderr and "Traceback" not in bad.stderr
        done = cli("enrol", "n1", key)
        assert done.returncode == 0, done.stderr
        assert f"enrolled node id n1 with identity key {mine.fingerprint}" in done.stdout
        (bound,) = json.loads(cli("keys", "--json").stdout)
        assert bound["node_id"] == "n1" and bound["public_key"] == key and bound["connected"] is False

        joined = procs.neuron(cortex, "n1", env=neuron_env)
        client = openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=30, max_retries=0)
        reply = client.chat.completions.create(model="synth", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=3)
        assert reply.choices[0].finish_reason is not None and joined.alive

        # A fresh machine claiming another node id with the same token is still refused.
        other = procs.neuron(cortex, "n2", env={**FAST, "HELEXA_DATA_DIR": str(tmp_path / "n2-data")}, wait=False)
        assert other.popen.wait(30) == 4
