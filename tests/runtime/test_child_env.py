"""The processes a neuron starts (a model's worker, a supervised OpenAI-style server) do not
inherit the secrets helexa took from its own environment (``HELEXA_JOIN_TOKEN``, the
documented alternative to a token file, and the like): a model's code or a third party's
server has no use for them, may log its environment, and is readable in
``/proc/PID/environ``. Real processes."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from helexa.protocol import ModelConfig
from helexa.runtime import create_backend
from helexa.runtime.worker import WorkerBackend

SECRETS = {
    "HELEXA_JOIN_TOKEN": "hlx1.joinjoinjoin",
    "HELEXA_ADMIN_TOKEN": "hlx-admin-adminadmin",
    "HELEXA_API_KEY": "sk-hlx-0123456789abcdef_keykeykey",
    "HELEXA_SOURCES__HF_TOKEN": "hf_hubhubhub",
}
KEPT = {"HELEXA_JOIN_TOKEN_FILE": "/etc/helexa/join-token", "HELEXA_CPU_POLICY": "normal", "HF_HOME": "/tmp/hf"}

# Writes its environment to argv[2], then answers every GET with 200 (ready).
DUMPING_SERVER = textwrap.dedent(
    """
    import http.server, json, os, sys
    with open(sys.argv[2], "w") as fh:
        json.dump(dict(os.environ), fh)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(name, value)


def assert_clean(environment: dict[str, str]) -> None:
    for name in SECRETS:
        assert name not in environment
    assert not any(value in environment.values() for value in SECRETS.values())
    for name, value in KEPT.items():
        assert environment.get(name) == value  # everything else is inherited as before


async def test_a_worker_process_gets_no_secret_of_the_neurons(secret_environment, nursery) -> None:
    backend = WorkerBackend(ModelConfig("s", "synthetic", metadata={"isolate": True, "tokens": 3}))
    backend.service_nursery = nursery
    with trio.fail_after(60):
        await backend.load(lambda *a: None)
    try:
        raw = Path(f"/proc/{backend.pid}/environ").read_bytes()
        environment = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        assert_clean(environment)
    finally:
        await backend.unload()


async def test_a_supervised_server_gets_no_secret_of_the_neurons_but_its_own_env(
        secret_environment, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = tmp_path / "env.json"
    config = ModelConfig("dumping", "openai_proxy", command=sys.executable,
                         args=("-c", DUMPING_SERVER, str(port), str(dump)), env={"VLLM_API_KEY": "its-own"},
                         listen_endpoint=f"http://127.0.0.1:{port}", metadata={"stop_grace": 0.5})
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        with trio.fail_after(60):
            await backend.load(lambda *a: None)
            await backend.unload()
    environment = json.loads(dump.read_text())
    assert_clean(environment)
    assert environment["VLLM_API_KEY"] == "its-own"  # the catalogue's env still reaches it
