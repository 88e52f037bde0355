"""``helexa mesh`` and ``helexa ledger``: the mesh identity and the federation ledgers."""

from __future__ import annotations

import click


@click.group()
def mesh() -> None:
    """The cortex's mesh identity and peers."""


@click.command()
def ledger() -> None:
    """What this cortex served to and consumed from its peers."""
    raise click.ClickException("not wired yet")
