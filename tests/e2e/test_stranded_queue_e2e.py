"""A request waiting for a cold load on the only neuron that can hold its model, when that
neuron stops (SIGTERM: it drains, then leaves): the request gets the 503 a new request
gets at once, instead of waiting out the queue's deadline (300 s by default) for a load
no neuron can do."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models.slowload]
backend = "synthetic"
[models.slowload.config]
metadata = { tokens = 5, load_seconds = 4 }
"""


def test_a_request_waiting_for_a_load_on_a_neuron_that_stops_gets_503_not_the_queue_deadline(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS)
        n1 = procs.neuron(cortex, "n1", env={"HELEXA_SHUTDOWN_GRACE": "1"})
        body = {"model": "slowload", "messages": [{"role": "user", "content": "x"}]}
        with ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            waiting = pool.submit(httpx.post, cortex.gateway_url + "/v1/chat/completions", json=body, timeout=60)
            cortex.wait_model("n1", "slowload", "loading")
            n1.terminate()
            r = waiting.result()
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_capacity" and r.headers["retry-after"]
        assert time.monotonic() - t0 < 20
        assert n1.popen.wait(15) == 0
        again = httpx.post(cortex.gateway_url + "/v1/chat/completions", json=body, timeout=10)
        assert again.status_code == 503  # as a new request gets it
