"""The chaos suite: real processes, real faults (SIGSTOP, SIGKILL, a network partition in
a namespace, a full disk, corrupt files). Each test reports its figures (time to detect,
requests lost, time to recover) with the ``figure`` fixture; they are printed at the end
of the run under "chaos figures" and recorded in ``docs/reliability.md``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for helper_dir in (HERE.parent / "e2e", HERE.parent / "mesh"):
    if str(helper_dir) not in sys.path:
        sys.path.insert(0, str(helper_dir))

_FIGURES: list[str] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest):
    """``figure("time to detect", 3.2, "s")``: one measured figure of this test."""

    def record(name: str, value: float | int | str, unit: str = "") -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        line = f"{request.node.name}: {name} = {text}{(' ' + unit) if unit else ''}"
        _FIGURES.append(line)
        print(line)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _FIGURES:
        terminalreporter.section("chaos figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
