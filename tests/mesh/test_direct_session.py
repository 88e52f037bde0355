"""One direct-channel connection's hello, keys and sealed records, without I/O."""

import os

import pytest

from helexa.mesh.direct_session import HELLO_SIZE, MAX_RECORD, DirectSession, decode_hello, encode_hello
from helexa.protocol import DecodeError

SECRET, TICKET = os.urandom(32), os.urandom(16)


def pair(secret=SECRET, ticket=TICKET, dialer_nonce=b"d" * 32, listener_nonce=b"l" * 32, **kw):
    return (DirectSession(secret, ticket, dialer_nonce, listener_nonce, dialer=True, **kw),
            DirectSession(secret, ticket, dialer_nonce, listener_nonce, dialer=False, **kw))


def opened(session, data):
    session.feed(data)
    out = []
    while (record := session.next_record()) is not None:
        out.append(record)
    return out


def test_hello_round_trips_and_nothing_else_decodes():
    hello = encode_hello(TICKET, b"n" * 32)
    assert len(hello) == HELLO_SIZE and decode_hello(hello) == (TICKET, b"n" * 32)
    for bad in (hello[:-1], b"XXXX" + hello[4:], hello + b"x"):
        with pytest.raises(DecodeError):
            decode_hello(bad)


def test_records_open_on_the_other_end_in_both_directions_byte_by_byte_too():
    dialer, listener = pair()
    sealed = dialer.seal(b"one") + dialer.seal(b"two")
    got = []
    for i in range(len(sealed)):
        got += opened(listener, sealed[i : i + 1])
    assert got == [b"one", b"two"]
    assert opened(dialer, listener.seal(b"back")) == [b"back"]
    assert b"one" not in sealed  # sealed, not merely framed


def test_a_long_write_is_sealed_as_several_records():
    dialer, listener = pair(max_record=1000)
    data = os.urandom(2500)
    assert b"".join(opened(listener, dialer.seal(data))) == data
    assert len(opened(listener, dialer.seal(b"x"))) == 1


@pytest.mark.parametrize("change", ["secret", "ticket", "dialer_nonce", "listener_nonce"])
def test_other_keys_do_not_open_records(change):
    dialer, _ = pair()
    kw = {"secret": SECRET, "ticket": TICKET, "dialer_nonce": b"d" * 32, "listener_nonce": b"l" * 32}
    kw[change] = os.urandom(len(kw[change]))
    _, listener = pair(**kw)
    with pytest.raises(DecodeError):
        opened(listener, dialer.seal(b"hello"))


def test_an_altered_replayed_or_reordered_record_does_not_open():
    dialer, listener = pair()
    first, second = dialer.seal(b"first"), dialer.seal(b"second")
    tampered = bytearray(first)
    tampered[-1] ^= 1
    for bad in (bytes(tampered), second):  # altered; out of order
        _, fresh = pair()
        with pytest.raises(DecodeError):
            opened(fresh, bad)
    assert opened(listener, first) == [b"first"]
    with pytest.raises(DecodeError):
        opened(listener, first)  # replayed
    # A record sealed by this end's own key is refused too (no reflection).
    _, listener2 = pair()
    with pytest.raises(DecodeError):
        opened(listener2, listener2.seal(b"mine"))


def test_an_oversized_length_is_refused_before_its_body_arrives():
    _, listener = pair()
    listener.feed((MAX_RECORD + 17).to_bytes(4, "big"))
    with pytest.raises(DecodeError) as err:
        listener.next_record()
    assert err.value.code == "oversized"
