"""``helexa keys`` and ``helexa usage``: the portals' API keys and the usage ledger, through
the cortex's admin API (``docs/portals.md``) with the operator's admin token.

Every command takes ``--cortex URL`` (the admin socket, or the default portal's), and
finds the admin token as :mod:`helexa.admin_client` says (``--data-dir``,
``--admin-token-file``, ``HELEXA_ADMIN_TOKEN``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from helexa.admin_client import AdminClient
from helexa.cli_options import admin_options, when
from helexa.roles.cortex.portal.usage import OPEN_KEY
from helexa.status import table


def _limits(limits: dict[str, Any]) -> str:
    parts = [f"{name}={limits[name]}" for name in ("rpm", "tpm", "max_concurrent") if limits.get(name) is not None]
    if limits.get("budget") is not None:
        unit = "" if limits["budget_unit"] == "money" else " tokens"
        parts.append(f"budget={limits['budget']:g}{unit}/{limits['period']}")
    return " ".join(parts) or "unlimited"


def _key_rows(keys: list[dict[str, Any]]) -> str:
    if not keys:
        return "no keys"
    rows = [["KEY ID", "PORTAL", "NAME", "STATE", "LIMITS", "MODELS", "CREATED", "EXPIRES"]]
    for k in keys:
        rows.append([k["key_id"], k["portal"], k["name"], k["state"], _limits(k["limits"]),
                     ",".join(k["models"]) if k["models"] is not None else "all", when(k["created_at"]),
                     when(k["expires_at"])])
    return table(rows)


def _csv_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@click.group()
def keys() -> None:
    """API keys of the portals: create, list, show, update, rotate, revoke."""


_MAX_INT = 2**63 - 1  # the admin API's bounds (helexa.roles.cortex.portal.admin_fields), checked here first:
# the CLI talks to the API and does not import the cortex (0.8 s of imports)
_MAX_BUDGET = 1e15

_LIMIT_OPTIONS = [
    click.option("--rpm", type=click.IntRange(min=1, max=_MAX_INT), help="requests per minute"),
    click.option("--tpm", type=click.IntRange(min=1, max=_MAX_INT),
                 help="tokens per minute (prompt + completion)"),
    click.option("--max-concurrent", type=click.IntRange(min=1, max=_MAX_INT), help="requests at once"),
    click.option("--budget", type=click.FloatRange(min=0, max=_MAX_BUDGET),
                 help="a hard stop per period, in the portal's currency (or tokens with --budget-unit tokens)"),
    click.option("--budget-unit", type=click.Choice(["money", "tokens"])),
    click.option("--period", type=click.Choice(["day", "month", "total"])),
    click.option("--models", help="comma-separated public model names this key may use (default: all the portal's)"),
    click.option("--expires", help="expiry: a date (YYYY-MM-DD, UTC) or an ISO 8601 time"),
]


def _limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_LIMIT_OPTIONS):
        fn = option(fn)
    return fn


def _key_fields(rpm, tpm, max_concurrent, budget, budget_unit, period, models, expires) -> dict[str, Any]:  # noqa: ANN001
    fields = {"rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent, "budget": budget,
              "budget_unit": budget_unit, "period": period, "models": _csv_list(models), "expires_at": expires}
    return {k: v for k, v in fields.items() if v is not None}


@keys.command("create")
@click.option("--portal", required=True, help="the portal the key opens")
@click.option("--name", required=True, help="who or what the key is for")
@_limit_options
@click.option("--json", "as_json", is_flag=True, help="the whole record, with the key, as JSON")
@admin_options
def keys_create(client: AdminClient, portal: str, name: str, as_json: bool, **limits: Any) -> None:
    """Create a key and print it (only this once: it is stored hashed)."""
    made = client.request("POST", "/admin/keys", json={"portal": portal, "name": name, **_key_fields(**limits)})
    if as_json:
        click.echo(json.dumps(made, indent=2))
        return
    click.echo(made["key"])
    click.echo(f"key {made['key_id']} on portal {made['portal']}: {_limits(made['limits'])}. "
               "Store it now: it is never shown again.", err=True)
    if made.get("warning"):
        click.echo(f"warning: {made['warning']}", err=True)


@keys.command("list")
@click.option("--portal", help="only this portal's keys")
@click.option("--json", "as_json", is_flag=True)
@admin_options
def keys_list(client: AdminClient, portal: str | None, as_json: bool) -> None:
    """List keys (never the keys themselves)."""
    data = client.get("/admin/keys", portal=portal)["data"]
    click.echo(json.dumps(data, indent=2) if as_json else _key_rows(data))


@keys.command("show")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
@admin_options
def keys_show(client: AdminClient, key_id: str, as_json: bool) -> None:
    """One key: its limits, its quota state and this period's usage."""
    k = client.get(f"/admin/keys/{key_id}")
    if as_json:
        click.echo(json.dumps(k, indent=2))
        return
    click.echo(_key_rows([k]))
    quota = k.get("quota")
    if quota is not None:
        left = quota["remaining_budget"]
        click.echo(f"\nin flight {quota['in_flight']}, spent {quota['spent']['money']:.6g} "
                   f"({quota['spent']['tokens']} tokens) since {when(quota['period_start'])}"
                   + (f", {left:.6g} left" if left is not None else ""))
    if k["period_usage"]:
        click.echo("")
        click.echo(_usage_table(k["period_usage"], "model"))


