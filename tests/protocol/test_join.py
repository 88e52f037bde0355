"""The join handshake's two state machines, fed messages by hand: no trio, no sockets.

Every message a session returns goes through the real codec before the other side sees it,
as it would on the wire."""

from __future__ import annotations

import pytest

from helexa.protocol import (
    Challenge,
    Fault,
    Hardware,
    Heartbeat,
    Hello,
    Join,
    MAX_CACHE_REPORT,
    ModelConfig,
    ModelState,
    ModelStatus,
    NeuronDescriptor,
    NeuronMetrics,
    Refused,
    Welcome,
    auth,
    decode,
    encode,
)
from helexa.protocol.join import (
    Admitted,
    CortexJoin,
    Failure,
    Impostor,
    NeuronJoin,
    RecentNonces,
    Refusal,
    State,
    Welcomed,
    choose_version,
)

TOKEN = "hlx1.session-test"
HW = Hardware(cpu_cores=2, ram_total=1 << 30)


def descriptor(node_id: str = "n1") -> NeuronDescriptor:
    return NeuronDescriptor(node_id=node_id, hardware=HW, software="helexa test")


def wire(msgs: list[object]) -> list[object]:
    return [decode(encode(m)) for m in msgs]


def cortex(token=lambda: TOKEN, recent: RecentNonces | None = None, **kw) -> CortexJoin:
    kw.setdefault("heartbeat_interval", 1.5)
    kw.setdefault("timeout", 10.0)
    return CortexJoin(token, recent=recent if recent is not None else RecentNonces(), operator="op-a", **kw)


def neuron(token: str = TOKEN, node_id: str = "n1", **kw) -> NeuronJoin:
    kw.setdefault("timeout", 10.0)
    return NeuronJoin(token, descriptor(node_id), **kw)


def exchange(n: NeuronJoin, c: CortexJoin) -> None:
    """Run the handshake between two sessions until both have a verdict (or one is stuck)."""
    to_cortex = wire(n.start())
    while to_cortex and c.verdict is None:
        to_neuron = wire([out for msg in to_cortex for out in c.receive(msg)])
        if not to_neuron or n.verdict is not None:
            return
        to_cortex = wire([out for msg in to_neuron for out in n.receive(msg)])


# --- success ------------------------------------------------------------------------------


def test_a_neuron_with_the_token_is_admitted_and_welcomed():
    models = (ModelStatus("m", ModelState.LOADED, "synthetic"),)
    configs = (ModelConfig("m", "synthetic"),)
    n = neuron(models=models, configs=configs)
    c = cortex(session_id="s1", cortex_id="cx")
    exchange(n, c)
    assert c.state is State.JOINED and n.state is State.JOINED
    assert c.verdict == Admitted("n1", 3, "s1", descriptor(), models, configs)  # no identity key given here
    assert n.verdict == Welcomed(3, "s1", 1.5, "op-a", "cx")


def test_the_messages_follow_the_documented_order_and_never_carry_the_token():
    n, c = neuron(), cortex()
    (hello,) = n.start()
    assert isinstance(hello, Hello) and hello.node_id == "n1" and hello.nonce == n.nonce
    (challenge,) = c.receive(hello)
    assert isinstance(challenge, Challenge) and c.state is State.AWAIT_JOIN
    (join,) = n.receive(challenge)
    assert isinstance(join, Join) and n.state is State.AWAIT_WELCOME
    assert join.proof == auth.join_proof(TOKEN, challenge.nonce, hello.nonce, "n1")
    (welcome,) = c.receive(join)
    assert isinstance(welcome, Welcome)
    assert n.receive(welcome) == []
    assert all(TOKEN.encode() not in encode(m) for m in (hello, challenge, join, welcome))


@pytest.mark.parametrize(
    "ours, theirs, chosen",
    [((1, 1), (1, 1), 1), ((2, 3), (1, 2), 2), ((2, 3), (3, 9), 3), ((2, 3), (1, 9), 3),
     ((2, 3), (1, 1), None), ((2, 3), (4, 5), None)],
)
def test_the_highest_common_version_is_chosen(ours, theirs, chosen):
    assert choose_version(ours, theirs) == chosen


def test_both_sides_agree_on_the_highest_common_version():
    n, c = neuron(versions=(1, 3)), cortex(versions=(2, 5))
    exchange(n, c)
    assert c.verdict.version == 3 and n.verdict.version == 3


# --- the cortex refuses -------------------------------------------------------------------


def refused_with(out: list[object], c: CortexJoin, code: str) -> Refused:
    assert len(out) == 1 and isinstance(out[0], Refused) and out[0].code == code
    assert c.state is State.REFUSED and c.verdict == Refusal(code, out[0].reason)
    return out[0]


