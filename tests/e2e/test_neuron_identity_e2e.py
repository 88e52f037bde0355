"""A neuron's identity key between real ``helexa cortex`` and ``helexa neuron`` processes.

The join token was a neuron's whole identity: any holder of it could join under another
neuron's node id, and that join pushed the real neuron out (4001, exit 3) and took its
traffic. Now a second neuron with the same node id and a valid token but another identity
key is refused and exits 4 with one line naming the fix, while the first keeps serving;
the same neuron restarted (same data directory) rejoins; the bindings survive a ``kill -9``
of the cortex, which the real neuron rejoins; after ``helexa neurons forget`` a new key binds,
and the neuron it pushes out exits 3 saying its binding was forgotten.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_another_key_cannot_take_a_node_id_and_the_operator_can_forget_a_binding(tmp_path) -> None:
    control, gateway = free_port(), free_port()
    fixed = ["--control-socket", f"127.0.0.1:{control}", "--gateway-socket", f"127.0.0.1:{gateway}"]

    def data(name: str) -> dict[str, str]:
        return {**FAST, "HELEXA_DATA_DIR": str(tmp_path / name)}

    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, extra_args=fixed)

        def cli(*args: str) -> str:
            done = subprocess.run([*helexa_command(), "neurons", *args, "--cortex", cortex.admin_url,
                                   "--data-dir", str(cortex.data_dir)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        def chat() -> str:
            client = openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=30, max_retries=0)
            reply = client.chat.completions.create(model="synth", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=3)
            return reply.choices[0].finish_reason

        real = procs.neuron(cortex, "n1", env=data("real"))
        mine = identity.load_or_create(tmp_path / "real" / "identity.key")
        assert f"identity key {mine.fingerprint}" in real.log()
        assert chat() is not None

        intruder = procs.neuron(cortex, "n1", env=data("intruder"), wait=False)
        assert intruder.popen.wait(30) == 4  # not 3 (a refused token), and no retrying
        assert "is bound to another identity key" in intruder.log()
        assert "helexa neurons forget n1" in intruder.log() and "Traceback" not in intruder.log()
        assert real.alive and real.log().count("joined cortex") == 1  # not disturbed
        assert chat() is not None and cortex.wait_neuron("n1")
        assert ["n1", mine.fingerprint] in [line.split()[:2] for line in cli("keys").splitlines()]

        # The same neuron restarted rejoins under its node id.
        assert real.stop() == 0
        real = procs.neuron(cortex, "n1", env=data("real"))
        real.wait_log("joined cortex", 30)

        # kill -9 of the cortex: the binding is on disk; the real neuron rejoins the new one.
        cortex.kill()
        cortex = procs.cortex(data_dir=cortex.data_dir, models=MODELS, extra_args=fixed)
        real.wait_log(r"(?s)joined cortex.*joined cortex", 30)
        cortex.wait_neuron("n1", timeout=30)
        again = procs.neuron(cortex, "n1", env=data("intruder"), wait=False)
        assert again.popen.wait(30) == 4
        assert chat() is not None

        # The operator forgets the binding: the connected neuron stays; the next join binds.
        assert "forgot node id n1's identity key " + mine.fingerprint in cli("forget", "n1")
        assert json.loads(cli("keys", "--json")) == []
        time.sleep(1)
        assert real.alive and real.log().count("joined cortex") == 2 and chat() is not None
        new = procs.neuron(cortex, "n1", env=data("intruder"), wait=False)  # a new machine, the old node id
        new.wait_log("joined cortex", 30)
        # The connected one is pushed out, and says why: not a copy of its data_dir.
        assert real.popen.wait(30) == 3
        assert "the operator forgot this neuron's identity key" in real.log()
        assert "copy of its data_dir" not in real.log() and "Traceback" not in real.log()
        (bound,) = json.loads(cli("keys", "--json"))
        assert bound["fingerprint"] == identity.load_or_create(tmp_path / "intruder" / "identity.key").fingerprint
        assert new.alive and chat() is not None
