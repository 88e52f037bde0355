"""``helexa neurons``: which identity key each node id is bound to on the cortex, enrolling
a neuron's key before it joins (``enrolment = "strict"``), and forgetting a binding (a new
machine under an old node id), through the admin API (``/admin/neurons/keys``,
:mod:`helexa.roles.cortex.portal.admin_neurons`). Connection options and the admin token are
as for ``helexa keys`` (:mod:`helexa.cli_portal`).

``helexa neuron-key``, run on the neuron's machine, prints the neuron's public identity key
(made in its ``data_dir`` if absent, as the neuron makes it on first start): what
``helexa neurons enrol`` takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from helexa.admin_client import AdminClient
from helexa.cli_options import admin_options, fail, load, when
from helexa.status import table


def _bindings_table(data: list[dict[str, Any]]) -> str:
    if not data:
        return "no node id is bound to an identity key"
    rows = [["NODE", "KEY", "BOUND", "CONNECTED"]]
    for b in data:
        rows.append([b["node_id"], b["fingerprint"], when(b["bound_at"]), "yes" if b["connected"] else "no"])
    return table(rows)


@click.group()
def neurons() -> None:
    """Neurons' identity keys: list the node id bindings, enrol a key, forget one."""


@neurons.command("keys")
@click.option("--json", "as_json", is_flag=True, help="with each full public key")
@admin_options
def neurons_keys(client: AdminClient, as_json: bool) -> None:
    """Every node id and the fingerprint of the identity key it is bound to."""
    data = client.get("/admin/neurons/keys")["data"]
    click.echo(json.dumps(data, indent=2) if as_json else _bindings_table(data))


@neurons.command("forget")
@click.argument("node_id")
@admin_options
def neurons_forget(client: AdminClient, node_id: str) -> None:
    """Forget NODE_ID's identity key: the next neuron that joins as NODE_ID binds its own
    (a neuron joined as NODE_ID now stays connected)."""
    gone = client.request("POST", f"/admin/neurons/keys/{quote(node_id, safe='')}/forget")
    click.echo(f"forgot node id {gone['node_id']}'s identity key {gone['fingerprint']}: "
               "the next neuron to join as it binds its own key")


@neurons.command("enrol")
@click.argument("node_id")
@click.argument("key")
@admin_options
def neurons_enrol(client: AdminClient, node_id: str, key: str) -> None:
    """Bind NODE_ID to KEY (the 64 hex digits `helexa neuron-key` prints on that neuron)
    before it joins: what a cortex with enrolment = "strict" needs. Refused while NODE_ID
    is bound to another key (forget it first)."""
    made = client.request("POST", f"/admin/neurons/keys/{quote(node_id, safe='')}/enrol", json={"public_key": key})
    if made["enrolled"]:
        click.echo(f"enrolled node id {made['node_id']} with identity key {made['fingerprint']}")
    else:
        click.echo(f"node id {made['node_id']} was already bound to identity key {made['fingerprint']}")


@click.command("neuron-key")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="neuron.toml")
@click.option("--data-dir", type=click.Path(path_type=Path), help="the neuron's data directory")
@click.option("--node-id", help="this node's id, for the hint (default: as the neuron resolves it)")
def neuron_key(config_file: Path | None, data_dir: Path | None, node_id: str | None) -> None:
    """Print this neuron's public identity key (64 hex digits), making the key in its
    data_dir if absent, as the neuron would. On the cortex, `helexa neurons enrol NODE_ID
    KEY` binds the node id to it."""
    from helexa.config import ConfigError
    from helexa.roles.neuron.config import IDENTITY_FILE, NeuronConfig, load_identity, resolve_node_id

    # The data_dir as `helexa neuron` resolves it: --data-dir, HELEXA_DATA_DIR, the file's, the default.
    config = load(NeuronConfig, config_file, {"data_dir": data_dir, "node_id": node_id})
    made = not (config.data_dir / IDENTITY_FILE).exists()
    try:
        identity = load_identity(config.data_dir)
    except ConfigError as exc:
        fail(str(exc), 1)
    try:
        name = resolve_node_id(config.node_id)
    except ConfigError:
        name = "NODE_ID"
    key = identity.public_bytes.hex()
    click.echo(key)
    from helexa.protocol.join_identity import enrol_command

    if made:  # a shell lacks the unit's environment: a key made elsewhere is not the neuron's
        click.echo(f"no identity key was in {config.data_dir}: made one now, for a neuron that runs with that "
                   "data_dir; if yours runs with another (HELEXA_DATA_DIR in its systemd unit), run this again "
                   "with --data-dir DIR", err=True)
    click.echo(f"identity key {identity.fingerprint} in {config.data_dir}; on the cortex run: "
               f"{enrol_command(name, key)}", err=True)
