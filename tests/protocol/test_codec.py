"""The codec round-trips every message and rejects anything else with a ProtocolError."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import enum
import types
import typing

import helexa.protocol as p
from helexa.protocol import codec

ALL_KINDS = sorted(codec.kinds().items())
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL_TEXT = st.text(max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | SMALL_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SMALL_TEXT, inner, max_size=3),
    max_leaves=6,
)


def strategy_for(tp):
    """A hypothesis strategy for a wire type (ints within msgpack's range, no NaN, which
    is never equal to itself)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return JSON
    if tp is int:
        return INT64
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is str:
        return SMALL_TEXT
    if tp is bytes:
        return st.binary(max_size=40)
    if tp is bool:
        return st.booleans()
    if tp is type(None):
        return st.none()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = st.fixed_dictionaries({f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(tp)})

        def construct(kwargs):
            try:
                return tp(**kwargs)
            except ValueError:  # outside the type's own validation ranges
                return None

        return fields.map(construct).filter(lambda v: v is not None)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(SMALL_TEXT, strategy_for(args[1]), max_size=3)
    raise TypeError(tp)


def valid(cls):
    return strategy_for(cls)


@pytest.mark.parametrize("kind,cls", ALL_KINDS, ids=[k for k, _ in ALL_KINDS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_every_message_round_trips(kind, cls, data):
    msg = data.draw(valid(cls))
    assert p.decode(p.encode(msg)) == msg


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_anything_but_protocol_error(blob):
    try:
        p.decode(blob)
    except p.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["k", "v", "request_id", "text", "tokens", "nonce", "seq", "x"]),
        st.one_of(st.none(), INT64, st.text(max_size=5), st.binary(max_size=5), st.lists(INT64, max_size=3)),
    )
)
def test_random_maps_are_rejected_or_valid(obj):
    blob = msgpack.packb(obj, use_bin_type=True)
    try:
        msg = p.decode(blob)
    except p.ProtocolError:
        return
    assert p.decode(p.encode(msg)) == msg


def test_truncated_frame_is_rejected():
    frame = p.encode(p.TokenChunk("r1", "hello"))
    for cut in range(len(frame)):
        with pytest.raises(p.ProtocolError):
            p.decode(frame[:cut])


def test_oversized_frame_is_rejected_before_parsing():
    frame = p.encode(p.TokenChunk("r1", "x" * 5000))
    with pytest.raises(p.DecodeError) as err:
        p.decode(frame, max_size=1024)
    assert err.value.code == "oversized"


def test_unknown_kind_is_rejected():
    with pytest.raises(p.DecodeError) as err:
        p.decode(msgpack.packb({"k": "teleport", "v": 1}))
    assert err.value.code == "unknown_kind"


def test_future_version_is_rejected():
    body = {"k": "ping", "v": p.PROTOCOL_VERSION + 1, "nonce": 1}
    with pytest.raises(p.DecodeError) as err:
        p.decode(msgpack.packb(body))
    assert err.value.code == "version_mismatch"


def test_wrong_field_type_names_the_field():
    body = {"k": "heartbeat", "v": 1, "seq": "one", "metrics": {}, "models": []}
    with pytest.raises(p.DecodeError, match=r"heartbeat\.seq: expected int"):
        p.decode(msgpack.packb(body))


def test_unknown_and_missing_fields_are_rejected():
    with pytest.raises(p.DecodeError, match="unknown field"):
        p.decode(msgpack.packb({"k": "ping", "v": 1, "nonce": 1, "extra": 2}))
    with pytest.raises(p.DecodeError, match="missing field"):
        p.decode(msgpack.packb({"k": "ping", "v": 1}))


def test_invalid_values_fail_validation_not_construction():
    body = p.to_wire(p.GenerateRequest("r", "m", p.Task.CHAT))
    body["sampling"]["temperature"] = 9.0
    body.update(k="generate", v=1)
    with pytest.raises(p.DecodeError, match="temperature"):
        p.decode(msgpack.packb(body))


def test_encoding_an_unregistered_object_is_a_type_error():
    @dataclasses.dataclass(frozen=True)
    class NotAMessage:
        x: int

    with pytest.raises(TypeError):
        p.encode(NotAMessage(1))


def test_protocol_package_imports_no_io_libraries():
    root = pathlib.Path(p.__file__).parent
    forbidden = {"trio", "trio_websocket", "quart", "quart_trio", "hypercorn", "libp2p", "asyncio", "httpx"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_result_without_stop_sequence_decodes_from_an_older_peers_frame():
    """A GenerateResult frame as builds before ``stop_sequence`` wrote it still decodes."""
    old = msgpack.packb({"k": "result", "v": 1, "request_id": "r", "finish_reason": "stop",
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0},
                         "text": "hi", "tool_calls": None, "logprobs": None}, use_bin_type=True)
    result = p.decode(old)
    assert result == p.GenerateResult("r", "stop", p.Usage(3, 2), "hi")
    assert result.stop_sequence is None


def test_result_leaves_an_unused_stop_sequence_out_of_the_frame():
    """An older peer rejects unknown fields: a result that names no stop sequence is the
    frame it has always decoded."""
    frame = msgpack.unpackb(p.encode(p.GenerateResult("r", "stop", p.Usage(3, 2), "hi")))
    assert "stop_sequence" not in frame
    named = p.GenerateResult("r", "stop", p.Usage(3, 2), "hi", stop_sequence="\n\n")
    assert msgpack.unpackb(p.encode(named))["stop_sequence"] == "\n\n"
    assert p.decode(p.encode(named)) == named


def test_a_nested_field_error_names_its_whole_path():
    body = p.to_wire(p.Heartbeat(3, p.NeuronMetrics(gpus=(p.GpuUsage(0, 1, 2),)),
                                 (p.ModelStatus("m", p.ModelState.LOADED),)))
    body.update(k="heartbeat", v=1)
    body["metrics"]["gpus"][0]["vram_used"] = "lots"
    with pytest.raises(p.DecodeError, match=r"^heartbeat\.metrics\.gpus\[0\]\.vram_used: expected int, got str$"):
        p.decode(msgpack.packb(body))
    body["metrics"]["gpus"][0]["vram_used"] = 1
    body["models"][0]["state"] = "melted"
    with pytest.raises(p.DecodeError, match=r"^heartbeat\.models\[0\]\.state: 'melted' is not a valid ModelState$"):
        p.decode(msgpack.packb(body))
    with pytest.raises(p.DecodeError, match=r"^ModelStatus: missing field 'state'$"):
        p.from_wire(p.ModelStatus, {"model_id": "m"})


def test_a_float_field_takes_an_int_as_a_float():
    body = p.to_wire(p.Heartbeat(1, p.NeuronMetrics()))
    body.update(k="heartbeat", v=1)
    body["metrics"]["cpu_percent"] = 7
    hb = p.decode(msgpack.packb(body))
    assert hb.metrics.cpu_percent == 7.0 and type(hb.metrics.cpu_percent) is float
