"""The operator's join token: created on first start in the data directory (mode 0600,
like k3s's node token), handed to each neuron, rotatable from the CLI.

The cortex re-reads the file at every handshake, so a rotation takes effect at once for
new joins; neurons already joined stay joined until they reconnect.

With ``tls_cert_file`` set, the cortex records its certificate's SHA-256 in
``DATA_DIR/tls-fingerprint`` at start, and the token printed for neurons
(:func:`for_neurons`) carries it as a pin (``hlx1.<secret>::sha256:<hex>``): a neuron
verifies its ``wss://`` cortex by it, with no public CA.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from helexa import secret_files
from helexa.protocol.auth import cert_fingerprint, new_token, split_token, with_pin

FILENAME = "join-token"
FINGERPRINT = "tls-fingerprint"


def path_in(data_dir: Path) -> Path:
    return Path(data_dir) / FILENAME


def load_or_create(data_dir: Path) -> str:
    return secret_files.load_or_create(path_in(data_dir), new_token, read)


def rotate(data_dir: Path) -> str:
    """Replace the token with a fresh one and return it."""
    return secret_files.rotate(path_in(data_dir), new_token)


def read(path: Path) -> str:
    """The secret of a token file (a pin, if one was pasted in, is not part of it).
    Raises ``ValueError`` if it is empty."""
    return split_token(secret_files.read(path))[0]


def record_fingerprint(data_dir: Path, cert_file: Path | None) -> str | None:
    """Write the control plane's certificate pin beside the token (``tls-fingerprint``;
    not a secret), or remove a stale one when there is no certificate. Returns the pin.

    Raises ``ValueError`` when ``cert_file`` holds no PEM certificate, ``OSError`` when it
    cannot be read.
    """
    path = Path(data_dir) / FINGERPRINT
    if cert_file is None:
        if path.exists():  # (unlinking a missing file fails on a read-only data directory)
            path.unlink()
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(Path(cert_file).read_text())
    except ValueError:
        raise ValueError(f"{cert_file} holds no PEM certificate") from None
    pin = cert_fingerprint(der)
    path.write_text(pin + "\n")
    return pin


def for_neurons(data_dir: Path) -> str:
    """The token to hand to neurons: the secret, with the certificate pin when the cortex
    serves ``wss://`` (what ``helexa join-token`` prints)."""
    token = load_or_create(data_dir)
    try:
        pin = (Path(data_dir) / FINGERPRINT).read_text().strip()
    except FileNotFoundError:
        return token
    return with_pin(token, pin) if pin else token
