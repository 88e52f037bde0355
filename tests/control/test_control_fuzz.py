"""A short run of the control-socket fuzzer (``scripts/fuzz_control.py``; the long run's
figures are in docs/reliability.md): hostile frames first, in place of a join, and after a
join; no traceback, the server still serving, a bystander neuron still healthy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_control.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fuzz_control", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_hostile_frames_close_only_their_own_connections() -> None:
    report = await load_script().fuzz(300, concurrency=16, seed=15)
    assert report["tracebacks"] == 0, report["traceback_examples"]
    assert report["ok"], report
    assert sum(report["outcomes"].values()) == 300
