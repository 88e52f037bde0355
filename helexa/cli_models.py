"""``helexa models`` and ``helexa reload``: the catalogue against the fleet, and moving
models onto and off neurons, through the cortex's admin API (``docs/operations.md``).

``pull`` and ``load`` stream progress events from the cortex (one JSON object a line,
fed by the neuron's download and load progress) and draw them as tqdm bars on a terminal;
``--json`` prints the events instead. Connection options and the admin token are as for
``helexa keys`` (:mod:`helexa.cli_portal`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from helexa.admin_client import AdminClient, AdminError
from helexa.cli_portal import _admin_options, table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="the report as JSON")
@_admin_options
def reload(client: AdminClient, as_json: bool) -> None:
    """Re-read the cortex's config and models.toml (as SIGHUP does) and say what changed."""
    report = client.request("POST", "/admin/reload")
    click.echo(json.dumps(report, indent=2) if as_json else report["message"])
