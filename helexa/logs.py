"""Process-wide logging set-up shared by every role."""

from __future__ import annotations

import logging
import sys

_NOISY = {
    # kad-dht logs this at ERROR constantly (see docs/mesh.md)
    "libp2p.kad_dht": logging.CRITICAL,
    "hypercorn.access": logging.WARNING,
}


def setup(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name, lvl in _NOISY.items():
        logging.getLogger(name).setLevel(lvl)
