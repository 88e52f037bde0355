"""One usage store, one cortex: a second cortex on the same ``usage_store`` is refused at
start, in one line (exit 2, as a config error). Two kept each their own keys and budgets in memory over one ledger: a
tenant could spend its budget once on each, and a key revoked on one kept working on the
other."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex
from helexa.roles.cortex.portal.store import StoreInUse


def cortex_config(data_dir, **fields) -> CortexConfig:  # noqa: ANN001, ANN003
    return CortexConfig(data_dir=data_dir, control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0", **fields)


def test_a_second_cortex_on_one_usage_store_is_refused_and_the_first_keeps_it(tmp_path) -> None:
    shared = tmp_path / "usage.sqlite"
    first = Cortex(cortex_config(tmp_path / "a", usage_store=shared))
    try:
        with pytest.raises(StoreInUse, match=r"is in use by another cortex"):
            Cortex(cortex_config(tmp_path / "b", usage_store=shared))
        # in another process, as an operator would start it: one line, exit 2
        run = subprocess.run(
            [sys.executable, "-m", "helexa.cli", "cortex", "--data-dir", str(tmp_path / "c"), "--control-socket",
             "127.0.0.1:0", "--gateway-socket", "127.0.0.1:0"],
            env={"HELEXA_USAGE_STORE": str(shared), "PATH": "/usr/bin:/bin",
                 "PYTHONPATH": ":".join(p for p in sys.path if p)},
            capture_output=True, text=True, timeout=60)
    finally:
        first.gateway.store.close()
        first.gateway.responses.store.close()
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"helexa: error: the usage store {shared} is in use by another cortex (two cortexes "
        "on one usage store would each keep their own budgets and keys; give each its own usage_store)"]
    # the first let go of it: the next cortex takes it
    Cortex(cortex_config(tmp_path / "d", usage_store=shared)).gateway.store.close()
