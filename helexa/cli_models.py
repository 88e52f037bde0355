"""``helexa models`` and ``helexa reload``: the catalogue against the fleet, and moving
models onto and off neurons, through the cortex's admin API (``docs/operations.md``).

``pull`` and ``load`` stream progress events from the cortex (one JSON object a line,
fed by the neuron's download and load progress) and draw them as tqdm bars on a terminal;
``--json`` prints the events instead. Connection options and the admin token are as for
``helexa keys`` (:mod:`helexa.cli_portal`).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click

from helexa.admin_client import AdminClient
from helexa.cli_options import admin_options
from helexa.status import clip, printable, table

STREAM_SILENCE = 60.0
"""Seconds ``pull`` and ``load`` wait for the next line of the cortex's progress stream (it
sends one at least every 10 s, a keepalive when nothing else) before saying it is gone."""
UNLOAD_WAIT = 900.0
"""Seconds ``helexa models unload`` waits for the cortex's answer (``--timeout`` if longer):
the cortex answers once the model is off, after its running requests finished (within
``drain_grace``, 60 s by default) and its worker stopped."""


@click.command()
@click.option("--json", "as_json", is_flag=True, help="the report as JSON")
@admin_options
def reload(client: AdminClient, as_json: bool) -> None:
    """Re-read the cortex's config and models.toml (as SIGHUP does) and say what changed."""
    report = client.request("POST", "/admin/reload")
    click.echo(json.dumps(report, indent=2) if as_json else report["message"])
    if not as_json and report.get("pins_dropped"):
        click.echo("dropped the pins of models no longer in the catalogue: " + ", ".join(report["pins_dropped"]))


def _state(model: dict[str, Any], node: str) -> str:
    status = model["neurons"].get(node)
    if status is None:
        return "-"
    state = status["state"]
    if state == "loading" and status.get("progress") is not None:
        state += f" {status['progress'] * 100:.0f}%"
    return state


def _models_table(models: list[dict[str, Any]]) -> str:
    if not models:
        return "no models"
    rows = [["MODEL", "BACKEND", "MEMORY", "FEASIBLE ON", "LOADED ON", "CACHED ON", "PINNED ON"]]
    for m in models:
        loaded = [f"{n}({_state(m, n)})" if _state(m, n) != "loaded" else n
                  for n in sorted(m["neurons"]) if m["neurons"][n]["state"] in ("loaded", "loading", "failed")]
        for node, failure in sorted((m.get("load_failed") or {}).items()):  # in its backoff: no load there yet
            if failure["retry_in"] > 0:
                loaded = [n for n in loaded if n.partition("(")[0] != node]
                loaded.append(f"{node}(failed, retry in {math.ceil(failure['retry_in'])}s)")
        cached = [n for n, st in sorted(m["neurons"].items()) if st.get("cached")]
        memory = f"{m['memory_mb']} MB{' GPU' if m['on_gpu'] else ''}" if m["memory_mb"] is not None else "-"
        rows.append([clip(m["id"]) + ("" if m["catalogued"] else " (not catalogued)"), m["backend"] or "-", memory,
                     ",".join(m["feasible_on"]) or "-", ",".join(loaded) or "-", ",".join(cached) or "-",
                     ",".join(m["pinned_on"]) or "-"])
    return table(rows)


