"""A network partition between a cortex and a neuron, during a stream and after it heals.

The neuron runs in a network namespace this test creates, joined to the host by a veth
pair; the cortex's control plane listens on the host's end. Taking the host's end down is
the partition (a cable pulled: packets vanish, nothing is refused); bringing it up heals
it. Needs root and ``ip netns`` (skipped, saying why, without them)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from procs import Neuron, ProcGroup, helexa_command, wait_until

pytestmark = pytest.mark.slow

MODELS = """
[models."long"]
backend = "synthetic"
pinned_on = ["far"]
keep_warm = true
[models."long".config]
metadata = { tokens = 1000, tokens_per_second = 100 }
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns():
    """``(namespace, host address, host-side link)``: a namespace reached over a veth pair."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, host_if, ns_if = f"hlx{tag}", f"hlxh{tag}", f"hlxn{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"ip netns is not available here: {exc.stderr.strip()}")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{subnet}.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{subnet}.2/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, f"{subnet}.1", host_if
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_partition_mid_stream_ends_it_with_an_error_and_the_neuron_rejoins_when_it_heals(
        netns, tmp_path, figure) -> None:
    ns, host_addr, host_if = netns
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS, extra_args=["--control-socket", f"{host_addr}:0"])
        args = ["ip", "netns", "exec", ns, *helexa_command(), "neuron", "--cortex", cortex.control_url,
                "--node-id", "far", "--join-token-file", str(cortex.join_token_file)]
        far = Neuron("far", args, tmp_path / "far.log")
        far.node_id, far.cortex = "far", cortex
        procs.procs.append(far)
        cortex.wait_neuron("far", timeout=30)
        wait_until(lambda: cortex.neuron_view("far")["models"].get("long", {}).get("state") == "loaded", 30,
                   "long loaded on far", proc=cortex)
        url = cortex.gateway_url + "/v1/chat/completions"
        body = {"model": "long", "messages": [{"role": "user", "content": "x"}], "stream": True}
        out: dict = {}

        def stream() -> None:
            events = []
            try:
                with httpx.stream("POST", url, json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
            except httpx.HTTPError as exc:
                out["transport_error"] = repr(exc)
            out["events"], out["ended"] = events, time.monotonic()

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(1.0)
        ip("link", "set", host_if, "down")
        cut = time.monotonic()
        reader.join(timeout=60)
        assert not reader.is_alive(), "the client hung through the partition"
        detect = out["ended"] - cut
        assert '"error"' in out["events"][-1] and len(out["events"]) < 1000, out["events"][-3:]
        wait_until(lambda: cortex.neuron_view("far")["health"] != "healthy", 15, "far unhealthy", proc=cortex)
        during = httpx.post(url, json={**body, "stream": False}, timeout=60)
        ip("link", "set", host_if, "up")
        healed = time.monotonic()
        cortex.wait_neuron("far", timeout=60)
        rejoin = time.monotonic() - healed
        after = httpx.post(url, json={**body, "stream": False, "max_tokens": 10}, timeout=60)
        assert after.status_code == 200, after.text
        assert during.status_code >= 500 and "Traceback" not in during.text
        figure("partition: stream error after the cut", detect, "s")
        figure("partition: tokens streamed before the cut", len(out["events"]) - 1)
        figure("partition: a request during the partition", f"{during.status_code} {during.json()['error']['code']}")
        figure("partition: time to rejoin after it heals", rejoin, "s")
        assert detect < 10
