"""A joined neuron's connection taken over by another join under its node id (close 4001).

The cortex closes the old connection with :data:`CLOSE_REPLACED` and a reason that says
whether the new join carried the same identity key (a cloned machine) or a new one, bound
after the operator forgot the old (:func:`replaced_reason`); the neuron turns that into its
exit message (:func:`replaced_message`). Both are pure: the shells are
:mod:`helexa.roles.cortex.control_server` and :mod:`helexa.roles.neuron.connection`.
"""

from __future__ import annotations

import shlex

CLOSE_REPLACED = 4001
"""The websocket close code of a joined neuron's connection when a new join takes its node
id. A neuron that redials closes its old connection itself, so a live connection closed
with this code means another neuron joined under the same id: with the same identity key
(a cloned machine: a copied data directory), or with a new key the id was bound to after
the operator forgot this neuron's (``helexa neurons forget``). The close reason starts with
:data:`REPLACED_SAME_KEY` or :data:`REPLACED_NEW_KEY` to tell them apart
(:func:`replaced_reason`, :func:`replaced_message`)."""


def forget_command(node_id: str) -> str:
    """The ``helexa neurons forget`` command line for ``node_id``, as a shell reads it: quoted
    where needed (a node id may hold any printable character), after ``--`` when it starts
    with a dash (which the command would take for an option)."""
    return f"helexa neurons forget {'-- ' if node_id.startswith('-') else ''}{shlex.quote(node_id)}"


REPLACED_SAME_KEY = "same_key"
REPLACED_NEW_KEY = "new_key"


def replaced_reason(old_key: bytes, new_key: bytes) -> str:
    """The close reason of a connection whose node id a join with ``new_key`` took over from
    one with ``old_key`` (under a websocket close frame's 123 bytes: no node id in it)."""
    if old_key and old_key == new_key:
        return f"{REPLACED_SAME_KEY}: another neuron joined as this node id with this identity key"
    if old_key:
        return f"{REPLACED_NEW_KEY}: this node id's key was forgotten and bound to another neuron's identity key"
    return "replaced by another neuron's join under this node id"


def replaced_message(reason: str, cortex: str, node_id: str) -> tuple[str, str]:
    """The refusal code and message of a neuron whose connection was closed with
    :data:`CLOSE_REPLACED` and ``reason``."""
    if reason.startswith(REPLACED_NEW_KEY + ":"):
        return "node_id_rebound", (
            f"the operator forgot this neuron's identity key on {cortex} and another neuron joined as {node_id!r} "
            "with a new key, now bound to that node id: give this neuron its own node_id (or stop the other "
            f"neuron and run `{forget_command(node_id)}` again)")
    if reason.startswith(REPLACED_SAME_KEY + ":"):
        what = "with this neuron's identity key (a copy of its data_dir)"
    else:  # an older cortex, which does not say
        what = "(the cortex did not say with which identity key)"
    return "duplicate_node_id", (f"another neuron joined {cortex} as {node_id!r} {what}: "
                                 "each neuron needs its own node_id and data_dir")
