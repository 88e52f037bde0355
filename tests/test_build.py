"""The build a process reports as its version (``helexa/build.py``): the package version and
the commit of the git checkout it runs from, read from real checkouts made by git itself."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helexa import build

ROOT = Path(__file__).resolve().parent.parent


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "init.defaultBranch=main",
                           *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "f").write_text("a")
    git(root, "add", "f")
    git(root, "commit", "-qm", "one")
    return root


def test_a_checkout_a_worktree_packed_refs_and_a_detached_head_each_name_their_commit(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    assert build.git_commit(repo) == head
    (repo / "f").write_text("b")
    git(repo, "commit", "-qam", "two")
    second = git(repo, "rev-parse", "HEAD")
    git(repo, "pack-refs", "--all")  # the branch now lives in packed-refs only
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert build.git_commit(repo) == second
    wt = repo.parent / "wt"
    git(repo, "worktree", "add", "-q", "-b", "other", str(wt), head)  # .git is a file; its branch in the main repo
    assert (wt / ".git").is_file() and build.git_commit(wt) == head
    git(repo, "checkout", "-q", "--detach", head)
    assert build.git_commit(repo) == head


def test_no_checkout_is_the_plain_package_version(tmp_path: Path) -> None:
    assert build.git_commit(tmp_path) is None
    (tmp_path / ".git").write_text("not a gitdir line")
    assert build.git_commit(tmp_path) is None
    assert build.build_version("0.1.0", None) == "0.1.0"
    assert build.build_version("0.1.0", "47c558a" + "0" * 33) == "0.1.0+g47c558a"
    assert build.build_version("0.1.0+local", "47c558a" + "0" * 33) == "0.1.0+local.g47c558a"


def test_helexa_version_names_the_commit_it_runs_from() -> None:
    """Every release printed 0.1.0: an upgraded host could not be told from an old one."""
    if not (ROOT / ".git").exists():
        pytest.skip("not running from a git checkout")
    edited = subprocess.run(["git", "diff", "--quiet", "--", "helexa"], cwd=ROOT).returncode != 0
    want = f"{importlib.metadata.version('helexa')}+g{git(ROOT, 'rev-parse', 'HEAD')[:7]}{'.dirty' if edited else ''}"
    out = subprocess.run([sys.executable, "-m", "helexa.cli", "--version"], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == f"helexa, version {want}"


def test_exported_spans_carry_the_build_as_service_version() -> None:
    """A trace backend tells the builds of a rolling upgrade apart by ``service.version``."""
    script = ("from helexa import telemetry\n"
              "telemetry.setup(telemetry.TelemetryConfig(exporter='console'), service='helexa-cortex')\n"
              "with telemetry.tracer().start_as_current_span('x'):\n    pass\n"
              "telemetry.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert f'"service.version": "{build.version()}"' in out.stdout, out.stdout


@pytest.mark.parametrize("index_version", ["2", "3", "4"])
def test_a_checkout_whose_package_files_were_edited_is_marked_dirty(tmp_path: Path, index_version: str) -> None:
    """The build string named the commit only: a host running edited code reported the
    commit's build. Read from git's index without running git (any index version), as git
    does: a file with the index's size and time is unchanged, another is hashed."""
    root = tmp_path / "repo"
    (root / "helexa" / "sub").mkdir(parents=True)
    git(root, "init", "-q")
    (root / "helexa" / "a.py").write_text("a = 1\n")
    (root / "helexa" / "sub" / "b.py").write_text("b = 2\n")
    (root / "README").write_text("docs\n")
    git(root, "add", ".")
    git(root, "commit", "-qm", "one")
    git(root, "update-index", "--index-version", index_version)
    if index_version == "3":
        git(root, "update-index", "--skip-worktree", "README")  # an entry with extended flags
    commit = build.git_commit(root)
    assert commit is not None and build.changed(root, commit) is False
    os.utime(root / "helexa" / "a.py", (1, 1))  # touched, same content: hashed, unchanged
    assert build.changed(root, commit) is False
    (root / "README").write_text("edited docs\n")  # outside the package: not what runs
    assert build.changed(root, commit) is False
    (root / "helexa" / "sub" / "b.py").write_text("b = 3\n")
    assert build.changed(root, commit) is True
    assert build.build_version("0.1.0", commit, True) == f"0.1.0+g{commit[:7]}.dirty"
    git(root, "checkout", "--", "helexa")
    assert build.changed(root, commit) is False
    (root / "helexa" / "a.py").unlink()
    assert build.changed(root, commit) is True


def test_a_sha256_checkout_and_an_unreadable_index_are_told_apart(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "helexa").mkdir(parents=True)
    try:
        git(root, "init", "-q", "--object-format=sha256")
    except subprocess.CalledProcessError:
        pytest.skip("this git has no SHA-256 repositories")
    (root / "helexa" / "a.py").write_text("a = 1\n")
    git(root, "add", ".")
    git(root, "commit", "-qm", "one")
    commit = build.git_commit(root)
    assert commit is not None and len(commit) == 64 and build.changed(root, commit) is False
    os.utime(root / "helexa" / "a.py", (1, 1))
    assert build.changed(root, commit) is False
    (root / "helexa" / "a.py").write_text("a = 2\n")
    assert build.changed(root, commit) is True
    (root / ".git" / "index").write_bytes(b"DIRC\0\0\0\x09")
    assert build.changed(root, commit) is None
    assert build.changed(tmp_path, commit) is None  # no checkout
