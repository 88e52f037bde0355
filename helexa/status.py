"""``helexa status``: fetch the cortex's fleet view and render it for a terminal."""

from __future__ import annotations

import time
from typing import Any

import httpx


def fetch_fleet(cortex_url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``/admin/fleet``. Raises ``RuntimeError`` with a readable reason."""
    url = cortex_url.rstrip("/") + "/admin/fleet"
    try:
        resp = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach the cortex at {cortex_url}: {exc}") from None
    if resp.status_code != 200:
        raise RuntimeError(f"the cortex answered {resp.status_code} for {url}: {resp.text[:200]}")
    try:
        return resp.json()
    except ValueError:
        raise RuntimeError(f"the cortex sent something that is not JSON from {url}") from None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}G"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_fleet(fleet: dict[str, Any], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    neurons = fleet.get("neurons", [])
    if not neurons:
        return "no neurons joined"
    rows = [["NODE", "HEALTH", "CPU", "RAM", "GPUS", "IN-FLIGHT", "LAST BEAT", "MODELS"]]
    for n in neurons:
        hw = n["descriptor"]["hardware"]
        m = n["metrics"]
        gpus = ",".join(f"{g['name']}" for g in hw.get("gpus", [])) or "-"
        models = ", ".join(
            f"{mid}:{st['state']}" + (f"({st['progress']:.0%})" if st.get("progress") is not None else "")
            for mid, st in n["models"].items()
        ) or "-"
        rows.append(
            [
                n["node_id"],
                n["health"],
                f"{m['cpu_percent']:.0f}%/{hw['cpu_cores']}c",
                f"{_gib(m['ram_used'])}/{_gib(hw['ram_total'])}",
                gpus,
                str(n["in_flight"]),
                f"{max(0.0, now - n['last_heartbeat']):.1f}s ago",
                models,
            ]
        )
    return _table(rows)
