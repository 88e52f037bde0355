"""A client cannot forge a line of the cortex's log: the gateway logs each request's path at
DEBUG, and the orchestrator an unknown model's name; a line break in either (``%0a`` in a
URL, ``\\n`` in a JSON string) used to start a line of the client's choosing. Real sockets,
the process's own log set-up, text and JSON."""

from __future__ import annotations

import io
import json

import httpx

from helexa import logs
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from portals import portals

FORGED = "22:00:00 WARNING helexa.roles.cortex.control_server: FORGED neuron evil joined"


async def test_a_line_break_from_a_client_never_starts_a_log_line() -> None:
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("debug", fmt, stream=out)
        try:
            fleet = Fleet()
            NeuronDouble("n1", fleet, loaded=("chat",))
            async with portals(fleet, {}) as (_, urls):
                async with httpx.AsyncClient(base_url=urls["default"]) as api:
                    assert (await api.get("/v1/models%0a" + FORGED.replace(" ", "%20"))).status_code == 404
                    assert (await api.get("/v1/models%0d%0a" + FORGED.replace(" ", "%20"))).status_code == 404
                    body = {"model": "x\n" + FORGED, "messages": [{"role": "user", "content": "x"}]}
                    assert (await api.post("/v1/chat/completions", json=body)).status_code == 404
        finally:
            logs.setup("info")
        lines = out.getvalue().splitlines()
        assert sum("FORGED" in line for line in lines) >= 3, fmt  # the requests were logged...
        for line in lines:
            if fmt == "json":
                line = json.loads(line)["message"]
            assert not line.startswith("22:00:00"), (fmt, line)  # ...never as a line of their own
