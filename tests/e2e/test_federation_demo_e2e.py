"""``examples/federation_demo.sh``, which README.md and docs/mesh.md tell a newcomer to run,
runs to its end: operator-b's neuron answers a chat sent to operator-a's gateway and both
ledgers agree (it once waited forever for ``"neurons": 1`` in the gateway's compact JSON)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from procs import helexa_command

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "federation_demo.sh"


def test_the_federation_demo_runs_to_its_end() -> None:
    command = helexa_command()
    env = {**os.environ, "PYTHON": sys.executable}
    if len(command) == 1:
        env["HELEXA"] = command[0]
    done = subprocess.run([str(DEMO), "What is the capital of France? Answer in one sentence."], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the two ledgers agree" in done.stdout
    assert "Paris" in done.stdout
