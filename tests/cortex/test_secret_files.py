"""Secrets files open to other users (the join token, the admin token, the node key, a TLS
key) are refused at start with one line naming the file, its mode and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helexa.config import ConfigError
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex
from helexa.roles.neuron.config import NeuronConfig, Resolved

HELEXA = [sys.executable, "-m", "helexa.cli"]


def cortex_config(data_dir, **fields) -> CortexConfig:
    return CortexConfig(data_dir=data_dir, control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0", **fields)


def test_a_fresh_data_dir_gets_private_secrets_and_starts(tmp_path) -> None:
    cortex = Cortex(cortex_config(tmp_path / "data"))
    cortex.gateway.store.close()
    for name in ("join-token", "admin-token", "identity.key"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600, name


@pytest.mark.parametrize(("name", "what"), [("join-token", "the join token"), ("admin-token", "the admin token"),
                                            ("identity.key", "the node key")])
def test_a_secret_in_the_data_dir_open_to_others_is_refused(tmp_path, name, what) -> None:
    data = tmp_path / "data"
    Cortex(cortex_config(data)).gateway.store.close()
    (data / name).chmod(0o644)
    with pytest.raises(ConfigError) as err:
        Cortex(cortex_config(data))
    assert str(err.value) == (f"{what} {data / name} is open to other users (mode 0644); refusing to start: "
                              f"run 'chmod 600 {data / name}'")


def test_a_tls_key_readable_by_the_group_is_refused(tmp_path) -> None:
    cert, key = tmp_path / "cortex.crt", tmp_path / "cortex.key"
    cert.write_text("not read: the key is refused first\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"^tls_key_file .* is open to other users \(mode 0640\)"):
        Cortex(cortex_config(tmp_path / "data", tls_cert_file=cert, tls_key_file=key))


def test_a_neuron_refuses_a_join_token_file_open_to_others(tmp_path) -> None:
    token = tmp_path / "join-token"
    token.write_text("hlx1.x\n")
    token.chmod(0o604)
    with pytest.raises(ConfigError, match=r"^join_token_file .* \(mode 0604\)"):
        Resolved.from_config(NeuronConfig(node_id="n", join_token_file=token))
    token.chmod(0o600)
    assert Resolved.from_config(NeuronConfig(node_id="n", join_token_file=token)).token == "hlx1.x"


def test_a_neuron_makes_its_identity_key_private_and_refuses_one_open_to_others(tmp_path) -> None:
    config = NeuronConfig(node_id="n", join_token="hlx1.x", data_dir=tmp_path / "neuron")
    made = Resolved.from_config(config).identity
    key = tmp_path / "neuron" / "identity.key"
    assert made is not None and key.stat().st_mode & 0o777 == 0o600
    assert Resolved.from_config(config).identity.public_bytes == made.public_bytes  # the same key again
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"^the identity key .* \(mode 0644\)"):
        Resolved.from_config(config)
    key.chmod(0o600)
    key.write_text("garbage\n")
    with pytest.raises(ConfigError, match=r"^data_dir: the identity key .* is corrupt .*helexa neurons forget"):
        Resolved.from_config(config)


@pytest.mark.parametrize("role", ["cortex", "neuron"])
def test_the_process_says_it_in_one_line_and_exits_2(tmp_path, role) -> None:
    data = tmp_path / "data"
    Cortex(cortex_config(data)).gateway.store.close()
    (data / "join-token").chmod(0o644)
    args = (["cortex", "--data-dir", str(data), "--control-socket", "127.0.0.1:0", "--gateway-socket", "127.0.0.1:0"]
            if role == "cortex" else
            ["neuron", "--node-id", "n", "--join-token-file", str(data / "join-token")])
    out = subprocess.run(HELEXA + args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("helexa: error:")]
    assert len(lines) == 1 and "is open to other users (mode 0644)" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [["join-token"], ["admin-token"], ["join-token", "--rotate"],
                                     ["admin-token", "--rotate"]])
def test_printing_a_token_from_a_data_dir_no_cortex_made_is_refused_and_makes_nothing(tmp_path, command) -> None:
    data = tmp_path / "data"
    Cortex(cortex_config(data)).gateway.store.close()
    typo = tmp_path / "dtaa"
    done = subprocess.run([*HELEXA, *command, "--data-dir", str(typo)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"helexa: error: no cortex data directory at {typo}:"), done.stderr
    assert not typo.exists()
    printed = subprocess.run([*HELEXA, *command, "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    token = (data / command[0]).read_text().strip()
    assert printed.returncode == 0 and token in printed.stdout


def test_mesh_id_before_the_cortex_ran_makes_its_data_dir_private_as_the_cortex_does(tmp_path) -> None:
    data = tmp_path / "new-data"
    done = subprocess.run([*HELEXA, "mesh", "id", "--data-dir", str(data), "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "identity.key").stat().st_mode & 0o777 == 0o600
    # it says so (a mistyped --data-dir printed a peer id no cortex has, and nothing else), once
    assert done.stderr.startswith(f"no identity key was in {data}: made one now"), done.stderr
    again = subprocess.run([*HELEXA, "mesh", "id", "--data-dir", str(data), "--json"], capture_output=True, text=True,
                           timeout=60)
    assert (again.returncode, again.stderr, again.stdout) == (0, "", done.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
@pytest.mark.parametrize(("command", "name"), [(["join-token", "--rotate"], "join-token"),
                                               (["admin-token", "--rotate"], "admin-token"),
                                               (["admin-token"], "admin-token"), (["mesh", "id"], "identity.key")])
def test_a_secret_root_writes_in_the_cortex_users_data_dir_stays_that_users(tmp_path, command, name) -> None:
    """The cortex runs as its own user and the docs say `sudo helexa admin-token --rotate`: a
    file root wrote (mode 0600, root's) was one the cortex could no longer read."""
    data = tmp_path / "data"
    Cortex(cortex_config(data)).gateway.store.close()
    if command in (["admin-token"], ["mesh", "id"]):
        (data / name).unlink()  # made afresh (a data dir the unit made, no cortex run in it yet)
    service = 4242  # the unit's user and group, as far as files go
    for path in (data, *data.iterdir()):
        os.chown(path, service, service)
    done = subprocess.run([*HELEXA, *command, "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    made = (data / name).stat()
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (service, service, 0o600)
