"""``helexa mesh`` and ``helexa ledger``: the mesh identity and the federation ledgers.

Neither imports libp2p or needs the cortex to be running: ``mesh id`` reads the identity
(and the multiaddrs the last run recorded) from the data directory, ``ledger`` reads
``DATA_DIR/ledger.sqlite``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _data_dir(data_dir: Path | None) -> Path:
    from helexa.roles.cortex.config import default_data_dir

    return data_dir or default_data_dir()


@click.group()
def mesh() -> None:
    """The cortex's mesh identity (its peers: the console's Mesh page, helexa ledger)."""


@mesh.command("id")
@click.option("--data-dir", type=click.Path(path_type=Path), help="the cortex's data directory")
@click.option("--listen", metavar="MULTIADDR", help="the multiaddr shown for a cortex that never ran its mesh")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def mesh_id(data_dir: Path | None, listen: str | None, as_json: bool) -> None:
    """Print this cortex's peer id, then its multiaddrs (one a line).

    The multiaddrs are those the running (or last) cortex bound; pass one of them to
    another operator's helexa cortex --bootstrap.
    """
    from helexa.mesh import format_identity, mesh_identity

    data = _data_dir(data_dir)
    made = not (data / "identity.key").exists()
    try:
        ident = mesh_identity(data, listen)
    except (OSError, ValueError) as exc:
        click.echo(f"helexa: error: identity in {data}: {exc}", err=True)
        sys.exit(1)
    if made:  # a mistyped --data-dir would otherwise print a peer id no cortex has, saying nothing
        click.echo(f"no identity key was in {data}: made one now, the peer id of a cortex that runs with that "
                   "data_dir; if yours runs with another, run this again with --data-dir DIR", err=True)
    if as_json:
        click.echo(json.dumps({"peer_id": ident.peer_id, "multiaddrs": list(ident.multiaddrs)}))
    else:
        click.echo(format_identity(ident))


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="the cortex's data directory")
@click.option("--json", "as_json", is_flag=True, help="every receipt, machine-readable")
def ledger(data_dir: Path | None, as_json: bool) -> None:
    """What this cortex served to and consumed from its peers.

    Without --json: totals per direction and peer (requests, tokens, cost, receipts
    flagged because they failed verification). With it: every receipt as a JSON list.
    """
    from helexa.roles.cortex.federation.ledger import Ledger, format_report

    path = _data_dir(data_dir) / "ledger.sqlite"
    if not path.is_file():
        if as_json:
            click.echo("[]")
        else:
            click.echo(f"no ledger in {path.parent} (no federated usage recorded)")
        return
    try:
        with Ledger(path) as book:
            if not as_json:
                click.echo(format_report(book.summary()))
                return
            rows = []
            for e in book.entries():
                r = e.receipt
                rows.append({
                    "direction": e.direction, "peer_id": e.peer_id, "request_id": r.request_id,
                    "model": r.model_id, "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens, "price_input": r.price_input,
                    "price_output": r.price_output, "cost": r.cost, "started_at": r.started_at,
                    "ended_at": r.ended_at, "outcome": r.outcome, "server_peer_id": r.server_peer_id,
                    "client_peer_id": r.client_peer_id, "signature": r.signature.hex(),
                    "flagged": e.flagged, "flag_reason": e.flag_reason,
                })
            click.echo(json.dumps(rows, indent=2))
    except Exception as exc:  # sqlite3.Error, a corrupt receipt: one line, no traceback
        click.echo(f"helexa: error: ledger {path}: {exc}", err=True)
        sys.exit(1)
