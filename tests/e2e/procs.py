"""Real ``helexa cortex`` / ``helexa neuron`` processes for end-to-end tests.

A :class:`ProcGroup` starts processes and stops every one of them when it closes::

    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS_TOML, env={"HELEXA_GATEWAY__MAX_BODY_BYTES": "65536"})
        n1 = procs.neuron(cortex, "n1")          # returns once n1 is healthy in /admin/fleet
        ... cortex.gateway_url, cortex.fleet(), cortex.wait_model(...) ...
        n1.kill()                                # SIGKILL, as a crash

* Ports: the cortex binds port 0 for both sockets and the helper reads the addresses from
  the ``cortex ready: control=... gateway=...`` line it logs, so nothing races for ports.
* Readiness: :meth:`ProcGroup.cortex` returns once that line appears; :meth:`ProcGroup.neuron`
  once the cortex's ``/admin/fleet`` lists the neuron as healthy. Each wait has a deadline
  and fails with :class:`ProcError`, whose message carries the tail of every log.
* Logs: each process writes stdout and stderr to ``<dir>/<name>.log`` (a file, never a pipe,
  so a chatty process can never block on a full pipe). :meth:`Proc.log` reads it back;
  :meth:`ProcGroup.logs` gives all of them for a failure message. The e2e conftest attaches
  them to the report of a failing test.
* Stopping: :meth:`Proc.stop` sends SIGTERM, waits ``grace`` seconds, then SIGKILLs the
  process group (each process leads its own session, so children such as a supervised
  ``openai_proxy`` server go too). Neurons stop before the cortex.

Only the standard library and httpx (a project dependency) are used, so a benchmark can
import this module as well.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

READY = re.compile(r"cortex ready: control=(\S+) gateway=(\S+)(?: admin=(\S+))?")
PORTAL = re.compile(r"portal (\S+) \(\S+\) listening on (.*)$", re.M)
MESH = re.compile(r"mesh: operator .*, peer (\S+), listening on (.*)$", re.M)
_LIVE_GROUPS: list["ProcGroup"] = []


class ProcError(AssertionError):
    """A process did not start, did not become ready in time, or died unexpectedly."""


def helexa_command() -> list[str]:
    """The ``helexa`` console script beside this interpreter, else ``python -m helexa.cli``."""
    script = Path(sys.executable).with_name("helexa")
    if script.is_file():
        return [str(script)]
    found = shutil.which("helexa")
    return [found] if found else [sys.executable, "-m", "helexa.cli"]


class Proc:
    """One running ``helexa`` process, its log file and how to stop it."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(env or {})
        self._log_file = open(log_path, "wb")
        self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regex); raise :class:`ProcError` if the
        process exits first or ``timeout`` passes."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if not self.alive:
                raise ProcError(f"{self.name} exited ({self.popen.returncode}) before logging "
                                f"{rx.pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ProcError(f"{self.name} did not log {rx.pattern!r} within {timeout:g}s:\n{self.tail()}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process (a crash: no goodbye to anyone) and reap it."""
        if self.alive:
            self.popen.kill()
        self.popen.wait()

    _terminated = False

    def terminate(self) -> None:
        """Send SIGTERM once (the start of a graceful stop); :meth:`stop` finishes it.

        Never twice: a second SIGTERM that lands after the process has left its signal
        handler kills it with the default action, and it would exit -15 instead of 0."""
        if self.alive and not self._terminated:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL its process group. Returns the exit code."""
        self.terminate()
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # leftovers: the process or its children
        except (ProcessLookupError, PermissionError):
            pass
        code = self.popen.wait()
        self._log_file.close()
        return code


class Cortex(Proc):
    """A ``helexa cortex`` process; its URLs (and mesh identity) are known once it is ready."""

    control_url: str = ""
    gateway_url: str = ""
    admin_url: str = ""
    portal_urls: dict[str, list[str]] = {}
    peer_id: str | None = None
    mesh_addrs: list[str] = []
    data_dir: Path

    def _ready(self, timeout: float) -> None:
        m = self.wait_log(READY, timeout)
        self.control_url, self.gateway_url = m.group(1), m.group(2)
        self.admin_url = m.group(3) or self.gateway_url
        self.portal_urls = {pm.group(1): [u.strip() for u in pm.group(2).split(",")]
                            for pm in PORTAL.finditer(self.log())}
        mesh = MESH.search(self.log())
        if mesh:
            self.peer_id = mesh.group(1)
            self.mesh_addrs = [a.strip() for a in mesh.group(2).split(",") if a.strip()]

    def models(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/models`` as a dict keyed by model id."""
        resp = self.get("/v1/models")
        resp.raise_for_status()
        return {m["id"]: m for m in resp.json()["data"]}

    @property
    def join_token_file(self) -> Path:
        return self.data_dir / "join-token"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.gateway_url + path, timeout=timeout)

    def admin(self, method: str, path: str, timeout: float = 5.0, **kwargs: Any) -> httpx.Response:
        """A request to the admin API, with the admin token."""
        return httpx.request(method, self.admin_url + path, timeout=timeout,
                             headers={"authorization": f"Bearer {self.admin_token}"}, **kwargs)

    def fleet(self) -> dict[str, Any]:
        """``GET /admin/fleet`` as JSON."""
        resp = self.admin("GET", "/admin/fleet")
        resp.raise_for_status()
        return resp.json()

    def neuron_view(self, node_id: str) -> dict[str, Any] | None:
        """This neuron's entry in ``/admin/fleet`` (None while it is not listed)."""
        return next((n for n in self.fleet()["neurons"] if n["node_id"] == node_id), None)

    def wait_for(self, predicate, what: str, timeout: float = 15.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
        """Poll ``predicate(fleet_json)`` until it returns something truthy (returned)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            if not self.alive:
                raise ProcError(f"{self.name} exited ({self.popen.returncode}) while waiting for {what}:\n{self.tail()}")
            try:
                last = self.fleet()
                got = predicate(last)
            except httpx.HTTPError as exc:
                last, got = repr(exc), None
            if got:
                return got
            if time.monotonic() > deadline:
                raise ProcError(f"timed out after {timeout:g}s waiting for {what}; last fleet: {last}\n"
                                f"{self.name} log:\n{self.tail()}")
            time.sleep(interval)

    def wait_neuron(self, node_id: str, health: str = "healthy", timeout: float = 15.0) -> dict[str, Any]:
        def check(fleet: dict[str, Any]) -> dict[str, Any] | None:
            n = next((n for n in fleet["neurons"] if n["node_id"] == node_id), None)
            return n if n is not None and n["health"] == health else None

        return self.wait_for(check, f"neuron {node_id} {health}", timeout)

    def wait_model(self, node_id: str, model_id: str, state: str = "loaded", timeout: float = 15.0) -> dict[str, Any]:
        """Wait until ``model_id`` is in ``state`` on ``node_id`` (``state=None``: absent)."""
        def check(fleet: dict[str, Any]) -> Any:
            n = next((n for n in fleet["neurons"] if n["node_id"] == node_id), None)
            if n is None:
                return None
            st = n["models"].get(model_id)
            if state is None:
                return st is None and n
            return st is not None and st["state"] == state and n

        return self.wait_for(check, f"model {model_id} {state} on {node_id}", timeout)


class Neuron(Proc):
    node_id: str = ""
    cortex: Cortex


class ProcGroup:
    """Starts cortex and neuron processes and stops all of them on :meth:`close`.

    Args:
        workdir: where data directories, config files and logs go.
        grace: seconds each process gets to stop after SIGTERM before SIGKILL (a cortex
            drains for its ``shutdown_grace``, 10 s by default, so keep this above that).
    """

    def __init__(self, workdir: Path, *, grace: float = 15.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.grace = grace
        self.procs: list[Proc] = []

    def __enter__(self) -> "ProcGroup":
        _LIVE_GROUPS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _name(self, base: str) -> str:
        taken = {p.name for p in self.procs}
        if base not in taken:
            return base
        i = 2
        while f"{base}-{i}" in taken:
            i += 1
        return f"{base}-{i}"

    def cortex(self, *, name: str = "cortex", data_dir: Path | None = None, models: str | Path | None = None,
               config: str | Path | None = None, extra_args: Iterable[str] = (),
               env: Mapping[str, str] | None = None, timeout: float = 30.0) -> Cortex:
        """Start a cortex on free loopback ports and wait until it is ready.

        Args:
            data_dir: its ``--data-dir`` (default ``<workdir>/<name>-data``).
            models: a ``models.toml`` path, or its text (written to ``<workdir>/<name>-models.toml``).
            config: a ``cortex.toml`` path, or its text.
            extra_args: more ``helexa cortex`` flags (``--operator``, ``--mesh-listen`` ...).
            env: environment added to this one (``HELEXA_GATEWAY__MAX_BODY_BYTES`` ...).
        """
        name = self._name(name)
        data = Path(data_dir) if data_dir is not None else self.workdir / f"{name}-data"
        args = [*helexa_command(), "cortex", "--data-dir", str(data),
                "--control-socket", "127.0.0.1:0", "--gateway-socket", "127.0.0.1:0"]
        if models is not None:
            args += ["--models", str(self._file(models, f"{name}-models.toml"))]
        if config is not None:
            args += ["--config", str(self._file(config, f"{name}-cortex.toml"))]
        args += list(extra_args)
        proc = Cortex(name, args, self.workdir / f"{name}.log", env)
        proc.data_dir = data
        self.procs.append(proc)
        proc._ready(timeout)
        return proc

    def neuron(self, cortex: Cortex, node_id: str, *, config: str | Path | None = None,
               extra_args: Iterable[str] = (), env: Mapping[str, str] | None = None,
               wait: bool = True, timeout: float = 30.0) -> Neuron:
        """Start a neuron joining ``cortex`` as ``node_id``; unless ``wait=False``, return
        once the cortex lists it as healthy."""
        name = self._name(node_id)
        args = [*helexa_command(), "neuron", "--cortex", cortex.control_url, "--node-id", node_id,
                "--join-token-file", str(cortex.join_token_file)]
        if config is not None:
            args += ["--config", str(self._file(config, f"{name}-neuron.toml"))]
        args += list(extra_args)
        proc = Neuron(name, args, self.workdir / f"{name}.log", env)
        proc.node_id, proc.cortex = node_id, cortex
        self.procs.append(proc)
        if wait:
            deadline = time.monotonic() + timeout
            try:
                cortex.wait_neuron(node_id, timeout=timeout)
            except ProcError:
                if not proc.alive:
                    raise ProcError(f"{name} exited ({proc.popen.returncode}):\n{proc.tail()}") from None
                raise ProcError(f"{name} did not join within {timeout:g}s:\n{self.logs()}") from None
            assert time.monotonic() <= deadline + 1
        return proc

    def _file(self, value: str | Path, filename: str) -> Path:
        if isinstance(value, Path):
            return value
        path = self.workdir / filename
        path.write_text(value)
        return path

    def logs(self, lines: int = 60) -> str:
        """The tail of every process's log, for a failure message."""
        return "\n".join(f"----- {p.name} (pid {p.pid}, {'running' if p.alive else f'exit {p.popen.returncode}'})"
                         f" -----\n{p.tail(lines)}" for p in self.procs)

    def close(self) -> None:
        """Stop every process: all neurons at once (they drain), then all cortexes."""
        try:
            for wave in ([p for p in self.procs if not isinstance(p, Cortex)],
                         [p for p in self.procs if isinstance(p, Cortex)]):
                for proc in wave:
                    proc.terminate()
                deadline = time.monotonic() + self.grace
                for proc in wave:
                    proc.stop(max(0.0, deadline - time.monotonic()))
        finally:
            if self in _LIVE_GROUPS:
                _LIVE_GROUPS.remove(self)


def live_groups() -> list[ProcGroup]:
    """Groups not yet closed (the conftest shows their logs when a test fails)."""
    return list(_LIVE_GROUPS)


# --- module-level helpers (one process at a time; the caller stops them) -------------------

HELEXA = helexa_command()
CortexProcess = Cortex
NeuronProcess = Neuron


def wait_until(predicate, timeout: float, what: str, *, proc: Proc | None = None,  # type: ignore[no-untyped-def]
               interval: float = 0.1):
    """Poll ``predicate()`` until it returns something truthy (returned); exceptions count as
    not yet. Raises :class:`ProcError` after ``timeout`` s (with ``proc``'s log tail)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            got = predicate()
        except Exception as exc:  # noqa: BLE001 - e.g. the server is not answering yet
            got, last = None, exc
        if got:
            return got
        if proc is not None and not proc.alive:
            raise ProcError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            tail = f"\n{proc.name} log:\n{proc.tail()}" if proc is not None else ""
            raise ProcError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r}){tail}")
        time.sleep(interval)


def start_cortex(data_dir: Path, *, operator: str | None = None, models: str | Path | None = None,
                 config: str | Path | None = None, mesh: bool = False, bootstrap: Iterable[str] = (),
                 extra_args: Iterable[str] = (), env: Mapping[str, str] | None = None,
                 timeout: float = 60.0) -> Cortex:
    """Start one cortex with ``--data-dir data_dir`` on free loopback ports (mesh too, with
    ``mesh=True`` or ``bootstrap``) and wait until it is ready. Its log is
    ``<data_dir>.log``; stop it with :meth:`Proc.stop`."""
    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    if operator is not None:
        args += ["--operator", operator]
    if mesh or bootstrap:
        args += ["--mesh-listen", "/ip4/127.0.0.1/tcp/0"]
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    group = ProcGroup(data_dir.parent)
    try:
        cortex = group.cortex(name=data_dir.name, data_dir=data_dir, models=models, config=config,
                              extra_args=[*args, *extra_args], env=env, timeout=timeout)
    except BaseException:
        group.close()
        raise
    return cortex


def start_neuron(cortex: Cortex, node_id: str, *, config: str | Path | None = None,
                 extra_args: Iterable[str] = (), env: Mapping[str, str] | None = None,
                 wait: bool = True, timeout: float = 60.0) -> Neuron:
    """Start one neuron joining ``cortex`` (log beside the cortex's data directory) and,
    unless ``wait=False``, wait until the cortex lists it as healthy."""
    group = ProcGroup(cortex.data_dir.parent)
    group.procs.append(cortex)  # only so that names do not clash; not stopped by this group
    try:
        neuron = group.neuron(cortex, node_id, config=config, extra_args=extra_args, env=env, wait=wait,
                              timeout=timeout)
    except BaseException:
        for proc in group.procs[1:]:
            proc.stop(2)
        raise
    return neuron
