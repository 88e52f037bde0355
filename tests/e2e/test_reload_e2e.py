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


def test_a_config_saved_in_another_encoding_is_refused_on_reload_and_at_start_without_stopping_anything(
        tmp_path) -> None:
    """A portal's display name with an accent, saved by an editor in Latin-1: SIGHUP stopped
    the whole cortex (an uncaught UnicodeDecodeError out of the signal task), ``helexa
    reload`` got a 500, and a start printed a traceback and exited 1. Each is now the one
    line naming the file, the running config staying."""
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, config=CONFIG)
        procs.neuron(cortex, "n1")
        config_file = tmp_path / "cortex-cortex.toml"
        config_file.write_bytes(CONFIG.replace("[portals.acme]", '[portals.acme]\nname = "Caf\xe9"').encode("latin-1"))
        cortex.signal(signal.SIGHUP)
        cortex.wait_log(r"reload refused, the running config stays: config file \S+: not UTF-8 text")
        done = subprocess.run([*helexa_command(), "reload", "--cortex", cortex.admin_url, "--data-dir",
                               str(cortex.data_dir)], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "not UTF-8 text" in done.stderr and "500" not in done.stderr, done.stderr
        acme = cortex.portal_urls["acme"][0]
        assert httpx.post(acme + "/v1/chat/completions", json={"model": "fast", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30).status_code == 200
        assert cortex.alive and "Traceback" not in cortex.log()
    started = subprocess.run([*helexa_command(), "cortex", "--config", str(config_file), "--data-dir",
                              str(tmp_path / "other"), "--control-socket", "127.0.0.1:0", "--gateway-socket",
                              "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and "Traceback" not in started.stderr, started.stderr
    assert started.stderr.strip().endswith("not UTF-8 text (invalid continuation byte at byte 27): save it as UTF-8")
