"""A client that leaves mid-stream is an ordinary disconnect on every surface: the
generation is cancelled on the neuron and nothing is logged as an error.

The disconnect watch is held off (its grace made an hour) so that the only way the gateway
learns the client left is a write that fails: the path where the ``ClientGone`` it raises
used to be taken for a failed generation, whose error event then logged "unexpected error"
with a traceback.
"""

from __future__ import annotations

import json
import logging
import socket
import struct

import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from serving import serving

CATALOGUE = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=500)])
MESSAGES = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "chat", "stream": True, "messages": MESSAGES}),
    ("/v1/completions", {"model": "chat", "stream": True, "prompt": "x"}),
    ("/v1/messages", {"model": "chat", "stream": True, "max_tokens": 2000, "messages": MESSAGES}),
    ("/v1/responses", {"model": "chat", "stream": True, "input": "x"}),
    ("/api/chat", {"model": "chat", "messages": MESSAGES}),
    ("/api/generate", {"model": "chat", "prompt": "x"}),
])
async def test_a_client_leaving_mid_stream_is_no_error(path: str, body: dict, caplog) -> None:
    caplog.set_level(logging.INFO, logger="helexa")
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=2000, token_delay=0.005)
    async with serving(fleet, CATALOGUE) as (gateway, url):
        gateway.watch.grace = 3600.0  # no watcher: only a failing write can notice the client left
        host, port = url.removeprefix("http://").rsplit(":", 1)
        raw = json.dumps(body)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                              f"content-length: {len(raw)}\r\n\r\n{raw}".encode())
        received = b""
        while b"t2 " not in received:
            received += await stream.receive_some()
        # leave with a reset, so the gateway's next write fails at once
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        with trio.fail_after(5):
            while not neuron.cancelled or gateway.in_flight.count:
                await trio.sleep(0.01)
    assert neuron.cancelled == neuron.generations and neuron.in_flight == 0 and not neuron.finished
    assert [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any(r.exc_info for r in caplog.records)
