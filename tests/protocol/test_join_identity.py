"""The join's identity key, fed by hand to the two state machines (no trio, no sockets):
a neuron signs both nonces and its node id with its own Ed25519 key, and the cortex refuses
a node id bound to another key, so the join token alone does not let one neuron pass for
another. Every message goes through the real codec, as on the wire."""

from __future__ import annotations

import shlex
from pathlib import Path

import msgpack
import pytest

from helexa import identity
from helexa.protocol import Challenge, Join, Refused, Welcome, auth, decode, encode
from helexa.protocol.join import Admitted, CortexJoin, NeuronJoin, State, Welcomed
from helexa.protocol.join_identity import IDENTITY_MISMATCH
from helexa.protocol.takeover import replaced_message, replaced_reason

from test_join import TOKEN, cortex, descriptor, exchange, neuron


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[identity.Identity, identity.Identity]:
    folder = tmp_path_factory.mktemp("keys")
    return identity.load_or_create(folder / "a.key"), identity.load_or_create(folder / "b.key")


def bound_to(key: identity.Identity | None, node_id: str = "n1"):
    table = {node_id: key.public_bytes} if key is not None else {}
    return table.get


def test_the_join_carries_the_key_and_a_signature_over_both_nonces_and_the_node_id(keys):
    mine, _ = keys
    n, c = neuron(identity=mine), cortex()
    (challenge,) = c.receive(decode(encode(n.start()[0])))
    (join,) = n.receive(decode(encode(challenge)))
    join = decode(encode(join))
    assert isinstance(join, Join) and join.public_key == mine.public_bytes
    statement = auth.identity_statement(challenge.nonce, n.nonce, "n1")
    assert identity.verify_signature(mine.public_bytes, join.signature, statement)
    assert not identity.verify_signature(mine.public_bytes, join.signature, statement[:-1] + b"2")  # the node id
    (welcome,) = c.receive(join)
    assert isinstance(welcome, Welcome) and c.verdict.public_key == mine.public_bytes


@pytest.mark.parametrize("bound", [None, "mine"], ids=["first-join", "same-key"])
def test_an_unbound_node_id_or_one_bound_to_the_same_key_is_admitted(keys, bound):
    mine, _ = keys
    n, c = neuron(identity=mine), cortex(bound=bound_to(mine if bound else None))
    exchange(n, c)
    assert isinstance(c.verdict, Admitted) and c.verdict.public_key == mine.public_bytes
    assert isinstance(n.verdict, Welcomed)


def test_a_node_id_bound_to_another_key_is_refused_naming_the_fix_even_with_the_token(keys):
    mine, theirs = keys
    n, c = neuron(identity=theirs), cortex(bound=bound_to(mine))
    exchange(n, c)
    assert c.state is State.REFUSED and c.verdict.code == IDENTITY_MISMATCH
    reason = c.verdict.reason
    assert "'n1' is bound to another identity key" in reason and "`helexa neurons forget n1`" in reason
    assert mine.fingerprint in reason and theirs.fingerprint in reason
    assert n.state is State.REFUSED and n.verdict == c.verdict  # the neuron hears why


@pytest.mark.parametrize("node_id, command", [
    ("gpu 1", "helexa neurons forget 'gpu 1'"),
    ("a'b;rm", "helexa neurons forget 'a'\"'\"'b;rm'"),
    ("-x", "helexa neurons forget -- -x"),
    ("gpu-1.lan", "helexa neurons forget gpu-1.lan"),
])
def test_the_suggested_forget_command_quotes_the_node_id_for_a_shell(keys, node_id, command):
    mine, theirs = keys
    n, c = neuron(identity=theirs, node_id=node_id), cortex(bound=bound_to(mine, node_id))
    exchange(n, c)
    assert c.verdict.code == IDENTITY_MISMATCH and f"`{command}`" in c.verdict.reason
    assert shlex.split(command)[-1] == node_id


