"""Strict enrolment, fed by hand to the two join state machines (no trio, no sockets): a
cortex with ``enrolment = "strict"`` refuses a node id bound to no key, even to a neuron
holding the join token, naming the two commands that enrol it; one enrolled (bound to the
neuron's key) joins. Every message goes through the real codec, as on the wire."""

from __future__ import annotations

import shlex

import pytest

from helexa import identity
from helexa.protocol.join import Admitted, Refusal, State, Welcomed
from helexa.protocol.join_identity import IDENTITY_MISMATCH, NOT_ENROLLED, enrol_command

from test_join import cortex, exchange, neuron


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[identity.Identity, identity.Identity]:
    folder = tmp_path_factory.mktemp("keys")
    return identity.load_or_create(folder / "a.key"), identity.load_or_create(folder / "b.key")


def bound_to(key: identity.Identity | None, node_id: str = "n1"):
    table = {node_id: key.public_bytes} if key is not None else {}
    return table.get


def test_strict_refuses_a_node_id_bound_to_no_key_naming_how_to_enrol_it(keys):
    mine, _ = keys
    n, c = neuron(identity=mine), cortex(strict=True)
    exchange(n, c)
    assert c.state is State.REFUSED and c.verdict.code == NOT_ENROLLED
    reason = c.verdict.reason
    assert "node id 'n1' is not enrolled on this cortex" in reason
    assert "`helexa neuron-key`" in reason and "`helexa neurons enrol n1 KEY`" in reason
    assert n.state is State.REFUSED and n.verdict == Refusal(NOT_ENROLLED, reason)  # the neuron hears why


def test_strict_admits_an_enrolled_node_id_with_its_key(keys):
    mine, _ = keys
    n, c = neuron(identity=mine), cortex(strict=True, bound=bound_to(mine))
    exchange(n, c)
    assert isinstance(c.verdict, Admitted) and c.verdict.public_key == mine.public_bytes
    assert isinstance(n.verdict, Welcomed)


def test_strict_still_refuses_an_enrolled_node_id_joined_with_another_key(keys):
    mine, theirs = keys
    n, c = neuron(identity=theirs), cortex(strict=True, bound=bound_to(mine))
    exchange(n, c)
    assert c.verdict.code == IDENTITY_MISMATCH


@pytest.mark.parametrize("versions", [(1, 1), (1, 2)], ids=["version-1", "no-identity"])
def test_strict_refuses_a_keyless_neuron_on_an_unbound_node_id(versions):
    n, c = neuron(versions=versions), cortex(strict=True)  # an older neuron: no key to enrol
    exchange(n, c)
    assert c.verdict.code == NOT_ENROLLED and "sent no identity key" in c.verdict.reason


def test_without_strict_an_unbound_node_id_still_binds_on_first_join(keys):
    mine, _ = keys
    n, c = neuron(identity=mine), cortex()
    exchange(n, c)
    assert isinstance(c.verdict, Admitted)


def test_strict_says_nothing_of_enrolment_to_a_neuron_without_the_token(keys):
    mine, _ = keys
    n, c = neuron(token="hlx1.wrong", identity=mine), cortex(strict=True)
    exchange(n, c)
    assert c.verdict.code == "unauthorized" and "enrol" not in c.verdict.reason


@pytest.mark.parametrize("node_id", ["gpu 1", "a'b;rm", "-x", "gpu-1.lan"])
def test_the_suggested_enrol_command_quotes_the_node_id_for_a_shell(keys, node_id):
    mine, _ = keys
    n, c = neuron(identity=mine, node_id=node_id), cortex(strict=True)
    exchange(n, c)
    command = enrol_command(node_id)
    assert c.verdict.code == NOT_ENROLLED and f"`{command}`" in c.verdict.reason
    assert shlex.split(command)[-2:] == [node_id, "KEY"]
