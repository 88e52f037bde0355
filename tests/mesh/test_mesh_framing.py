import pytest

from helexa.mesh.framing import FrameDecoder, encode_frame, encode_varint
from helexa.mesh.peer_id import b58encode
from helexa.protocol import DecodeError


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**32])
def test_varint_round_trips_through_the_decoder(n):
    dec = FrameDecoder(max_size=2**40)
    dec.feed(encode_varint(n))
    if n == 0:
        assert dec.next_frame() == b""
    else:
        assert dec.next_frame() is None  # the body has not arrived yet


def test_decoder_reassembles_frames_split_anywhere():
    data = b"".join(encode_frame(bytes([i]) * (i * 50)) for i in range(1, 6))
    dec = FrameDecoder(max_size=1024)
    frames = []
    for i in range(0, len(data), 7):
        dec.feed(data[i : i + 7])
        while (f := dec.next_frame()) is not None:
            frames.append(f)
    assert frames == [bytes([i]) * (i * 50) for i in range(1, 6)]
    assert dec.pending == 0


def test_oversized_frame_is_rejected_before_its_body_arrives():
    dec = FrameDecoder(max_size=100)
    dec.feed(encode_varint(101))
    with pytest.raises(DecodeError) as err:
        dec.next_frame()
    assert err.value.code == "oversized"


def test_endless_length_prefix_is_rejected():
    dec = FrameDecoder(max_size=100)
    dec.feed(b"\xff" * 11)
    with pytest.raises(DecodeError):
        dec.next_frame()


def test_base58_keeps_leading_zero_bytes():
    assert b58encode(b"\0\0\x01") == "112"
