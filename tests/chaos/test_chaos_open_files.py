"""A real ``helexa cortex`` under a low open-file limit, its control socket flooded with idle
connections (anyone who can reach it can open them): the portals, the admin API and the
joined neuron keep working, the log stays readable, and a neuron joins once the flood
ends. Before, the control plane admitted 1024 pending handshakes whatever the limit, so the
flood took every open file: ``accept`` failed (EMFILE) on every portal and the admin API,
and trio logged each 0.1 s retry with a traceback (9,000 lines in 25 s)."""

from __future__ import annotations

import resource
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models."m"]
backend = "synthetic"
keep_warm = true
[models."m".config]
metadata = { tokens = 3 }
"""
ASK = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
LIMIT = 160
"""The cortex's open-file soft limit; the flood is larger than it."""
FLOOD = 200


@pytest.fixture
def file_limit() -> tuple[int, int]:
    """This process's open-file limits (soft, hard); skips where the hard one is below :data:`LIMIT`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < LIMIT:
        pytest.skip(f"the hard open-file limit ({hard}) is below {LIMIT}")
    return soft, hard


def serving_under(limits: tuple[int, int], procs: ProcGroup, **cortex_args) -> tuple[Cortex, str]:
    """A cortex started with :data:`LIMIT` as its open-file soft limit (``limits``: this
    process's own, put back), neuron ``n1`` joined and one request served; and its chat URL."""
    soft, hard = limits
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, hard))  # the cortex inherits it
    try:
        cortex = procs.cortex(models=MODELS, **cortex_args)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    procs.neuron(cortex, "n1")
    url = cortex.gateway_url + "/v1/chat/completions"
    assert httpx.post(url, json=ASK, timeout=30).status_code == 200
    return cortex, url


def test_an_idle_flood_of_the_control_socket_under_a_low_file_limit_leaves_the_cortex_serving(
        tmp_path, figure, file_limit) -> None:
    with ProcGroup(tmp_path / "procs") as procs:
        cortex, url = serving_under(file_limit, procs)
        control = urlsplit(cortex.control_url)
        flood: list[socket.socket] = []
        try:
            for _ in range(FLOOD):
                try:
                    flood.append(socket.create_connection((control.hostname, control.port), timeout=2))
                except OSError:
                    pass
            time.sleep(1.0)
            t0 = time.monotonic()
            served = [httpx.post(url, json=ASK, timeout=5).status_code for _ in range(3)]
            took = time.monotonic() - t0
            assert served == [200, 200, 200]
            assert cortex.admin("GET", "/admin/fleet").status_code == 200
            assert cortex.neuron_view("n1")["health"] == "healthy"
            time.sleep(1.0)
        finally:
            for s in flood:
                s.close()
        procs.neuron(cortex, "n2", timeout=30)  # the control plane takes joins again
        log = cortex.log()
        assert "Traceback" not in log
        assert log.count("accept failed") <= 3, log[-3000:]
    figure("open-file limit 160, 200 idle connections to the control socket: 3 requests served in", took, "s")


def test_accept_failing_at_the_file_limit_is_said_once_a_minute_and_the_cortex_recovers(tmp_path, figure,
                                                                                         file_limit) -> None:
    """``gateway.max_connections`` set above what the open-file limit holds: a flood of the
    portal's socket reaches the limit and ``accept`` fails (EMFILE). It is retried every
    0.1 s and said once a minute, without a traceback; once the flood ends the portal serves."""
    with ProcGroup(tmp_path / "procs") as procs:
        cortex, url = serving_under(file_limit, procs, env={"HELEXA_GATEWAY__MAX_CONNECTIONS": "1000"})
        gateway = urlsplit(cortex.gateway_url)
        flood = [socket.create_connection((gateway.hostname, gateway.port), timeout=2) for _ in range(FLOOD)]
        try:
            time.sleep(3.0)  # some 30 failed retries
        finally:
            for s in flood:
                s.close()
        t0 = time.monotonic()
        deadline = t0 + 10
        while True:
            try:
                if httpx.post(url, json=ASK, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the portal did not serve again after the flood"
            time.sleep(0.1)
        recovered = time.monotonic() - t0
        log = cortex.log()
        assert "accept failed (EMFILE: the process's open-file limit (160) is reached" in log, log[-3000:]
        assert log.count("accept failed") == 1 and "Traceback" not in log, log[-3000:]
    figure("EMFILE on a portal's socket: lines logged in 3 s", 1)
    figure("EMFILE on a portal's socket: served again after the flood ended in", recovered, "s")
