"""SIGHUP to a real ``helexa cortex`` process: a new portal config takes effect while a
stream from a real neuron goes on uninterrupted; a broken file is refused with one line
and the running config stays; ``helexa reload`` does the same through the admin API."""

from __future__ import annotations

import signal
import subprocess
import threading

import httpx
import pytest

from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
[models."synth".config]
metadata = { tokens = 40, tokens_per_second = 20 }
"""

CONFIG = """
[portals.acme]
listen = ["127.0.0.1:0"]
aliases = { fast = "synth" }
"""

ASK = {"max_tokens": 40, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def test_sighup_applies_a_new_portal_config_while_a_stream_continues(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        procs.neuron(cortex, "n1")
        acme = cortex.portal_urls["acme"][0]
        config_file = tmp_path / "cortex-cortex.toml"
        assert config_file.exists()
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", acme + "/v1/chat/completions", json={"model": "fast", **ASK},
                              timeout=30) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        config_file.write_text(CONFIG.replace('fast = "synth" }', 'fast = "synth", quick = "synth" }'))
        cortex.signal(signal.SIGHUP)
        cortex.wait_log(r"reload: applied portals\.acme\.aliases")
        r = httpx.post(acme + "/v1/chat/completions", json={"model": "quick", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]},
                       timeout=30)
        assert r.status_code == 200, r.text
        reader.join(30)
        assert lines[-1] == "data: [DONE]" and len(lines) >= 41  # every token, then the end

        # A broken file: refused with the key named; the running config stays.
        config_file.write_text(CONFIG + "\n[orchestrator]\nretry_after = -1\n")
        cortex.signal(signal.SIGHUP)
        cortex.wait_log(r"reload refused, the running config stays: orchestrator\.retry_after")
        assert httpx.post(acme + "/v1/chat/completions", json={"model": "quick", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30).status_code == 200

        # helexa reload: the same through the admin API, with the outcome on stdout.
        config_file.write_text(CONFIG)
        done = subprocess.run([*helexa_command(), "reload", "--cortex", cortex.admin_url, "--data-dir",
                               str(cortex.data_dir)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "reload: applied portals.acme.aliases" in done.stdout
        assert httpx.post(acme + "/v1/chat/completions", json={"model": "quick", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30).status_code == 404
        assert cortex.alive
