"""What ``pip wheel --no-deps -w dist .`` (docs/operations.md) needs to build helexa."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_setuptools_floor_reads_the_license_as_written() -> None:
    # A `license = "Apache-2.0"` string (PEP 639) is refused by setuptools before 77
    # ("`project.license` must be valid exactly by one definition"): a build without
    # isolation, as packagers run it, with setuptools 68-76 failed despite `setuptools>=68`.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = next(re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", r) for r in meta["build-system"]["requires"]
                 if r.startswith("setuptools"))
    assert floor is not None
    if isinstance(meta["project"].get("license"), str):
        assert int(floor.group(1)) >= 77