@keys.command("update")
@click.argument("key_id")
@click.option("--name")
@_limit_options
@click.option("--json", "as_json", is_flag=True)
@admin_options
def keys_update(client: AdminClient, key_id: str, name: str | None, as_json: bool, **limits: Any) -> None:
    """Change a key's limits, models, expiry or name (the rest stays)."""
    fields = _key_fields(**limits)
    if name:
        fields["name"] = name
    k = client.request("PATCH", f"/admin/keys/{key_id}", json=fields)
    click.echo(json.dumps(k, indent=2) if as_json else _key_rows([k]))


@keys.command("revoke")
@click.argument("key_id")
@admin_options
def keys_revoke(client: AdminClient, key_id: str) -> None:
    """Stop a key at once (its usage stays in the ledger)."""
    k = client.request("POST", f"/admin/keys/{key_id}/revoke")
    click.echo(f"key {k['key_id']} is {k['state']}")


@keys.command("rotate")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
@admin_options
def keys_rotate(client: AdminClient, key_id: str, as_json: bool) -> None:
    """Replace a key's secret (same id, limits and budget); the old one stops working at once."""
    k = client.request("POST", f"/admin/keys/{key_id}/rotate")
    if as_json:
        click.echo(json.dumps(k, indent=2))
        return
    click.echo(k["key"])
    click.echo(f"key {k['key_id']} rotated. Store it now: it is never shown again.", err=True)


def _usage_table(rows: list[dict[str, Any]], by: str) -> str:
    if not rows:
        return "no usage recorded"
    out = [[by.upper(), "REQUESTS", "PROMPT", "COMPLETION", "COST", "INCOMPLETE"]]
    for r in rows:
        # No cost: a sum the ledger cannot give (rows written at an infinite price, which
        # the config refuses now); shown as such, not a traceback.
        cost = "-" if r["cost"] is None else f"{r['cost']:.6f}"
        # An open portal's rows (record_usage = true) have no key: the ledger's key id is "".
        group = OPEN_KEY if by == "key" and not r[by] else str(r[by])
        out.append([group, str(r["requests"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
                    f"{cost} {r['currency']}".strip(), str(r.get("incomplete", 0))])
    return table(out)


@click.command()
@click.option("--portal", help="only this portal")
@click.option("--key", "key_id", help="only this key id")
@click.option("--since", help="from this date or time (YYYY-MM-DD, ISO 8601, or Unix seconds)")
@click.option("--until", help="before this date or time")
@click.option("--by", type=click.Choice(["key", "model", "day", "portal"]), default="key", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="rows as JSON")
@click.option("--csv", "as_csv", is_flag=True, help="rows as CSV")
@admin_options
def usage(client: AdminClient, portal: str | None, key_id: str | None, since: str | None, until: str | None,
          by: str, as_json: bool, as_csv: bool) -> None:
    """What the portals served and billed, from the usage ledger."""
    params = {"portal": portal, "key": key_id, "since": since, "until": until, "by": by}
    if as_csv:
        click.echo(client.request("GET", "/admin/usage", params={**params, "format": "csv"}, raw=True), nl=False)
        return
    rows = client.get("/admin/usage", **params)["data"]
    click.echo(json.dumps(rows, indent=2) if as_json else _usage_table(rows, by))
