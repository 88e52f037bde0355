"""``helexa config check``: the checks a cortex and a neuron make of their configuration as
they start (and a cortex on ``helexa reload``), made without starting anything: no socket is
bound or dialled, nothing is written to a data directory (a neuron's identity key is read when
it exists, not made). Each role's file is read with the environment's ``HELEXA_*`` variables,
as the role reads it.

Each check returns a :class:`Checked`: every problem found, one line each naming the key (and
the file), or a short summary of what the file configures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from helexa.config import ConfigError, load_config

T = TypeVar("T")


@dataclass
class Checked:
    """What one check found."""

    what: str
    """The file checked (or the role, for a configuration from the environment alone)."""
    problems: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    """What the file configures, when it has no problem (``key: value`` lines)."""
    notes: list[str] = field(default_factory=list)
    """What the check could not know (a join token given only when the neuron starts)."""


def _step(checked: Checked, check: Callable[[], T]) -> T | None:
    """``check()``, its :class:`ConfigError`'s problems added to ``checked`` (None then)."""
    try:
        return check()
    except ConfigError as exc:
        checked.problems.extend(exc.problems)
        return None


def check_cortex(file: Path | None, models: Path | None = None) -> Checked:
    """A ``cortex.toml`` (``models``, when given, in place of its ``models_file``, as
    ``helexa cortex --models`` takes it), its TLS files and its catalogue."""
    from helexa.roles.cortex.config import CortexConfig
    from helexa.roles.cortex.config_files import check_key_files, check_tls_files, load_catalogue

    checked = Checked(str(file) if file is not None else "the cortex's environment")
    config = _step(checked, lambda: load_config(CortexConfig, file=file, overrides={"models_file": models}))
    if config is None:
        return checked
    _step(checked, lambda: check_key_files(config))
    _step(checked, lambda: check_tls_files(config))
    catalogue = _step(checked, lambda: load_catalogue(config))
    scheme = "wss" if config.tls_cert_file else "ws"
    checked.summary = [
        f"control: {scheme}://{config.control_socket}",
        "portals: " + "; ".join(f"{n} on {', '.join(p.listen) or '-'}" for n, p in config.portals.items()),
        f"models: {len(catalogue) if catalogue is not None else '?'} from "
        f"{config.models_file or 'the built-in catalogue'}",
        f"data_dir: {config.data_dir}",
        f"mesh: {'on, ' + config.mesh.listen if config.mesh.enabled else 'off'}",
    ]
    return checked


def check_models(file: Path) -> Checked:
    """A ``models.toml`` alone: every entry's problems."""
    from helexa.roles.cortex.catalogue import Catalogue, CatalogueError

    checked = Checked(str(file))
    try:
        catalogue = Catalogue.load(file)
    except CatalogueError as exc:
        checked.problems.extend(exc.problems)
        return checked
    checked.summary = [f"models: {len(catalogue)} ({', '.join(sorted(e.id for e in catalogue)) or 'none'})"]
    return checked


def check_neuron(file: Path | None) -> Checked:
    """A ``neuron.toml``: its values, the node id it resolves to, its join token when it
    names one (file or environment), its CA file and its identity key when it exists."""
    from helexa.protocol.auth import split_token
    from helexa.roles.neuron.config import IDENTITY_FILE, NeuronConfig, load_identity, resolve_node_id, resolve_token

    checked = Checked(str(file) if file is not None else "the neuron's environment")
    config = _step(checked, lambda: load_config(NeuronConfig, file=file))
    if config is None:
        return checked
    node_id = _step(checked, lambda: resolve_node_id(config.node_id))
    secret = config.join_token.get_secret_value().strip() if config.join_token is not None else ""
    has_token = bool(secret) or config.join_token_file is not None
    if has_token:
        token = _step(checked, lambda: resolve_token(config))
        if token is not None:
            try:
                _, pin = split_token(token)
            except ValueError as exc:
                checked.problems.append(f"join_token: {exc}")
            else:
                if pin is not None and not config.cortex.startswith("wss://"):
                    checked.problems.append(f"join_token: it pins the cortex's certificate, but cortex = "
                                            f"{config.cortex!r} is not wss://")
    else:
        checked.notes.append("join_token: none in the file or the environment (give --join-token-file, or "
                             "HELEXA_JOIN_TOKEN, when the neuron starts)")
    for key, path in (("tls_ca_file", config.tls_ca_file), ("sources.hf_token_file", config.sources.hf_token_file)):
        _step(checked, lambda key=key, path=path: _readable(key, path))
    if (config.data_dir / IDENTITY_FILE).exists():
        _step(checked, lambda: load_identity(config.data_dir))  # read only: it exists
    checked.summary = [f"cortex: {config.cortex}", f"node_id: {node_id or '?'}", f"data_dir: {config.data_dir}"]
    return checked


def _readable(key: str, path: Any) -> None:
    if path is None:
        return
    try:
        Path(path).open("rb").close()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror or exc})") from None
