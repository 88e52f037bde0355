"""The control plane between real processes: `helexa cortex` and `helexa neuron` started
as a user would, observed through `helexa status --json`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

HELEXA = [sys.executable, "-m", "helexa.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "cortex"
        self.control = free_port()
        self.gateway = free_port()
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HELEXA_HEARTBEAT_INTERVAL": "0.2",
            "HELEXA_REMOVE_AFTER": "2",
            "HELEXA_RECONNECT_INITIAL": "0.1",
            "HELEXA_RECONNECT_MAX": "0.5",
        }
        self.procs: list[subprocess.Popen] = []

    def start_cortex(self) -> subprocess.Popen:
        log = open(self.tmp / f"cortex-{len(self.procs)}.log", "w")
        p = subprocess.Popen(
            HELEXA + ["cortex", "--data-dir", str(self.data), "--control-socket", f"127.0.0.1:{self.control}",
                      "--gateway-socket", f"127.0.0.1:{self.gateway}"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        self.procs.append(p)
        self.wait(lambda: self.fleet() is not None, "the cortex to answer")
        return p

    def start_neuron(self, node_id: str) -> subprocess.Popen:
        log = open(self.tmp / f"neuron-{node_id}.log", "w")
        p = subprocess.Popen(
            HELEXA + ["neuron", "--cortex", f"ws://127.0.0.1:{self.control}", "--node-id", node_id,
                      "--join-token-file", str(self.data / "join-token")],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        self.procs.append(p)
        return p

    def fleet(self) -> dict | None:
        """The fleet as the admin API reports it (asked directly: a ``helexa status`` process
        per poll takes over a second on a loaded machine, longer than a state lasts here)."""
        try:
            token = (self.data / "admin-token").read_text().strip()
            r = httpx.get(f"http://127.0.0.1:{self.gateway}/admin/fleet", headers={"authorization": f"Bearer {token}"},
                          timeout=2)
        except (OSError, httpx.HTTPError):
            return None
        return r.json() if r.status_code == 200 else None

    def status_cli(self) -> dict:
        """The fleet as ``helexa status --json`` prints it."""
        out = subprocess.run(
            HELEXA + ["status", "--cortex", f"http://127.0.0.1:{self.gateway}", "--data-dir", str(self.data), "--json",
                      "--timeout", "5"],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def neuron(self, node_id: str) -> dict | None:
        fleet = self.fleet() or {"neurons": []}
        return next((n for n in fleet["neurons"] if n["node_id"] == node_id), None)

    def wait(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.tmp.glob("*.log"))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


def test_a_killed_neuron_goes_offline_then_is_removed(cluster):
    cluster.start_cortex()
    neuron = cluster.start_neuron("victim")
    cluster.wait(lambda: (n := cluster.neuron("victim")) is not None and n["health"] == "healthy", "the neuron to join")
    assert [n["node_id"] for n in cluster.status_cli()["neurons"]] == ["victim"]
    beat = cluster.neuron("victim")["last_heartbeat"]
    cluster.wait(lambda: cluster.neuron("victim")["last_heartbeat"] > beat, "a heartbeat to update the fleet")
    neuron.kill()
    cluster.wait(lambda: (n := cluster.neuron("victim")) is not None and n["health"] == "offline", "offline", 10)
    cluster.wait(lambda: cluster.neuron("victim") is None, "removal", 10)


def test_a_restarted_cortex_is_rejoined_and_told_what_is_loaded(cluster):
    cortex = cluster.start_cortex()
    cluster.start_neuron("keeper")
    cluster.wait(lambda: cluster.neuron("keeper") is not None, "the neuron to join")
    gateway = f"http://127.0.0.1:{cluster.gateway}"
    r = httpx.post(
        gateway + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["hello"]}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert cluster.neuron("keeper")["models"]["all-minilm-l6-v2"]["state"] == "loaded"
    cortex.send_signal(signal.SIGTERM)
    assert cortex.wait(20) == 0
    cluster.start_cortex()  # same data dir (identity, join token) and ports
    cluster.wait(
        lambda: (n := cluster.neuron("keeper")) is not None
        and n["models"].get("all-minilm-l6-v2", {}).get("state") == "loaded",
        "the neuron to rejoin with its model still loaded",
    )
    # Served at once, without a new load.
    r = httpx.post(gateway + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["again"]}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_wrong_join_token_is_refused_and_the_process_says_why(cluster, tmp_path):
    cluster.start_cortex()
    bad = tmp_path / "bad-token"
    bad.write_text("hlx1.not-the-token\n")
    bad.chmod(0o600)  # a token open to others is refused before any dialling
    out = subprocess.run(
        HELEXA + ["neuron", "--cortex", f"ws://127.0.0.1:{cluster.control}", "--node-id", "intruder",
                  "--join-token-file", str(bad)],
        capture_output=True, text=True, timeout=60, env=cluster.env,
    )
    assert out.returncode == 3
    assert "join proof does not match" in out.stderr
    assert "Traceback" not in out.stderr
    assert cluster.neuron("intruder") is None


def test_a_cortex_stops_at_once_with_idle_client_connections_open(cluster):
    """Graceful means in-flight requests finish; idle keep-alive connections must not hold
    the stop for the whole grace period."""
    cortex = cluster.start_cortex()
    cluster.start_neuron("idle")
    cluster.wait(lambda: cluster.neuron("idle") is not None, "the neuron to join")
    with httpx.Client() as client:
        r = client.post(
            f"http://127.0.0.1:{cluster.gateway}/v1/embeddings",
            json={"model": "all-minilm-l6-v2", "input": ["hi"]},
            timeout=60,
        )
        assert r.status_code == 200
        started = time.monotonic()
        cortex.send_signal(signal.SIGTERM)
        assert cortex.wait(20) == 0
        assert time.monotonic() - started < 5


def test_the_fleet_view_and_status_name_the_build_each_node_runs(cluster):
    """Every release reported 0.1.0: an operator could not tell upgraded neurons apart."""
    from helexa import build

    cluster.start_cortex()
    cluster.start_neuron("upgraded")
    cluster.wait(lambda: cluster.neuron("upgraded") is not None, "the neuron to join")
    version = build.version.__wrapped__()  # read now, as the processes did (a commit may have come since import)
    assert "+g" in version or not (Path(build.__file__).parent.parent / ".git").exists()
    assert cluster.fleet()["cortex"] == {"version": version}
    assert cluster.neuron("upgraded")["descriptor"]["software"] == f"helexa {version}"
    out = subprocess.run(
        HELEXA + ["status", "--cortex", f"http://127.0.0.1:{cluster.gateway}", "--data-dir", str(cluster.data)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"cortex {version}"
    header, row = lines[1].split(), lines[2].split()
    assert row[0] == "upgraded" and row[header.index("VERSION")] == version
