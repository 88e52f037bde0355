"""A short run of the mesh request-stream fuzzer (``scripts/fuzz_mesh.py``; the long run's
figures are in docs/reliability.md): hostile frames as a stream's first frame, as the
request, and mid-answer; no traceback, and a bystander peer served every time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_mesh.py"


async def test_hostile_frames_end_only_their_own_streams() -> None:
    spec = importlib.util.spec_from_file_location("fuzz_mesh", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = await module.fuzz(150, concurrency=16, seed=15)
    assert report["tracebacks"] == 0, report["traceback_examples"]
    assert report["ok"], report
