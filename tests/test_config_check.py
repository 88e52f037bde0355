"""``helexa config check``: real config files, a good set and broken ones, checked by the
command as an operator runs it, without starting anything (``helexa/config_check.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HELEXA = [sys.executable, "-m", "helexa.cli"]

MODELS = """
[models.chat]
backend = "synthetic"
memory_mb = 10

[models.embed]
backend = "synthetic"
workloads = ["embedding"]
memory_mb = 10
"""


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HELEXA_")}  # the file alone decides
    return subprocess.run(HELEXA + ["config", "check", *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def good_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    cortex = tmp_path / "cortex.toml"
    cortex.write_text(f'data_dir = "{tmp_path / "cortex-data"}"\ncontrol_socket = "127.0.0.1:7070"\n'
                      f'gateway_socket = "127.0.0.1:8080"\nmodels_file = "{models}"\n')
    token = tmp_path / "join-token"
    token.write_text("secret-token\n")
    token.chmod(0o600)
    neuron = tmp_path / "neuron.toml"
    neuron.write_text(f'cortex = "ws://127.0.0.1:7070"\nnode_id = "gpu1"\njoin_token_file = "{token}"\n'
                      f'data_dir = "{tmp_path / "neuron-data"}"\n')
    return cortex, neuron, models


def test_good_files_pass_with_a_summary_and_nothing_is_written(tmp_path: Path) -> None:
    cortex, neuron, models = good_files(tmp_path)
    done = check("--cortex", str(cortex), "--neuron", str(neuron))
    assert done.returncode == 0, done.stderr
    assert f"cortex {cortex}: OK" in done.stdout and f"models: 2 from {models}" in done.stdout
    assert f"neuron {neuron}: OK" in done.stdout and "node_id: gpu1" in done.stdout
    assert done.stderr == ""
    # no data directory made, no identity key, join token or admin token created
    assert not (tmp_path / "cortex-data").exists() and not (tmp_path / "neuron-data").exists()
    alone = check("--models", str(models))
    assert alone.returncode == 0 and "models: 2 (chat, embed)" in alone.stdout


def test_every_problem_is_printed_naming_its_key_and_file_and_the_exit_is_2(tmp_path: Path) -> None:
    cortex, neuron, models = good_files(tmp_path)
    cortex.write_text('control_socket = "nope"\ngatway = {}\n[orchestrator]\nqueue_timeout = -1\n')
    done = check("--cortex", str(cortex))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("helexa: error: ")]
    assert len(errors) == 3, done.stderr  # all of them, not the first with "+2 more"
    assert f"helexa: error: control_socket: expected HOST:PORT, got 'nope' (in {cortex})" in errors
    assert f"helexa: error: gatway: unknown key (in {cortex})" in errors
    assert any(e.startswith("helexa: error: orchestrator.queue_timeout: ") for e in errors)
    assert f"cortex {cortex}: 3 problem(s)" in done.stdout

    models.write_text(MODELS.replace("memory_mb = 10", "memory_mb = -1")
                      + '\n[models.odd]\nbackend = "synthetic"\ncolour = 1\n')
    done = check("--models", str(models))
    assert done.returncode == 2
    assert f"helexa: error: {models}: models.chat.memory_mb: " in done.stderr
    assert f"helexa: error: {models}: models.embed.memory_mb: " in done.stderr
    assert f"helexa: error: {models}: models.odd.colour: " in done.stderr


def test_a_neurons_token_file_open_to_others_and_a_bad_node_id_are_named(tmp_path: Path) -> None:
    cortex, neuron, models = good_files(tmp_path)
    token = tmp_path / "join-token"
    token.chmod(0o644)
    neuron.write_text(neuron.read_text().replace('"gpu1"', '"bad\\u0007id"'))  # a control character
    done = check("--neuron", str(neuron))
    assert done.returncode == 2
    assert "helexa: error: node_id: " in done.stderr
    assert f"helexa: error: join_token_file {token} is open to other users" in done.stderr
    assert not (tmp_path / "neuron-data").exists()
    assert check().returncode == 2  # nothing to check: a usage error
