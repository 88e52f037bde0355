"""A portal's certificate or key that cannot be loaded stops the cortex at start with one
line naming the key and exit 2, as any wrong value does. It was found only when the
portal's listener started: a traceback five exception groups deep and exit 1, which
systemd restarts every 2 s for ever (the examples/cortex.toml of every release names
/etc/helexa/tls/acme.crt, absent on most hosts)."""

from __future__ import annotations

import datetime
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helexa.config import ConfigError
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex

from test_secret_files import HELEXA


def self_signed(folder):
    """A certificate and its key (mode 0600) in ``folder``."""
    folder.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "acme.crt", folder / "acme.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def test_a_portal_whose_certificate_is_missing_stops_the_cortex_with_one_line(tmp_path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text('[portals.acme]\nlisten = ["127.0.0.1:0"]\nauth = "keys"\n'
                      f'tls_cert_file = "{tmp_path}/acme.crt"\ntls_key_file = "{tmp_path}/acme.key"\n')
    run = subprocess.run([*HELEXA, "cortex", "--config", str(config), "--data-dir", str(tmp_path / "data"),
                          "--control-socket", "127.0.0.1:0", "--gateway-socket", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"helexa: error: portals.acme.tls_cert_file: cannot read {tmp_path}/acme.crt (No such file or directory)")


def test_a_certificate_with_another_key_is_refused_naming_both(tmp_path) -> None:
    cert, key = self_signed(tmp_path / "a")
    _, other_key = self_signed(tmp_path / "b")

    def config(key_file) -> CortexConfig:
        portal = {"listen": ["127.0.0.1:0"], "auth": "keys", "tls_cert_file": cert, "tls_key_file": key_file}
        return CortexConfig(data_dir=tmp_path / "data", control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0",
                            usage_store=":memory:", portals={"acme": portal})

    with pytest.raises(ConfigError, match=r"^portals\.acme\.tls_cert_file, portals\.acme\.tls_key_file: not a PEM"):
        Cortex(config(other_key))
    Cortex(config(key)).gateway.store.close()  # the pair that belongs together starts
