"""``mesh-addrs.json`` (what ``helexa mesh id`` prints) on a full disk: not written, logged,
nothing left behind, and no exception (it ended a cortex's start with a traceback)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helexa.mesh.identity import ADDRS_FILE, mesh_identity, record_addrs


@pytest.fixture
def full_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_mesh_addresses_on_a_full_disk_are_logged_not_raised_and_the_last_ones_stay(full_disk, caplog) -> None:
    ident = mesh_identity(full_disk)
    record_addrs(full_disk, ident.peer_id, ["/ip4/127.0.0.1/tcp/4001"])
    with open(full_disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    assert record_addrs(full_disk, ident.peer_id, ["/ip4/127.0.0.1/tcp/4002", "/ip4/10.0.0.1/tcp/4002"] * 500) is False
    assert "cannot record the mesh addresses" in caplog.text
    assert json.loads((full_disk / ADDRS_FILE).read_text())["multiaddrs"] == ["/ip4/127.0.0.1/tcp/4001"]
    assert sorted(p.name for p in full_disk.iterdir()) == sorted(["filler", "identity.key", ADDRS_FILE])
