"""End-to-end tests start real processes (see :mod:`procs`); a failing test's report gets
the tail of every still-running process's log."""

from __future__ import annotations

import pytest

from procs import live_groups


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.failed:
        for group in live_groups():
            report.sections.append((f"process logs ({group.workdir})", group.logs()))
    return report
