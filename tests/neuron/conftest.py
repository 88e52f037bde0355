"""Fixtures for the neuron's tests: a local model hub (see ``tests/local_hub.py``)."""

from __future__ import annotations

import pytest

from local_hub import LocalHub, serve_hub


@pytest.fixture
def hub():
    with serve_hub() as local:
        yield local


@pytest.fixture(scope="session")
def tiny_bytes(tiny_gguf) -> bytes:
    return tiny_gguf.read_bytes()


__all__ = ["LocalHub"]
