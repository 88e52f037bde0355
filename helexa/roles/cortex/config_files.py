"""The files a cortex's configuration names, checked as the cortex starts (and as ``helexa
config check`` checks them, without starting anything): TLS certificates and keys, and the
model catalogue. Each check reads; none writes."""

from __future__ import annotations

import ssl
from pathlib import Path

from helexa import secret_files
from helexa.config import ConfigError

from .catalogue import Catalogue, CatalogueError, default_catalogue
from .config import CortexConfig


def check_tls_files(config: CortexConfig) -> None:
    """Refuse to start on a certificate or key (the control plane's, a portal's) that cannot
    be loaded, with one line naming the key: found only when a portal's listener started,
    it stopped the cortex with a traceback (exit 1, which systemd restarts for ever).

    Raises:
        ConfigError: a file is unreadable, or the pair is not a certificate and its key.
    """
    pairs = [("", config.tls_cert_file, config.tls_key_file)]
    pairs += [(f"portals.{name}.", p.tls_cert_file, p.tls_key_file) for name, p in config.portals.items()]
    for prefix, cert, key in pairs:
        if cert is None or key is None:
            continue
        for name, path in (("tls_cert_file", cert), ("tls_key_file", key)):
            try:
                Path(path).open("rb").close()
            except OSError as exc:
                raise ConfigError(f"{prefix}{name}: cannot read {path} ({exc.strerror or exc})") from None
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{prefix}tls_cert_file, {prefix}tls_key_file: not a PEM certificate and its "
                              f"private key ({getattr(exc, 'reason', None) or exc})") from None


def check_key_files(config: CortexConfig) -> None:
    """Refuse a TLS private key (the control plane's, a portal's) that other users may read
    (:func:`helexa.secret_files.check`)."""
    secret_files.check(config.tls_key_file, "tls_key_file")
    for name, portal in config.portals.items():
        secret_files.check(portal.tls_key_file, f"portals.{name}.tls_key_file")


def load_catalogue(config: CortexConfig) -> Catalogue:
    """The catalogue ``config.models_file`` holds (the built-in one without it).

    Raises:
        ConfigError: naming ``models_file``; its ``problems`` list every entry's problems.
    """
    try:
        return Catalogue.load(config.models_file) if config.models_file else default_catalogue()
    except CatalogueError as exc:
        raise ConfigError(f"models_file: {exc}", [f"models_file: {p}" for p in exc.problems]) from None
