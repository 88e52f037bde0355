"""A join token that pins the cortex's certificate (``hlx1.<secret>::sha256:<hex>``): a
neuron verifies a ``wss://`` cortex with a self-signed certificate by the pin alone, and a
cortex with another certificate never hears a hello."""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager

import pytest
import trio

from helexa.config import ConfigError
from helexa.protocol import auth
from helexa.roles.cortex import join_token
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import NeuronConfig, Resolved
from helexa.transport import ConnectFailed
from helexa.transport import websocket as ws_transport
from test_tls import self_signed

SECRET = "hlx1.pinned-secret"


def pem_pin(cert_file) -> str:
    return auth.cert_fingerprint(ssl.PEM_cert_to_DER_cert(cert_file.read_text()))


async def wss_cortex(nursery, tmp_path, **fields) -> tuple[ControlServer, int, str]:
    cert_file, key_file = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=0.2, **fields), Fleet(),
                           lambda: SECRET, ssl_context=ctx)
    return server, await nursery.start(server.run), pem_pin(cert_file)


def test_a_token_splits_into_its_secret_and_pin() -> None:
    pin = "ab" * 32
    assert auth.split_token(SECRET) == (SECRET, None)
    assert auth.split_token(auth.with_pin(SECRET, pin.upper())) == (SECRET, pin)
    assert auth.with_pin(auth.with_pin(SECRET, "00" * 32), pin) == f"{SECRET}::sha256:{pin}"
    with pytest.raises(ValueError, match="64 hex digits"):
        auth.split_token(SECRET + "::sha256:abc")


def test_the_cortex_prints_the_token_with_its_certificate_pin(tmp_path) -> None:
    cert_file, _ = self_signed(tmp_path)
    data = tmp_path / "data"
    secret = join_token.load_or_create(data)
    assert join_token.for_neurons(data) == secret
    pin = join_token.record_fingerprint(data, cert_file)
    assert pin == pem_pin(cert_file)
    assert join_token.for_neurons(data) == f"{secret}::sha256:{pin}"
    assert join_token.read(join_token.path_in(data)) == secret  # the proofs use the secret alone
    join_token.record_fingerprint(data, None)  # TLS turned off: no stale pin
    assert join_token.for_neurons(data) == secret


def test_a_pinned_token_for_a_plain_ws_cortex_is_a_config_error() -> None:
    config = NeuronConfig(cortex="ws://127.0.0.1:1", node_id="n", join_token=auth.with_pin(SECRET, "ab" * 32))
    with pytest.raises(ConfigError, match="not wss://"):
        Resolved.from_config(config)


async def test_a_neuron_verifies_a_self_signed_cortex_by_the_pin_in_its_token(nursery, tmp_path) -> None:
    server, port, pin = await wss_cortex(nursery, tmp_path)
    config = NeuronConfig(cortex=f"wss://127.0.0.1:{port}", node_id="pinned", join_token=auth.with_pin(SECRET, pin))
    neuron = Neuron(config)  # no tls_ca_file: the system's CAs do not know this certificate
    nursery.start_soon(neuron.run)
    with trio.fail_after(10):
        await neuron.joined.wait()
    assert "pinned" in server.fleet


async def test_a_cortex_whose_certificate_is_not_the_pinned_one_never_hears_a_hello(nursery, tmp_path) -> None:
    server, port, _ = await wss_cortex(nursery, tmp_path)
    failures: list[ConnectFailed] = []
    twice = trio.Event()

    @asynccontextmanager
    async def recording(url):
        try:
            async with ws_transport.connect(url, timeout=5, pin="00" * 32) as channel:
                yield channel
        except ConnectFailed as exc:
            failures.append(exc)
            if len(failures) == 2:
                twice.set()
            raise

    config = NeuronConfig(cortex=f"wss://127.0.0.1:{port}", node_id="misled",
                          join_token=auth.with_pin(SECRET, "00" * 32), reconnect_initial=0.05, reconnect_max=0.1)
    neuron = Neuron(config, connector=recording)
    nursery.start_soon(neuron.run)
    with trio.fail_after(10):
        await twice.wait()
    assert "is not the one the join token pins" in str(failures[0])
    assert not neuron.joined.is_set() and "misled" not in server.fleet
    assert server.refusals == 0  # it stopped before the websocket upgrade: no hello at all