def test_a_wrong_proof_is_refused_as_unauthorized_and_the_neuron_hears_why():
    n, c = neuron(token="hlx1.wrong"), cortex()
    exchange(n, c)
    assert c.verdict.code == "unauthorized" and "join proof does not match" in c.verdict.reason
    assert n.state is State.REFUSED and n.verdict == c.verdict


@pytest.mark.parametrize("theirs", [(7, 9), (0, 0)], ids=["neuron-too-new", "neuron-too-old"])
def test_a_neuron_speaking_no_common_version_is_refused_naming_both_ranges(theirs):
    c = cortex(versions=(1, 2))
    out = c.receive(Hello("n1", *theirs, auth.new_nonce()))
    reply = refused_with(out, c, "version_mismatch")
    assert f"{theirs[0]}..{theirs[1]}" in reply.reason and "1..2" in reply.reason


def test_a_replayed_hello_nonce_is_refused():
    recent = RecentNonces()
    nonce = auth.new_nonce()
    first = cortex(recent=recent)
    assert isinstance(first.receive(Hello("n1", 1, 1, nonce))[0], Challenge)
    again = cortex(recent=recent)
    refused_with(again.receive(Hello("n1", 1, 1, nonce)), again, "replayed_nonce")


def test_the_recent_nonces_are_bounded_and_forget_the_oldest():
    recent = RecentNonces(capacity=3)
    for nonce in (b"a", b"b", b"c", b"d"):
        assert recent.add(nonce)
    assert len(recent) == 3
    assert not recent.add(b"d") and not recent.add(b"b")
    assert recent.add(b"a")  # forgotten: the oldest went first


def test_a_hello_nonce_of_the_wrong_size_is_refused():
    c = cortex()
    refused_with(c.receive(Hello("n1", 1, 1, b"short")), c, "bad_request")


def test_a_join_whose_descriptor_names_another_node_is_refused():
    c = cortex()
    n = neuron(node_id="n1")
    (challenge,) = c.receive(n.start()[0])
    proof = auth.join_proof(TOKEN, challenge.nonce, n.nonce, "n1")
    out = c.receive(Join(proof, descriptor("n2")))
    assert "another node id" in refused_with(out, c, "bad_request").reason


@pytest.mark.parametrize("error", [OSError("gone"), ValueError("empty")])
def test_a_join_token_the_cortex_cannot_read_refuses_the_neuron(error):
    def token() -> str:
        raise error

    n, c = neuron(), cortex(token=token)
    exchange(n, c)
    assert c.verdict == Refusal("unavailable", "the cortex cannot read its join token")
    assert n.verdict == c.verdict


def test_the_token_is_read_when_the_join_arrives_so_a_rotation_applies_at_once():
    current = ["hlx1.old"]
    n, c = neuron(token="hlx1.new"), cortex(token=lambda: current[0])
    (challenge,) = c.receive(n.start()[0])
    current[0] = "hlx1.new"
    exchange_rest = c.receive(n.receive(challenge)[0])
    assert isinstance(exchange_rest[0], Welcome) and isinstance(c.verdict, Admitted)


# --- the neuron refuses -------------------------------------------------------------------


@pytest.mark.parametrize("chosen", [2, 0], ids=["cortex-too-new", "cortex-too-old"])
def test_a_challenge_for_a_version_the_neuron_does_not_speak_is_refused(chosen):
    n = neuron(versions=(1, 1))
    n.start()
    assert n.receive(Challenge(auth.new_nonce(), chosen)) == []
    assert n.state is State.REFUSED
    assert n.verdict.code == "version_mismatch" and f"version {chosen}" in n.verdict.reason


def test_a_challenge_that_reflects_the_neurons_own_nonce_is_an_impostor():
    n = neuron()
    (hello,) = n.start()
    assert n.receive(Challenge(hello.nonce, 1)) == []
    assert n.state is State.IMPOSTOR and isinstance(n.verdict, Impostor)


def test_a_welcome_without_the_counter_proof_is_an_impostor():
    # The impostor saw the real exchange but does not hold the token: it cannot forge the
    # welcome proof, even replaying the join proof the neuron just sent.
    n = neuron()
    n.start()
    challenge = Challenge(auth.new_nonce(), 1)
    (join,) = n.receive(challenge)
    assert n.receive(Welcome(join.proof, "s", 1.0)) == []
    assert n.state is State.IMPOSTOR
    assert n.verdict == Impostor("the cortex could not prove it holds our join token")


def test_a_welcome_proved_with_another_token_is_an_impostor():
    n, c = neuron(), cortex(token=lambda: TOKEN)
    (challenge,) = c.receive(n.start()[0])
    forged = Welcome(auth.welcome_proof("hlx1.other", challenge.nonce, n.nonce, "n1"), "s", 1.0)
    n.receive(challenge)
    n.receive(forged)
    assert isinstance(n.verdict, Impostor)


