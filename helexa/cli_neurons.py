"""``helexa neurons``: which identity key each node id is bound to on the cortex, and
forgetting a binding (a new machine under an old node id), through the admin API
(``/admin/neurons/keys``, :mod:`helexa.roles.cortex.portal.admin_neurons`). Connection
options and the admin token are as for ``helexa keys`` (:mod:`helexa.cli_portal`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import click

from helexa.admin_client import AdminClient
from helexa.cli_portal import _admin_options, _when, table


def _bindings_table(data: list[dict[str, Any]]) -> str:
    if not data:
        return "no node id is bound to an identity key"
    rows = [["NODE", "KEY", "BOUND", "CONNECTED"]]
    for b in data:
        rows.append([b["node_id"], b["fingerprint"], _when(b["bound_at"]), "yes" if b["connected"] else "no"])
    return table(rows)


@click.group()
def neurons() -> None:
    """Neurons' identity keys: list the node id bindings, forget one."""


@neurons.command("keys")
@click.option("--json", "as_json", is_flag=True, help="with each full public key")
@_admin_options
def neurons_keys(client: AdminClient, as_json: bool) -> None:
    """Every node id and the fingerprint of the identity key it is bound to."""
    data = client.get("/admin/neurons/keys")["data"]
    click.echo(json.dumps(data, indent=2) if as_json else _bindings_table(data))


@neurons.command("forget")
@click.argument("node_id")
@_admin_options
def neurons_forget(client: AdminClient, node_id: str) -> None:
    """Forget NODE_ID's identity key: the next neuron that joins as NODE_ID binds its own
    (a neuron joined as NODE_ID now stays connected)."""
    gone = client.request("POST", f"/admin/neurons/keys/{quote(node_id, safe='')}/forget")
    click.echo(f"forgot node id {gone['node_id']}'s identity key {gone['fingerprint']}: "
               "the next neuron to join as it binds its own key")
