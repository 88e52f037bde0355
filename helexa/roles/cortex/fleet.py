"""The cortex's live view of its neurons.

The control server (:mod:`helexa.roles.cortex.control_server`) owns the connections and
adds and removes their :class:`~.neuron_link.NeuronLink` here; everything else (the
orchestrator, the admin API) reads the fleet and acts through those links.

Exception tree::

    FleetError
    ├── NeuronGone          the neuron disconnected (``started`` says whether any output
    │                       had already been produced for the request)
    ├── RemoteError         the neuron answered with an error (``code``, ``retryable``)
    └── CommandTimeout      no answer within the deadline
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from helexa.identity import fingerprint
from helexa.protocol import ModelState, ModelStatus, cache_key, to_wire

if TYPE_CHECKING:
    from .neuron_link import NeuronLink


class FleetError(Exception):
    code = "fleet_error"


class NeuronGone(FleetError):
    code = "neuron_gone"

    def __init__(self, message: str, *, started: bool = False) -> None:
        super().__init__(message)
        self.started = started


class NeuronDraining(NeuronGone):
    """The neuron said it is going away (``Shutdown``) while a model was loading on it for
    us: the load is given up at once, as the neuron stops loads when its connection ends."""

    code = "neuron_draining"


class RemoteError(FleetError):
    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class CommandTimeout(FleetError):
    code = "timeout"


class Health(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # missed heartbeats; no new work
    DRAINING = "draining"  # announced Shutdown; no new work


OFFLINE = "offline"
"""What the operator's views (``/admin/fleet``, ``/admin/models``, the console) show for a
neuron whose connection dropped (killed, its host gone) and for each model it held: until
it reconnects or is removed (``remove_after``), nothing it reported is serving."""


def online(link: Any) -> bool:
    """Whether ``link``'s neuron is connected (a link without a connection of its own, as a
    test double, counts as connected)."""
    return getattr(link, "connected", True)


def health_view(link: Any) -> str:
    """``link``'s health as the operator's views show it: :data:`OFFLINE` once it disconnected."""
    return link.health.value if online(link) else OFFLINE


def key_view(link: Any) -> str | None:
    """The fingerprint of the identity key ``link``'s neuron proved at its join, as the
    operator's views show it; None for an older neuron that sent none."""
    key = getattr(link, "public_key", b"")
    return fingerprint(key) if key else None


def model_view(link: Any, status: Any) -> dict[str, Any]:
    """One model's status on ``link`` as wire data; a disconnected neuron's models are
    :data:`OFFLINE`, with the state last reported as ``last_state``."""
    out = to_wire(status)
    if not online(link):
        out["last_state"], out["state"] = out["state"], OFFLINE
    return out


CACHED = "cached"
"""The state the operator's views show for a catalogue model whose source a neuron's model
cache holds (its join and heartbeats say so) while the model is not configured there: a
restarted neuron, say. A load there uses the cache."""


def cached_view(link: Any, model_id: str) -> dict[str, Any]:
    """A catalogue model only in ``link``'s model cache, as :func:`model_view` shows a status."""
    return model_view(link, ModelStatus(model_id, ModelState.CONFIGURED, cached=True)) | (
        {"state": CACHED} if online(link) else {"last_state": CACHED})


def holds_source(link: Any, key: str | None) -> bool:
    """Whether ``link``'s neuron reported its model cache holding the source keyed ``key``."""
    return key is not None and key in getattr(link, "cached", ())


def cached_only(link: Any, catalogue: Any) -> list[str]:
    """The catalogue models whose sources ``link``'s model cache holds while they are not
    configured there (:data:`CACHED`), by id."""
    if not getattr(link, "cached", None):
        return []
    return sorted(e.id for e in catalogue
                  if e.id not in link.models and holds_source(link, cache_key(e.source, e.sha256)))


class Fleet:
    """All neurons currently joined (healthy or not), by node id.

    Links enter through :meth:`add` and leave through :meth:`remove` (the control server
    calls both); every change of membership or of a link's state wakes
    :meth:`wait_changed`.
    """

    def __init__(self) -> None:
        self._links: dict[str, NeuronLink] = {}
        self._changed = trio.Event()

    def add(self, link: NeuronLink) -> NeuronLink | None:
        """Register ``link`` under its node id; returns the link it replaces, if any."""
        old = self._links.get(link.node_id)
        self._links[link.node_id] = link
        self.notify()
        return old

    def remove(self, link: NeuronLink) -> bool:
        """Forget ``link`` if it is still the one registered under its node id."""
        if self._links.get(link.node_id) is not link:
            return False
        del self._links[link.node_id]
        self.notify()
        return True

    def get(self, node_id: str) -> NeuronLink | None:
        return self._links.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._links

    def __iter__(self) -> Iterator[NeuronLink]:
        return iter(list(self._links.values()))

    def __len__(self) -> int:
        return len(self._links)

    def usable(self) -> list[NeuronLink]:
        """Neurons that may be given new work."""
        return [link for link in self._links.values() if link.health is Health.HEALTHY]

    def notify(self) -> None:
        """Wake everyone waiting in :meth:`wait_changed` (a join, a leave, a state change)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def snapshot(self) -> dict[str, Any]:
        """The fleet as JSON-ready data, for the admin endpoint and ``helexa status``."""
        neurons = []
        for link in sorted(self._links.values(), key=lambda l: l.node_id):
            neurons.append(
                {
                    "node_id": link.node_id,
                    "health": health_view(link),
                    "connected": online(link),
                    "identity_key": key_view(link),
                    "descriptor": to_wire(link.descriptor),
                    "metrics": to_wire(link.metrics),
                    "models": {mid: model_view(link, st) for mid, st in sorted(link.models.items())},
                    "joined_at": link.joined_at,
                    "last_heartbeat": link.last_heartbeat,
                    "in_flight": link.in_flight,
                }
            )
        return {"neurons": neurons}