@pytest.mark.parametrize("step", ["challenge", "welcome"])
def test_a_refusal_at_either_step_settles_the_neuron(step):
    n = neuron()
    n.start()
    if step == "welcome":
        n.receive(Challenge(auth.new_nonce(), 1))
    assert n.receive(Refused("unauthorized", "no")) == []
    assert n.verdict == Refusal("unauthorized", "no")


# --- broken peers -------------------------------------------------------------------------

BEAT = Heartbeat(1, NeuronMetrics())


def cortex_at(step: str) -> CortexJoin:
    c = cortex()
    if step == "join":
        c.receive(Hello("n1", 1, 1, auth.new_nonce()))
    return c


def neuron_at(step: str) -> NeuronJoin:
    n = neuron()
    n.start()
    if step == "welcome":
        n.receive(Challenge(auth.new_nonce(), 1))
    return n


@pytest.mark.parametrize(
    "make, step, msg",
    [
        (cortex_at, "hello", BEAT),
        (cortex_at, "hello", Join(b"p", descriptor())),
        (cortex_at, "join", Hello("n1", 1, 1, b"x" * 32)),
        (cortex_at, "join", Refused("x", "y")),
        (neuron_at, "challenge", Welcome(b"p", "s", 1.0)),
        (neuron_at, "challenge", BEAT),
        (neuron_at, "welcome", Challenge(b"n" * 32, 1)),
        (neuron_at, "welcome", BEAT),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", type(v).__name__),
)
def test_an_unexpected_message_at_each_step_fails_the_session_with_a_fault(make, step, msg):
    session = make(step)
    out = session.receive(msg)
    reason = f"expected {step}, got {type(msg).__name__}"
    assert out == [Fault("unexpected", reason)]
    assert session.state is State.FAILED and session.verdict == Failure("unexpected", reason)


@pytest.mark.parametrize("make, step", [(cortex_at, "hello"), (cortex_at, "join"),
                                        (neuron_at, "challenge"), (neuron_at, "welcome")])
def test_a_fault_from_the_peer_fails_the_session_without_answering(make, step):
    session = make(step)
    assert session.receive(Fault("malformed", "bad frame")) == []
    assert session.verdict == Failure("malformed", "the peer reported a fault: bad frame")


@pytest.mark.parametrize("make, step", [(cortex_at, "hello"), (cortex_at, "join"),
                                        (neuron_at, "challenge"), (neuron_at, "welcome")])
def test_a_silent_peer_fails_the_session_when_the_shell_says_time_is_up(make, step):
    session = make(step)
    assert session.timeout == 10.0
    session.expire()
    assert session.state is State.FAILED
    assert session.verdict == Failure("timeout", "the handshake did not finish within 10s")


def test_expiry_after_a_verdict_changes_nothing():
    n, c = neuron(), cortex()
    exchange(n, c)
    c.expire()
    n.expire()
    assert isinstance(c.verdict, Admitted) and isinstance(n.verdict, Welcomed)


def test_feeding_a_settled_session_is_a_caller_bug():
    c = cortex()
    c.receive(BEAT)
    with pytest.raises(RuntimeError):
        c.receive(Hello("n1", 1, 1, auth.new_nonce()))
    n = neuron()
    n.start()
    with pytest.raises(RuntimeError):
        n.start()


def test_the_join_says_what_the_model_cache_holds_to_a_cortex_of_version_3_only():
    """A restarted neuron's cache was unknown to its cortex until each model was pulled or
    loaded again; a cortex of version 2 (the tree before) refuses a join with the field."""
    keys = tuple(f"{i:032x}" for i in range(3))
    n, c = neuron(cached=keys), cortex()
    exchange(n, c)
    assert c.verdict.version == 3 and c.verdict.cached == keys
    n, c = neuron(cached=keys), cortex(versions=(1, 2))
    sent: list = []
    to_cortex = wire(n.start())
    while to_cortex and c.verdict is None:
        sent += to_cortex
        to_neuron = wire([out for msg in to_cortex for out in c.receive(msg)])
        to_cortex = wire([out for msg in to_neuron for out in n.receive(msg)])
    assert c.verdict.version == 2 and c.verdict.cached == ()
    (join,) = [m for m in sent if isinstance(m, Join)]
    assert join.cached == () and b"cached" not in encode(join)
    many = tuple(f"{i:032x}" for i in range(MAX_CACHE_REPORT + 10))  # bounded on both sides
    n, c = neuron(cached=many), cortex()
    exchange(n, c)
    assert c.verdict.cached == many[:MAX_CACHE_REPORT]
