"""What the :class:`~.provisioner.Provisioner` keeps of the loads and unloads under way, and
the error a neuron's refusal of a provisioning command becomes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import trio

from .errors import GatewayError
from .fleet import FleetError

__all__ = ["Flight", "Refused", "command_id"]


@dataclass
class Flight:
    """A load (of a model) or an unload (of a model from a neuron) under way, which others
    wait for (``done``) instead of starting their own; then its outcome: the neuron a load
    landed on or ``error``, an unload's ``node_id`` or ``failure``."""

    done: trio.Event = field(default_factory=trio.Event)
    node_id: str | None = None
    error: GatewayError | None = None
    failure: FleetError | None = None


class Refused(FleetError):
    """A neuron answered a provisioning command with ok=False (a :class:`FleetError`, so
    that :mod:`.operator_actions` catches it as such); ``code`` is the neuron's own
    (``disk_full``, ``hash_mismatch``...)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def command_id() -> str:
    """A fresh provisioning command id."""
    return uuid.uuid4().hex
