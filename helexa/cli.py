"""The ``helexa`` command: parses flags, loads config, calls a role's ``run``. Nothing else.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage, 3 refused by the
cortex (a neuron with a wrong join token or an incompatible version), 4 a neuron whose node
id the cortex has bound to another identity key (``helexa neurons forget``), or, on a cortex
with strict enrolment, to none yet (``helexa neuron-key``, ``helexa neurons enrol``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from helexa import build, logs, telemetry
from helexa.cli_options import fail, load
from helexa.config import ConfigError, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(build.version(), prog_name="helexa")
def main() -> None:
    """helexa: a distributed AI inference fabric."""


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="cortex.toml")
@click.option("--data-dir", type=click.Path(path_type=Path), help="identity, join token, ledgers")
@click.option("--control-socket", metavar="HOST:PORT", help="where neurons connect (websocket)")
@click.option("--gateway-socket", metavar="HOST:PORT", help="the OpenAI-compatible API")
@click.option("--models", "models_file", type=click.Path(path_type=Path), help="models.toml catalogue")
@click.option("--operator", help="this operator's name in the mesh")
@click.option("--mesh-listen", metavar="MULTIADDR", help="join the mesh, listening here")
@click.option("--bootstrap", metavar="MULTIADDR", multiple=True, help="a mesh peer to dial (repeatable)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["text", "json"]), help="json: one JSON object a line")
def cortex(config_file, data_dir, control_socket, gateway_socket, models_file, operator, mesh_listen, bootstrap, log_level,
           log_format):
    """Run a cortex: control plane, gateway, orchestrator, mesh."""
    from helexa.roles.cortex.config import CortexConfig

    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "control_socket": control_socket,
        "gateway_socket": gateway_socket,
        "models_file": models_file,
        "operator": operator,
        "log_level": log_level,
        "log_format": log_format,
    }
    if mesh_listen:
        overrides["mesh.enabled"] = True
        overrides["mesh.listen"] = mesh_listen
    if bootstrap:
        overrides["mesh.enabled"] = True
        overrides["mesh.bootstrap"] = list(bootstrap)
    config = load(CortexConfig, config_file, overrides)
    logs.setup(config.log_level, config.log_format)
    telemetry.setup(config.telemetry, service="helexa-cortex")
    from helexa.roles.cortex import node

    def loader() -> CortexConfig:  # what SIGHUP re-reads: the same file, environment and flags
        return load_config(CortexConfig, file=config_file, overrides=overrides)

    try:
        sys.exit(node.run(config, loader=loader))
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start the cortex: {exc}", 1)


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="neuron.toml")
@click.option("--cortex", "cortex_url", metavar="URL", help="ws://HOST:PORT of the cortex control plane")
@click.option("--node-id", help="this node's id (default: /etc/machine-id)")
@click.option("--join-token-file", type=click.Path(path_type=Path), help="file holding the join token")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["text", "json"]), help="json: one JSON object a line")
def neuron(config_file, cortex_url, node_id, join_token_file, log_level, log_format):
    """Run a neuron: join a cortex and serve models it is told to load."""
    from helexa.roles.neuron.config import NeuronConfig

    config = load(
        NeuronConfig,
        config_file,
        {"cortex": cortex_url, "node_id": node_id, "join_token_file": join_token_file, "log_level": log_level,
         "log_format": log_format},
    )
    logs.setup(config.log_level, config.log_format)
    telemetry.setup(config.telemetry, service="helexa-neuron")
    from helexa.roles.neuron import node

    try:
        sys.exit(node.run(config))
    except ConfigError as exc:
        fail(str(exc))


def _existing_data_dir(data: Path) -> Path:
    """A cortex's data directory, which must exist: a token printed from a mistyped one
    (made there on the spot) would be no running cortex's."""
    if not data.is_dir():
        fail(f"no cortex data directory at {data}: give the --data-dir the cortex runs with "
              "(a cortex makes its directory and tokens when it first starts)", 1)
    return data


@main.command("join-token")
@click.option("--data-dir", type=click.Path(path_type=Path), help="the cortex's data directory")
@click.option("--rotate", is_flag=True, help="replace the token; neurons need the new one to rejoin")
def join_token_cmd(data_dir, rotate):
    """Print (or rotate) the join token that neurons need (with the control plane's
    certificate pin when the cortex serves wss://)."""
    from helexa.roles.cortex import join_token
    from helexa.roles.cortex.config import default_data_dir

    data = _existing_data_dir(data_dir or default_data_dir())
    try:
        if rotate:
            join_token.rotate(data)
        click.echo(join_token.for_neurons(data))
    except (OSError, ValueError) as exc:
        fail(f"join token in {data}: {exc}", 1)


@main.command("admin-token")
@click.option("--data-dir", type=click.Path(path_type=Path), help="the cortex's data directory")
@click.option("--rotate", is_flag=True, help="replace the token; the old one stops working at once")
def admin_token_cmd(data_dir, rotate):
    """Print (or rotate) the admin token that the admin API, helexa keys/usage/status need."""
    from helexa.roles.cortex import admin_token
    from helexa.roles.cortex.config import default_data_dir

    data = _existing_data_dir(data_dir or default_data_dir())
    try:
        click.echo(admin_token.rotate(data) if rotate else admin_token.load_or_create(data))
    except (OSError, ValueError) as exc:
        fail(f"admin token in {data}: {exc}", 1)


@main.command()
@click.option("--cortex", "cortex_url", default="http://127.0.0.1:8080", show_default=True,
              help="the cortex's admin address (its admin socket, or the default portal's)")
@click.option("--data-dir", type=click.Path(path_type=Path), help="the cortex's data directory (for its admin token)")
@click.option("--admin-token-file", type=click.Path(path_type=Path), help="a file holding the admin token")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--timeout", default=5.0, show_default=True)
def status(cortex_url, data_dir, admin_token_file, as_json, timeout):
    """Show the cortex's fleet: neurons, health, models."""
    from helexa.status import fetch_fleet, render_fleet

    try:
        fleet = fetch_fleet(cortex_url, timeout=timeout, token_file=admin_token_file, data_dir=data_dir)
    except RuntimeError as exc:
        fail(str(exc), 1)
    if as_json:
        click.echo(json.dumps(fleet, indent=2))
    else:
        click.echo(render_fleet(fleet))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for SHELL.

    \b
    bash: helexa completion bash > ~/.local/share/bash-completion/completions/helexa
    zsh:  helexa completion zsh > "${fpath[1]}/_helexa"
    fish: helexa completion fish > ~/.config/fish/completions/helexa.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # click ships all three
    click.echo(cls(main, {}, "helexa", "_HELEXA_COMPLETE").source())


def _register_subcommands() -> None:
    """Command groups that live beside the roles they drive."""
    from helexa.cli_config import config
    from helexa.cli_demo import chat, demo
    from helexa.cli_mesh import ledger, mesh
    from helexa.cli_models import models, reload
    from helexa.cli_neurons import neuron_key, neurons
    from helexa.cli_portal import keys, usage

    for command in (config, demo, chat, mesh, ledger, keys, usage, models, reload, neurons, neuron_key):
        main.add_command(command)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
