"""The official ``anthropic`` client pointed at a portal, and a fleet with a key to ask it
with, for the tests of Anthropic's Messages API (``test_anthropic_surface*.py``)."""

from __future__ import annotations

import anthropic
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import new_key

ASK = [{"role": "user", "content": "x"}]


def client(url: str, key: str | None = None, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key or "unused", max_retries=0, timeout=10, **kw)


def in_thread(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


def keyed(**limits):
    """A fleet with one neuron holding ``chat``, a store with one key of the acme portal."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", **limits)
    return fleet, neuron, store, key
