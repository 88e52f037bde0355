"""Gateways with keyed portals over neuron doubles, for the portal tests (tests only)."""

from __future__ import annotations

import calendar
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, Workload
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.gateway import Gateway
from helexa.roles.cortex.portal import keys
from helexa.roles.cortex.portal.quota import Limits
from helexa.roles.cortex.portal.store import SqliteStore
from serving import serving

CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=500, max_output=64, max_context=2048),
    CatalogueEntry(id="chat2", backend="synthetic", memory_mb=500),
    CatalogueEntry(id="embed", backend="embeddings", memory_mb=100, workloads=(Workload.EMBEDDING,)),
])

T0 = float(calendar.timegm((2026, 3, 14, 12, 0, 0)))
"""The Unix time at which virtual-time tests start (a Saturday noon, UTC)."""


def acme(**fields: Any) -> dict[str, Any]:
    """A keyed portal on a free port: models chat and embed, chat sold as "fast" at
    1,000 EUR per million tokens each way."""
    return {"listen": ["127.0.0.1:0"], "auth": "keys", "name": "Acme AI", "models": ["chat", "embed"],
            "aliases": {"fast": "chat"}, "currency": "EUR",
            "prices": {"fast": {"input": 1000.0, "output": 1000.0}, "chat": {"input": 1000.0, "output": 1000.0}},
            **fields}


def new_key(store: SqliteStore, portal: str, *, models: tuple[str, ...] | None = None, **limits: Any) -> str:
    """Store a key of ``portal`` (before the gateway starts, which loads them) and return it."""
    secret, key = keys.create(portal, "test", limits=Limits(**limits), models=models, now=T0)
    store.put_key(key)
    return secret


@asynccontextmanager
async def portals(fleet: Fleet, portal_tables: dict[str, dict[str, Any]], *, store: SqliteStore | None = None,
                  virtual: bool = False, reload: Any = None, **fields: Any) -> AsyncIterator[tuple[Gateway, dict[str, str]]]:
    """Serve ``portal_tables`` (plus the open default portal); yields the gateway and each
    portal's first URL (``"default"`` too). ``virtual``: quotas and the ledger run on
    trio's clock from :data:`T0` and the ledger is written inline (for the autojump clock).
    ``reload``: what ``POST /admin/reload`` calls."""
    gateway_args: dict[str, Any] = {"store": store or SqliteStore(":memory:"), "reload": reload}
    if virtual:
        gateway_args |= {"clock": lambda: T0 + trio.current_time(), "inline_ledger": True}
    async with serving(fleet, CATALOGUE, gateway_args=gateway_args, portals=portal_tables, **fields) as (gateway, _):
        yield gateway, {pid: urls[0] for pid, urls in gateway.addresses.items()}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` signed by its own key, and the key: their files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "portal.crt", tmp_path / "portal.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file
