"""The system service units in ``packaging/systemd`` pass ``systemd-analyze verify`` (with
``ExecStart`` pointed at this venv's ``helexa``, since verify needs the binary to exist),
stop within a deadline longer than the graceful drain, and stay sandboxed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helexa.roles.cortex.config import CortexConfig
from helexa.roles.neuron.config import NeuronConfig

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
NAMES = ("helexa-cortex.service", "helexa-neuron.service")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (.ci/run installs it)")


def directives(name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def installed(tmp_path) -> Path:
    """Copies of the units with ExecStart pointing at this venv's helexa."""
    helexa = Path(sys.executable).with_name("helexa")
    assert helexa.is_file(), "the helexa console script is not installed next to this interpreter"
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/opt/helexa/bin/helexa", str(helexa))
        (tmp_path / name).write_text(text)
    return tmp_path


@needs_analyze
def test_the_units_pass_systemd_analyze_verify(installed):
    done = subprocess.run([ANALYZE, "verify", "--man=no", *(str(installed / n) for n in NAMES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # verify returns 0 for unknown keys and bad values, but says so: nothing may be said.
    ours = [line for line in done.stderr.splitlines() if "helexa" in line]
    assert ours == [], "\n".join(ours)


@needs_analyze
@pytest.mark.parametrize("name", NAMES)
def test_the_units_stay_sandboxed(installed, name):
    done = subprocess.run([ANALYZE, "security", "--offline=true", str(installed / name)],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in done.stderr and done.returncode != 0:
        pytest.skip("this systemd-analyze has no offline security check")
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout + done.stderr)
    assert level is not None, done.stdout + done.stderr
    assert float(level.group(1)) <= 3.0


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value.strip())
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_a_graceful_stop_fits_in_the_stop_timeout():
    # The neuron: Shutdown to the cortex (<= 2 s), in-flight work (grace), unloading (<= max(grace, 5)).
    grace = NeuronConfig().shutdown_grace
    neuron = directives("helexa-neuron.service")
    assert seconds(neuron["TimeoutStopSec"][0]) > 2 + grace + max(grace, 5)
    # The cortex: HTTP drain (grace + 2), then neurons told to stop.
    grace = CortexConfig().shutdown_grace
    assert seconds(directives("helexa-cortex.service")["TimeoutStopSec"][0]) > grace + 2 + 5
    for name in NAMES:
        d = directives(name)
        assert d["KillSignal"] == ["SIGTERM"] and d["Restart"] == ["on-failure"]


def test_the_neuron_takes_its_join_token_as_a_credential_and_can_reach_gpus():
    d = directives("helexa-neuron.service")
    assert d["LoadCredential"] == ["join-token:/etc/helexa/join-token"]
    assert "--join-token-file %d/join-token" in d["ExecStart"][0]
    assert "PrivateDevices" not in d and "char-nvidia-frontend rw" in d["DeviceAllow"]
    for name in NAMES:
        d = directives(name)
        assert d["User"] == ["helexa"] and d["ProtectSystem"] == ["strict"] and d["NoNewPrivileges"] == ["yes"]
        assert "helexa" in d["StateDirectory"][0]
