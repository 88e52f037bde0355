"""``helexa config check``: check configuration files without starting anything
(:mod:`helexa.config_check`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def config() -> None:
    """Configuration files."""


@config.command()
@click.option("--cortex", "cortex_file", type=click.Path(path_type=Path), help="a cortex.toml")
@click.option("--neuron", "neuron_file", type=click.Path(path_type=Path), help="a neuron.toml")
@click.option("--models", "models_file", type=click.Path(path_type=Path),
              help="a models.toml (with --cortex: in place of its models_file, as `helexa cortex --models`)")
def check(cortex_file, neuron_file, models_file):
    """Check configuration files as a cortex or a neuron checks them when it starts, with the
    same HELEXA_* environment, without starting: no socket, no network, nothing written.

    Prints every problem, one line each naming the key and the file, and exits 2; or a short
    summary of each file, and exits 0.
    """
    from helexa.config_check import check_cortex, check_models, check_neuron

    if not (cortex_file or neuron_file or models_file):
        raise click.UsageError("give at least one of --cortex, --neuron, --models")
    results = []
    if cortex_file:
        results.append(("cortex", check_cortex(cortex_file, models_file)))
    elif models_file:
        results.append(("models", check_models(models_file)))
    if neuron_file:
        results.append(("neuron", check_neuron(neuron_file)))
    failed = False
    for role, checked in results:
        for problem in checked.problems:
            click.echo(f"helexa: error: {problem}", err=True)
        for note in checked.notes:
            click.echo(f"helexa: note: {note}", err=True)
        if checked.problems:
            failed = True
            click.echo(f"{role} {checked.what}: {len(checked.problems)} problem(s)")
        else:
            click.echo(f"{role} {checked.what}: OK")
            for line in checked.summary:
                click.echo(f"  {line}")
    sys.exit(2 if failed else 0)
