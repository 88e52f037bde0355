"""``helexa chat`` (a streaming client for the gateway) and ``helexa demo`` (a local cortex and
neuron, one real request, a clean stop)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from helexa.status import printable, terminal_text

DEFAULT_MODEL = "smollm2-135m-instruct"


class Failed(click.ClickException):
    """A failure of ``helexa chat`` / ``demo``, reported as every other command reports
    one: ``helexa: error: <message>`` on stderr, exit code 1 (not click's ``Error:``)."""

    def show(self, file=None) -> None:  # noqa: ANN001
        click.echo(f"helexa: error: {self.format_message()}", err=True)
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def stream_chat(gateway: str, model: str, prompt: str, *, max_tokens: int, temperature: float, timeout: float,
                api_key: str | None = None) -> dict:
    """POST a streamed chat completion, echo the text as it arrives, return the usage.
    ``api_key``: a portal's key, sent as ``Authorization: Bearer`` (never printed)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    usage: dict = {}
    url = gateway.rstrip("/") + "/v1/chat/completions"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0)) as resp:
        if resp.status_code != 200:
            resp.read()
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            hint = " (a keyed portal: set HELEXA_API_KEY or pass --api-key-file)" \
                if resp.status_code == 401 and not api_key else ""
            raise Failed(printable(f"the gateway answered {resp.status_code}: {message}{hint}"))
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise Failed(printable(f"the stream ended with an error: {event['error'].get('message')}"))
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:  # a neuron's (or a peer's) words: no escape sequence reaches the terminal as one
                    click.echo(terminal_text(text), nl=False)
            if event.get("usage"):
                usage = event["usage"]
    click.echo()
    return usage


@click.command()
@click.option("--gateway", default="http://127.0.0.1:8080", show_default=True, help="the cortex's HTTP address")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait (a cold load included)")
@click.option("--api-key", envvar="HELEXA_API_KEY", show_envvar=True,
              help="a keyed portal's API key (prefer HELEXA_API_KEY or --api-key-file: a command line is "
                   "visible to other local users)")
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="file holding the API key (used instead of --api-key / HELEXA_API_KEY)")
@click.argument("prompt", default=DEFAULT_PROMPT)
def chat(gateway, model, max_tokens, temperature, timeout, api_key, api_key_file, prompt):
    """Send one chat message to a gateway (or a portal) and stream the answer."""
    if api_key_file is not None:
        api_key = read_api_key(api_key_file)
    try:
        usage = stream_chat(gateway, model, prompt, max_tokens=max_tokens, temperature=temperature, timeout=timeout,
                            api_key=checked_api_key(api_key))
    except httpx.HTTPError as exc:
        raise Failed(f"cannot talk to the gateway at {gateway}: {exc}") from None
    if usage:
        click.echo(f"[{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens]", err=True)


def read_api_key(path: Path) -> str:
    """The API key in ``path`` (surrounding whitespace dropped); a click error naming the
    file, never its content, when it cannot be read or is empty."""
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise Failed(f"cannot read the API key in {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Failed(f"the API key in {path} is not UTF-8 text") from None
    if not key:
        raise Failed(f"{path} is empty")
    return key


def checked_api_key(key: str | None) -> str | None:
    """``key`` without surrounding whitespace (``None`` for none); a click error, which
    does not show it, for one an HTTP header cannot carry (an error from the HTTP library
    would quote the header)."""
    key = (key or "").strip()
    if not key:
        return None
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise Failed("the API key has characters an HTTP header cannot carry (spaces, control "
                                   "or non-ASCII characters)")
    return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_neuron(gateway: str, node_id: str, deadline: float, procs: list[subprocess.Popen],
                     data_dir: Path) -> None:
    from helexa.status import fetch_fleet

    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise Failed(f"{p.args[3]} exited early with code {p.returncode}; see its log")
        try:
            fleet = fetch_fleet(gateway, timeout=2, data_dir=data_dir)
            if any(n["node_id"] == node_id and n["health"] == "healthy" for n in fleet["neurons"]):
                return
        except (RuntimeError, ValueError, KeyError):  # not up yet: no token file, no answer
            pass
        time.sleep(0.2)
    raise Failed("the neuron did not join in time; see the logs")


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="keep the cortex's data here (default: a temp dir)")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.argument("prompt", default=DEFAULT_PROMPT)
def demo(data_dir, model, prompt):
    """Start a cortex and a neuron here, ask the default model one question, stop both."""
    from helexa.runtime import default_models

    if model == DEFAULT_MODEL and default_models.missing():
        raise Failed(f"the default models are not installed; run: {default_models.install_command()}")
    workdir = Path(tempfile.mkdtemp(prefix="helexa-demo-"))
    data = data_dir or workdir / "cortex"
    control, gateway_port = _free_port(), _free_port()
    gateway = f"http://127.0.0.1:{gateway_port}"
    exe = [sys.executable, "-m", "helexa.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {name: open(workdir / f"{name}.log", "w") for name in ("cortex", "neuron")}
    click.echo(f"starting a cortex (control ws://127.0.0.1:{control}, gateway {gateway})")
    cortex = subprocess.Popen(
        exe + ["cortex", "--data-dir", str(data), "--control-socket", f"127.0.0.1:{control}",
               "--gateway-socket", f"127.0.0.1:{gateway_port}"],
        stdout=logs["cortex"], stderr=subprocess.STDOUT, env=env,
    )
    procs = [cortex]
    try:
        token_file = data / "join-token"
        deadline = time.monotonic() + 60
        while not token_file.exists() and time.monotonic() < deadline and cortex.poll() is None:
            time.sleep(0.1)
        click.echo("starting a neuron and waiting for it to join")
        neuron = subprocess.Popen(
            exe + ["neuron", "--cortex", f"ws://127.0.0.1:{control}", "--node-id", "demo-neuron",
                   "--join-token-file", str(token_file)],
            stdout=logs["neuron"], stderr=subprocess.STDOUT, env=env,
        )
        procs.append(neuron)
        _wait_for_neuron(gateway, "demo-neuron", time.monotonic() + 60, procs, data)
        from helexa.status import fetch_fleet, render_fleet

        click.echo(render_fleet(fetch_fleet(gateway, data_dir=data)))
        click.echo(f"\n> {prompt}   (model {model}; the first request cold-loads it)")
        started = time.monotonic()
        usage = stream_chat(gateway, model, prompt, max_tokens=64, temperature=0.0, timeout=300)
        click.echo(f"[{usage.get('completion_tokens', '?')} tokens in {time.monotonic() - started:.2f}s]\n")
        click.echo(render_fleet(fetch_fleet(gateway, data_dir=data)))
    finally:
        names = ["cortex", "neuron"][: len(procs)]
        codes = {name: _stop(p) for name, p in reversed(list(zip(names, procs)))}
        for fh in logs.values():
            fh.close()
        summary = ", ".join(f"{name} exited {code}" for name, code in codes.items())
        click.echo(f"\nstopped: {summary}; logs in {workdir}")
    if any(codes.values()):
        raise Failed("a process did not stop cleanly; see the logs")
