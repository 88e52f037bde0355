"""The neuron <-> worker protocol (helexa/protocol/worker.py): framing, and the ping
deadline's arithmetic. Round trips of its messages are in test_codec.py, with every kind."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helexa.protocol as p
from helexa.protocol.worker import (
    FROM_WORKER,
    TO_WORKER,
    FrameReader,
    Liveness,
    WorkerLoad,
    WorkerLoaded,
    WorkerProgress,
    WorkerReady,
    WorkerUnload,
    frame,
)

MESSAGES = [
    WorkerReady(4242),
    WorkerLoad(p.ModelConfig("m", "llama_cpp", metadata={"path": "/x.gguf", "n_ctx": 2048})),
    WorkerProgress("load", 0, 100, "bytes"),
    WorkerLoaded((p.Workload.CHAT, p.Workload.COMPLETION), 123),
    p.TokenChunk("r1", "hello"),
    p.GenerateResult("r1", "stop", p.Usage(3, 1)),
    p.InferenceError("r2", "backend_crashed", "gone"),
    WorkerUnload(),
    p.Ping(7),
]


def test_every_worker_message_is_registered_and_directed():
    kinds = p.kinds()
    for cls in {*TO_WORKER, *FROM_WORKER}:
        assert kinds[cls.KIND] is cls


def test_frames_round_trip_in_order_across_a_single_feed():
    reader = FrameReader()
    assert reader.feed(b"".join(frame(m) for m in MESSAGES)) == MESSAGES
    assert reader.buffered == 0


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_frames_survive_any_split_of_the_stream(cuts):
    stream = b"".join(frame(m) for m in MESSAGES)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    reader = FrameReader()
    got = []
    for a, b in zip([0, *points], [*points, len(stream)]):
        got += reader.feed(stream[a:b])
    assert got == MESSAGES and reader.buffered == 0


def test_an_oversized_frame_is_refused_from_its_header_alone():
    reader = FrameReader(max_frame=1024)
    with pytest.raises(p.DecodeError) as err:
        reader.feed((5000).to_bytes(4, "big") + b"x")
    assert err.value.code == "oversized"


def test_a_malformed_frame_is_a_decode_error():
    with pytest.raises(p.DecodeError):
        FrameReader().feed((3).to_bytes(4, "big") + b"\xc1\xc1\xc1")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_are_frames_or_protocol_errors(blob):
    try:
        FrameReader().feed(blob)
    except p.ProtocolError:
        pass


def test_pings_fall_due_every_interval():
    live = Liveness(interval=1.0, timeout=10.0, now=100.0)
    assert live.ping_due(100.5) is None
    assert live.ping_due(101.0) == 1
    assert live.ping_due(101.5) is None
    assert live.ping_due(102.0) == 2
    assert live.next_check(102.0) == 103.0


def test_a_worker_is_hung_only_after_timeout_seconds_of_silence():
    live = Liveness(interval=1.0, timeout=10.0, now=0.0)
    assert not live.hung(10.0)
    assert live.hung(10.001)
    live.heard(8.0)
    assert not live.hung(18.0) and live.silent_for(18.0) == 10.0
    assert live.hung(18.5)


def test_an_answer_heard_out_of_order_never_moves_the_deadline_back():
    live = Liveness(interval=1.0, timeout=5.0, now=0.0)
    live.heard(4.0)
    live.heard(3.0)
    assert not live.hung(9.0) and live.hung(9.01)


def test_the_next_check_is_the_deadline_when_it_comes_before_the_next_ping():
    live = Liveness(interval=5.0, timeout=2.0, now=0.0)
    assert live.next_check(0.0) == pytest.approx(2.0)


def test_time_the_watchdog_did_not_run_is_not_the_workers_silence():
    live = Liveness(interval=1.0, timeout=10.0, now=0.0)
    live.checking(1.0)
    live.heard(1.0)
    # The neuron (and its watchdog) stopped for 25 s: the next check comes 26 s after the last.
    live.checking(27.0)
    assert not live.hung(27.0) and live.silent_for(27.0) == pytest.approx(1.0)
    # Silence the watchdog was awake to see still counts: a worker that never answers again is hung.
    for t in range(28, 38):
        live.checking(float(t))
    assert live.hung(37.5)


def test_a_watchdog_on_time_excuses_nothing():
    live = Liveness(interval=1.0, timeout=3.0, now=0.0)
    for t in (1.0, 2.0, 3.0):
        live.checking(t)
    assert live.hung(3.01)
