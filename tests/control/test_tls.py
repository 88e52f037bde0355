"""The control plane over wss:// with a configured certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from contextlib import asynccontextmanager

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.fleet import Fleet, Health
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import NeuronConfig
from helexa.transport import ConnectFailed
from helexa.transport import websocket as ws_transport

TOKEN = "hlx1.tls-token"


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helexa-test-cortex")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cortex.crt", tmp_path / "cortex.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_neuron_joins_over_wss_and_verifies_the_cortex_certificate(nursery, tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=0.2), Fleet(), lambda: TOKEN, ssl_context=server_ctx)
    port = await nursery.start(server.run)
    neuron = Neuron(NeuronConfig(cortex=f"wss://127.0.0.1:{port}", node_id="tls-1", join_token=TOKEN,
                                 tls_ca_file=cert_file))
    nursery.start_soon(neuron.run)
    with trio.fail_after(10):
        await neuron.joined.wait()
        while "tls-1" not in server.fleet or server.fleet.get("tls-1").heartbeats < 1:
            await trio.sleep(0.05)
    assert server.fleet.get("tls-1").health is Health.HEALTHY


async def test_a_neuron_that_cannot_verify_the_certificate_never_joins(nursery, tmp_path, autojump_clock):
    cert_file, key_file = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0"), Fleet(), lambda: TOKEN, ssl_context=server_ctx)
    port = await nursery.start(server.run)
    failures: list[ConnectFailed] = []
    two_failed = trio.Event()

    @asynccontextmanager
    async def recording(url):
        try:
            async with ws_transport.connect(url, timeout=10, ssl_context=ssl.create_default_context()) as channel:
                yield channel
        except ConnectFailed as exc:
            failures.append(exc)
            if len(failures) == 2:
                two_failed.set()
            raise

    # No tls_ca_file: the system's CAs, which do not know this self-signed certificate.
    config = NeuronConfig(cortex=f"wss://127.0.0.1:{port}", node_id="tls-2", join_token=TOKEN,
                          reconnect_initial=0.05, reconnect_max=0.1)
    neuron = Neuron(config, connector=recording)
    nursery.start_soon(neuron.run)
    # trio-websocket reports a failed verification only when its connect timeout expires
    # (with an empty message), hence the virtual clock.
    await two_failed.wait()  # it tried, failed, and tried again
    assert not neuron.joined.is_set()
    assert "tls-2" not in server.fleet
