"""``helexa status``: fetch the cortex's fleet view (``/admin/fleet``, with the admin
token) and render it for a terminal."""

from __future__ import annotations

import re
import time
import unicodedata
from pathlib import Path
from typing import Any

from helexa.admin_client import AdminClient, find_token


def fetch_fleet(cortex_url: str, *, timeout: float = 5.0, token: str | None = None,
                token_file: Path | None = None, data_dir: Path | None = None) -> dict[str, Any]:
    """GET ``/admin/fleet`` with the admin token (``token``, or found as
    :func:`~helexa.admin_client.find_token` says). Raises ``RuntimeError`` (an
    :class:`~helexa.admin_client.AdminError`) with a readable reason."""
    if token is None:
        token = find_token(token_file=token_file, data_dir=data_dir)
    return AdminClient(cortex_url, token, timeout=timeout).get("/admin/fleet")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}G"


def printable(text: str) -> str:
    """``text`` with each unprintable character escaped (``\\x1b``): what neurons report
    (model ids, GPU names) reaches the operator's terminal, where an escape sequence
    rewrites the screen."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


NAME_COLUMNS = 96
"""The most columns a table shows of one name a neuron reports (a model id, a GPU's name):
nothing bounds them on the wire, and one of thousands of characters made every line of
``helexa status`` that wide. The whole name is in ``--json``."""


def clip(name: str, limit: int = NAME_COLUMNS) -> str:
    """``name`` cut to ``limit`` characters, the cut marked with ``…``."""
    return name if len(name) <= limit else name[:limit - 1] + "…"


def columns(text: str) -> int:
    """The terminal columns ``text`` takes: two for a wide (East Asian) character, none for
    a combining mark, one for the rest (``len`` lined up a column of CJK names wrongly)."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_text(text: str) -> str:
    """Running text (a model's answer) for a terminal: lines and tabs as they are, every other
    control character escaped (``\\x1b``). The text comes from a neuron, maybe a peer's:
    an escape sequence in it would rewrite the screen or the terminal's title."""
    return text if text.isprintable() else _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode(), text)


def table(rows: list[list[str]]) -> str:
    """``rows`` as aligned columns, every cell :func:`printable`."""
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(columns(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c + " " * (w - columns(c)) for c, w in zip(r, widths)).rstrip() for r in rows)


def _key(neuron: dict[str, Any]) -> str:
    """The neuron's identity key fingerprint; "none" for an older neuron that sent none, "?"
    from an older cortex that does not say."""
    if "identity_key" not in neuron:
        return "?"
    return neuron["identity_key"] or "none"


def _build(neuron: dict[str, Any]) -> str:
    """The build a neuron runs (``0.1.0+g47c558a``), from its descriptor's ``software``
    (``helexa 0.1.0+g47c558a``); "?" for one that does not say."""
    software = neuron["descriptor"].get("software") or "?"
    return software.removeprefix("helexa ")


def render_fleet(fleet: dict[str, Any], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    neurons = fleet.get("neurons", [])
    cortex = fleet.get("cortex", {}).get("version")
    head = f"cortex {cortex}\n" if cortex else ""  # an older cortex does not say
    if not neurons:
        return head + "no neurons joined"
    rows = [["NODE", "HEALTH", "KEY", "VERSION", "CPU", "RAM", "GPUS", "IN-FLIGHT", "LAST BEAT", "MODELS"]]
    for n in neurons:
        hw = n["descriptor"]["hardware"]
        m = n["metrics"]
        gpus = ",".join(clip(g["name"]) for g in hw.get("gpus", [])) or "-"
        models = ", ".join(
            f"{clip(mid)}:{st['state']}" + (f"({st['progress']:.0%})" if st.get("progress") is not None else "")
            for mid, st in n["models"].items()
        ) or "-"
        rows.append(
            [
                n["node_id"],
                n["health"],
                _key(n),
                _build(n),
                f"{m['cpu_percent']:.0f}%/{hw['cpu_cores']}c",
                f"{_gib(m['ram_used'])}/{_gib(hw['ram_total'])}",
                gpus,
                str(n["in_flight"]),
                f"{max(0.0, now - n['last_heartbeat']):.1f}s ago",
                models,
            ]
        )
    return head + table(rows)
