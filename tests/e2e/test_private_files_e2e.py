"""The cortex's SQLite files are its owner's alone (mode 0600, with their -wal and -shm),
wherever they are: the usage store holds every tenant's stored answers (``/v1/responses``)
and the keys' digests, the federation ledger the peers' usage. SQLite makes a database at
the process's umask (0644), readable by every local account where its folder lets them
in: a data directory made before the first start (``mkdir cortex-data``), or
``usage_store`` set outside it. A real ``helexa cortex`` process, with the mesh on."""

from __future__ import annotations

import os
from pathlib import Path

from procs import ProcGroup


def test_the_usage_store_and_the_ledger_are_private_in_folders_open_to_all(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual one, whatever this run's
    try:
        data = tmp_path / "cortex-data"
        data.mkdir(mode=0o755)  # made by hand before the first start
        shared = tmp_path / "srv"
        shared.mkdir(mode=0o755)
        with ProcGroup(tmp_path) as procs:
            cortex = procs.cortex(data_dir=data, env={"HELEXA_USAGE_STORE": str(shared / "usage.sqlite")},
                                  extra_args=["--operator", "a", "--mesh-listen", "/ip4/127.0.0.1/tcp/0"])
            made = cortex.admin("POST", "/admin/keys", json={"portal": "default", "name": "n"})
            assert made.status_code == 201, made.text
            files = [shared / "usage.sqlite", shared / "usage.sqlite-wal", shared / "usage.sqlite-shm",
                     data / "ledger.sqlite"]
            modes = {f.name: f.stat().st_mode & 0o777 for f in files}
    finally:
        os.umask(old)
    assert modes == {f.name: 0o600 for f in files}