@click.group()
def models() -> None:
    """The catalogue against the fleet: list, show, pull, load, unload, pin, unpin."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@admin_options
def models_list(client: AdminClient, as_json: bool) -> None:
    """Every catalogue model: where it can run, where it is loaded, cached and pinned."""
    data = client.get("/admin/models")["data"]
    click.echo(json.dumps(data, indent=2) if as_json else _models_table(data))


@models.command("show")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
@admin_options
def models_show(client: AdminClient, model: str, as_json: bool) -> None:
    """One model against the fleet, with its state on each neuron."""
    m = client.get(f"/admin/models/{model}")
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo(_models_table([m]))
    if m.get("source"):
        click.echo(f"\nsource: {m['source']}")
    for node, status in sorted(m["neurons"].items()):
        # a neuron's own words (its error text): escaped, as every table cell is, so an
        # escape sequence in them cannot rewrite the operator's terminal
        extra = f" ({status['error']})" if status.get("error") else ""
        click.echo(printable(f"{node}: {_state(m, node)}, in flight {status.get('in_flight', 0)}{extra}"))
    for node, failure in sorted((m.get("load_failed") or {}).items()):
        click.echo(printable(f"{node}: load failed {failure['failures']} time(s) in a row, next try in "
                             f"{failure['retry_in']:.0f}s: {failure['error']}"))


class _Bars:
    """One tqdm bar per neuron and stage, from the cortex's progress events."""

    def __init__(self, model: str, enabled: bool) -> None:
        self.model = model
        self.enabled = enabled
        self._bars: dict[str | None, tuple[str, Any]] = {}

    def progress(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        node, stage, done, total = event["neuron"], event["stage"], event["done"], event["total"]
        current = self._bars.get(node)
        if current is None or current[0] != stage:
            self.close(node)
            scale = event["unit"] == "bytes"
            desc = printable(f"{stage} {self.model}" + (f" on {node}" if node else ""))  # the neuron's words
            bar = tqdm(total=total, initial=done, desc=desc, unit="B" if scale else printable(f" {event['unit']}"),
                       unit_scale=scale,
                       unit_divisor=1024 if scale else 1000, file=sys.stderr, leave=True)
            self._bars[node] = (stage, bar)
            return
        bar = current[1]
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close(self, node: str | None) -> None:
        current = self._bars.pop(node, None)
        if current is not None:
            current[1].close()

    def close_all(self) -> None:
        for node in list(self._bars):
            self.close(node)


def _run_streamed(client: AdminClient, action: str, model: str, neuron: str | None, as_json: bool) -> None:
    bars = _Bars(model, enabled=not as_json and sys.stderr.isatty())
    ok = True
    try:
        for event in client.stream("POST", f"/admin/models/{model}/{action}", json={"neuron": neuron},
                                   timeout=STREAM_SILENCE):
            if event.get("event") == "keepalive":
                continue
            if as_json:
                click.echo(json.dumps(event))
                ok = ok and event.get("event") != "error"
                continue
            kind = event.get("event")
            if kind == "progress":
                bars.progress(event)
            elif kind == "done":
                bars.close(event["neuron"])
                verb = "pulled onto" if action == "pull" else "loaded on"
                click.echo(printable(f"{model}: {verb} {event['neuron']}"))
            elif kind == "error":
                bars.close(event["neuron"])
                ok = False
                # the message carries the neuron's error text: escaped, never sent raw to a terminal
                click.echo(printable(f"helexa: error: {model} on {event['neuron'] or 'the fleet'}: {event['message']}"),
                           err=True)
    finally:
        bars.close_all()
    if not ok:
        sys.exit(1)


@models.command("pull")
@click.argument("model")
@click.option("--neuron", help="only this neuron (default: every neuron that can hold the model)")
@click.option("--json", "as_json", is_flag=True, help="the progress events, one JSON object a line")
@admin_options
def models_pull(client: AdminClient, model: str, neuron: str | None, as_json: bool) -> None:
    """Fetch a model's files into neurons' caches without loading it (a progress bar each)."""
    _run_streamed(client, "pull", model, neuron, as_json)


@models.command("load")
@click.argument("model")
@click.option("--neuron", help="this neuron (default: where a cold load would put it)")
@click.option("--json", "as_json", is_flag=True, help="the progress events, one JSON object a line")
@admin_options
def models_load(client: AdminClient, model: str, neuron: str | None, as_json: bool) -> None:
    """Load a model (downloading it first if needed), with a progress bar."""
    _run_streamed(client, "load", model, neuron, as_json)


@models.command("unload")
@click.argument("model")
@click.option("--neuron", help="only this neuron (default: every neuron that has it)")
@click.option("--json", "as_json", is_flag=True)
@admin_options
def models_unload(client: AdminClient, model: str, neuron: str | None, as_json: bool) -> None:
    """Unload a model (its requests in flight finish first)."""
    done = client.request("POST", f"/admin/models/{model}/unload", json={"neuron": neuron}, wait=UNLOAD_WAIT)
    click.echo(json.dumps(done, indent=2) if as_json else f"{model}: unloaded from {', '.join(done['unloaded_from'])}")


def _pin(client: AdminClient, action: str, model: str, neuron: str, as_json: bool) -> None:
    done = client.request("POST", f"/admin/models/{model}/{action}", json={"neuron": neuron})
    if as_json:
        click.echo(json.dumps(done, indent=2))
    elif action == "pin":
        click.echo(f"{model}: pinned on {neuron} (kept loaded there until the cortex restarts)")
    else:
        click.echo(f"{model}: unpinned from {neuron}" if done["changed"] else f"{model} was not pinned on {neuron}")


@models.command("pin")
@click.argument("model")
@click.option("--neuron", required=True)
@click.option("--json", "as_json", is_flag=True)
@admin_options
def models_pin(client: AdminClient, model: str, neuron: str, as_json: bool) -> None:
    """Keep a model loaded on a neuron: loaded now, never evicted or unloaded for idleness."""
    _pin(client, "pin", model, neuron, as_json)


@models.command("unpin")
@click.argument("model")
@click.option("--neuron", required=True)
@click.option("--json", "as_json", is_flag=True)
@admin_options
def models_unpin(client: AdminClient, model: str, neuron: str, as_json: bool) -> None:
    """Drop a pin (the model stays loaded until evicted or idle, as any other)."""
    _pin(client, "unpin", model, neuron, as_json)