def test_a_takeover_close_says_whether_the_key_was_the_same_or_rebound(keys):
    mine, theirs = keys
    a, b = mine.public_bytes, theirs.public_bytes
    for reason in (replaced_reason(a, a), replaced_reason(a, b), replaced_reason(b"", a)):
        assert len(reason.encode()) <= 123  # a websocket close frame's reason
    code, message = replaced_message(replaced_reason(a, a), "ws://c", "n1")
    assert code == "duplicate_node_id" and "a copy of its data_dir" in message and "forgot" not in message
    code, message = replaced_message(replaced_reason(a, b), "ws://c", "n 1")
    assert code == "node_id_rebound" and "data_dir)" not in message
    assert "the operator forgot this neuron's identity key" in message and "helexa neurons forget 'n 1'" in message
    code, message = replaced_message("replaced by a new connection of node id n1", "ws://c", "n1")  # an older cortex
    assert code == "duplicate_node_id" and "copy of its data_dir" not in message


def test_a_bound_node_id_joined_without_a_key_is_refused(keys):
    mine, _ = keys
    n, c = neuron(), cortex(bound=bound_to(mine))  # an older neuron, or one that sends none
    exchange(n, c)
    assert c.verdict.code == IDENTITY_MISMATCH and "sent no identity key" in c.verdict.reason


def test_an_older_neuron_without_a_key_still_joins_an_unbound_node_id():
    n, c = neuron(versions=(1, 1)), cortex()
    exchange(n, c)
    assert isinstance(c.verdict, Admitted) and c.verdict.version == 1 and c.verdict.public_key == b""


def test_an_older_cortex_is_sent_no_key_so_it_can_still_read_the_join(keys):
    mine, _ = keys
    n = neuron(identity=mine)
    n.start()
    (join,) = n.receive(Challenge(auth.new_nonce(), 1))
    fields = msgpack.unpackb(encode(join))
    assert "public_key" not in fields and "signature" not in fields


def test_the_key_alone_does_not_make_a_neuron_belong(keys):
    mine, _ = keys
    n, c = neuron(token="hlx1.wrong", identity=mine), cortex(bound=bound_to(mine))
    exchange(n, c)
    assert c.verdict.code == "unauthorized" and "join proof" in c.verdict.reason


def signed_join(c: CortexJoin, n: NeuronJoin, key: bytes, signature: bytes) -> list[object]:
    (challenge,) = c.receive(n.start()[0])
    proof = auth.join_proof(TOKEN, challenge.nonce, n.nonce, "n1")
    return c.receive(decode(encode(Join(proof, descriptor(), public_key=key, signature=signature))))


def test_a_key_claimed_without_its_private_half_is_refused(keys):
    mine, theirs = keys
    n, c = neuron(), cortex()
    (challenge,) = c.receive(n.start()[0])
    proof = auth.join_proof(TOKEN, challenge.nonce, n.nonce, "n1")
    # Their own signature, under the bound neuron's key: they cannot sign as it.
    forged = theirs.sign(auth.identity_statement(challenge.nonce, n.nonce, "n1"))
    out = c.receive(Join(proof, descriptor(), public_key=mine.public_bytes, signature=forged))
    assert isinstance(out[0], Refused) and out[0].code == "unauthorized" and "signature" in out[0].reason


def test_a_signature_replayed_from_another_join_is_refused(keys):
    mine, _ = keys
    n, c = neuron(), cortex()
    old = mine.sign(auth.identity_statement(auth.new_nonce(), auth.new_nonce(), "n1"))  # another challenge's
    out = signed_join(c, n, mine.public_bytes, old)
    assert out[0].code == "unauthorized"


@pytest.mark.parametrize("key", [b"", b"k" * 31], ids=["signature-without-key", "short-key"])
def test_a_malformed_key_is_refused(keys, key):
    n, c = neuron(), cortex()
    assert signed_join(c, n, key, b"s" * 64)[0].code == "unauthorized"


def test_a_key_file_is_made_once_private_and_whole(tmp_path: Path):
    path = tmp_path / "data" / "identity.key"
    first = identity.load_or_create(path)
    assert identity.load_or_create(path).public_bytes == first.public_bytes
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temporary file left
