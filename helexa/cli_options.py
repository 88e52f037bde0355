"""What the ``helexa`` commands share: failing with an exit code and a one-line message,
loading a config file (exit 2 naming the key), the admin API's connection options, and
times as a table shows them."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from helexa.admin_client import DEFAULT_CORTEX, AdminClient, AdminError, find_token
from helexa.config import ConfigError, load_config
from helexa.status import printable


def fail(message: str, code: int = 2) -> None:
    click.echo(printable(f"helexa: error: {message}"), err=True)  # it may quote a cortex's or a neuron's words
    sys.exit(code)


def load(model: type, file: Path | None, overrides: dict[str, Any]):
    try:
        return load_config(model, file=file, overrides=overrides)
    except ConfigError as exc:
        fail(str(exc))


def admin_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the connection options; the command receives ``client`` instead of them."""
    @click.option("--cortex", "cortex_url", default=DEFAULT_CORTEX, show_default=True,
                  help="the cortex's admin address")
    @click.option("--data-dir", type=click.Path(path_type=Path), help="the cortex's data directory (its admin token)")
    @click.option("--admin-token-file", type=click.Path(path_type=Path), help="a file holding the admin token")
    @click.option("--timeout", default=10.0, show_default=True)
    @functools.wraps(fn)
    def wrapper(cortex_url: str, data_dir: Path | None, admin_token_file: Path | None, timeout: float,
                **kwargs: Any) -> None:
        try:
            client = AdminClient(cortex_url, find_token(token_file=admin_token_file, data_dir=data_dir),
                                 timeout=timeout)
            fn(client=client, **kwargs)
        except AdminError as exc:  # the cortex's words may quote a neuron's (an unload's refusal): escaped
            click.echo(printable(f"helexa: error: {exc}"), err=True)
            sys.exit(1)

    return wrapper


def when(value: float | None) -> str:
    """A time as a UTC date and minute; one no date can show (a key stored before the admin
    API refused such expiries) as the raw number, so the key stays listable and revocable."""
    if value is None:
        return "-"
    try:
        return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, ValueError, OSError, TypeError):
        return str(value)
