"""The cortex's data directory under faults, with real ``helexa cortex`` processes: corrupt
or truncated files at start (one clear line, exit 2, no traceback), and a full disk under
it while it serves (the ledger refuses loudly, a portal that records usage serves nothing it
cannot record, nothing is corrupt after, serving resumes once there is room)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from procs import ProcGroup, helexa_command

pytestmark = pytest.mark.slow

ARGS = ["--control-socket", "127.0.0.1:0", "--gateway-socket", "127.0.0.1:0", "--log-level", "warning"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A data directory a cortex made and stopped cleanly."""
    data = tmp_path_factory.mktemp("pristine") / "data"
    with ProcGroup(data.parent / "procs") as procs:
        procs.cortex(data_dir=data).stop()
    return data


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "node key garbage": ("identity.key", lambda p: p.write_bytes(b"\x00garbage\xff" * 4)),
    "node key truncated": ("identity.key", truncate_half),
    "join token empty": ("join-token", lambda p: p.write_text("")),
    "join token binary": ("join-token", lambda p: p.write_bytes(b"\xff\xfe\x00")),
    "admin token empty": ("admin-token", lambda p: p.write_text("")),
    "usage store truncated": ("usage.sqlite", truncate_half),
    "usage store garbage": ("usage.sqlite", lambda p: p.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))),
    "neuron key bindings truncated": ("neuron-keys.json",
                                      lambda p: p.write_text('{"version": 1, "bindings": {"n1": {"public_k')),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_file_at_start_is_one_clear_line_and_exit_2(pristine, tmp_path, case, figure) -> None:
    name, corrupt = CORRUPTIONS[case]
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    for extra in ("usage.sqlite-wal", "usage.sqlite-shm"):
        (data / extra).unlink(missing_ok=True)
    corrupt(data / name)
    out = subprocess.run([*helexa_command(), "cortex", "--data-dir", str(data), *ARGS],
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("helexa: error: ") and str(data / name) in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    figure(f"corrupt {case}: the line", lines[0].replace(str(data), "DATA"))


MODELS = """
[models."m"]
backend = "synthetic"
keep_warm = true
[models."m".config]
metadata = { tokens = 5 }
"""
CONFIG = """
[portals.default]
record_usage = true
"""
ASK = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs for the data directory (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_ledger_refuses_recorded_requests_and_nothing_is_corrupt(
        small_disk, tmp_path, figure) -> None:
    with ProcGroup(tmp_path / "procs") as procs:
        cortex = procs.cortex(data_dir=small_disk / "cortex", models=MODELS, config=CONFIG)
        procs.neuron(cortex, "n1")
        url = cortex.gateway_url + "/v1/chat/completions"
        assert all(httpx.post(url, json=ASK, timeout=30).status_code == 200 for _ in range(3))
        filler = fill(small_disk)
        full = [httpx.post(url, json=ASK, timeout=30) for _ in range(5)]
        t0 = time.monotonic()
        stream = httpx.post(url, json={**ASK, "stream": True}, timeout=30)
        assert all(r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable" for r in full)
        assert all(r.headers["retry-after"] for r in full)
        assert stream.status_code == 200 and '"code":"ledger_unavailable"' in stream.text  # its error event
        assert "usage ledger: a commit of 1 record(s) failed: database or disk is full" in cortex.log()
        assert "Traceback" not in cortex.log()
        assert httpx.get(cortex.gateway_url + "/health", timeout=5).status_code == 200
        filler.unlink()
        recovered = time.monotonic()
        after = [httpx.post(url, json=ASK, timeout=30).status_code for _ in range(3)]
        recover = time.monotonic() - recovered
        assert after == [200, 200, 200]
        records = cortex.admin("GET", "/admin/usage/records").json()["data"]
        assert len(records) == 6  # 3 before, 3 after: none of the refused ones
        cortex.stop()
    db = sqlite3.connect(small_disk / "cortex" / "usage.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM usage").fetchone() == (6,)
    db.close()
    figure("full disk: recorded requests refused while full (503 ledger_unavailable)", "5 of 5 + 1 stream")
    figure("full disk: integrity_check after", "ok")
    figure("full disk: first request ok after room came back", recover, "s")


def start_failure(data: Path) -> list[str]:
    out = subprocess.run([*helexa_command(), "cortex", "--data-dir", str(data), *ARGS],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("helexa: error: "), out.stderr
    return lines


def test_a_full_disk_at_start_is_called_full_not_a_corrupt_store_to_restore(pristine, small_disk, figure) -> None:
    """Before, a cortex started on a full disk said its usage store was "corrupt or
    truncated" and to "restore it from a backup": the operator would have replaced a sound
    ledger (the money) with an older one, when freeing space was the fix."""
    data = small_disk / "data"
    shutil.copytree(pristine, data)
    filler = fill(small_disk)
    [line] = start_failure(data)
    assert "usage.sqlite" in line and "disk is full" in line, line
    assert "corrupt" not in line and "backup" not in line, line
    figure("full disk at start: the line", line.replace(str(data), "DATA"))
    filler.unlink()
    db = sqlite3.connect(data / "usage.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_a_read_only_data_directory_is_refused_at_start_saying_so(pristine, small_disk, figure) -> None:
    """A data directory outside the packaged unit's writable paths (ProtectSystem=strict) is
    read-only: before, the cortex blamed its ``tls_cert_file`` (which it has none of), or,
    with the usage store's ``-wal`` there, started and refused every recorded request."""
    data = small_disk / "data"
    shutil.copytree(pristine, data)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    [line] = start_failure(data)
    assert str(data) in line and "read-only" in line and "tls_cert_file" not in line, line
    figure("read-only data directory at start: the line", line.replace(str(data), "DATA"))
