"""The decoders the codec writes per class accept and reject exactly what the generic
field-by-field walk they replaced did, with the same values and the same error messages."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helexa.protocol as p
from helexa.protocol import codec

from test_codec import ALL_KINDS, JSON, strategy_for  # the same folder (rootdir-relative imports)


def _classes() -> list[type]:
    """Every registered message and every dataclass nested in one."""
    seen: dict[type, None] = {}

    def visit(tp: typing.Any) -> None:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp in seen:
                return
            seen[tp] = None
            for hint in typing.get_type_hints(tp).values():
                visit(hint)
        for arg in typing.get_args(tp):
            visit(arg)

    for _, cls in ALL_KINDS:
        visit(cls)
    return list(seen)


CLASSES = _classes()


def reference_decode(cls: type, data: typing.Any) -> typing.Any:
    """The generic walk (what the codec did before it wrote a decoder per class): each
    field through its converter from ``codec._build``, then ``cls(**kwargs)``."""
    hints = typing.get_type_hints(cls)
    plan = [(f.name, codec._build(hints[f.name])[1],
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls) if f.init]
    names = {name for name, _, _ in plan}
    if not isinstance(data, dict):
        raise codec._Invalid(f"expected a map, got {type(data).__name__}")
    if not names.issuperset(data):
        raise codec._Invalid(f"unknown field(s) {sorted(map(str, data.keys() - names))}")
    kwargs = {}
    for name, dec, required in plan:
        if name in data:
            try:
                kwargs[name] = dec(data[name])
            except codec._Invalid as exc:
                exc.path.append("." + name)
                raise
        elif required:
            raise codec._Invalid(f"missing field {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise codec._Invalid(str(exc)) from None


def outcome(decode: typing.Callable[[], typing.Any]) -> tuple[str, typing.Any]:
    try:
        value = decode()
    except p.DecodeError as exc:
        return "error", str(exc)
    except codec._Invalid as exc:
        return "error", exc.error("X").args[0]
    return "ok", value


def both(cls: type, body: typing.Any) -> None:
    # A fresh copy for each side: msgpack hands each decode its own objects.
    blob = msgpack.packb(body, use_bin_type=True)
    ours = outcome(lambda: p.from_wire(cls, msgpack.unpackb(blob, raw=False)))
    theirs = outcome(lambda: reference_decode(cls, msgpack.unpackb(blob, raw=False)))
    if theirs[0] == "error":  # the reference raises the bare _Invalid: name the root as from_wire does
        theirs = ("error", theirs[1].replace("X", cls.__name__, 1))
    assert ours == theirs
    if ours[0] == "ok":
        assert type(ours[1]) is cls
        for f in dataclasses.fields(cls):
            assert type(getattr(ours[1], f.name)) is type(getattr(theirs[1], f.name)), f.name


WILD = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3),
                 st.binary(max_size=3), st.lists(st.integers(0, 2), max_size=2), st.just([]), st.just({}), JSON)


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_generated_decoder_agrees_with_the_generic_walk(cls, data):
    body = p.to_wire(data.draw(strategy_for(cls)))
    both(cls, body)  # valid
    names = [f.name for f in dataclasses.fields(cls)]
    mutation = data.draw(st.sampled_from(["replace", "drop", "add", "not a map"]))
    if mutation == "replace" and names:
        body[data.draw(st.sampled_from(names))] = data.draw(WILD)
    elif mutation == "drop" and body:
        del body[data.draw(st.sampled_from(sorted(body)))]
    elif mutation == "add":
        body[data.draw(st.sampled_from(["extra", "zz"]))] = data.draw(WILD)
    else:
        body = data.draw(WILD.filter(lambda v: not isinstance(v, dict)))
    both(cls, body)


def test_generated_encoder_writes_what_the_reference_reads():
    """A field added later is left out at its default, and every other field is written."""
    result = p.GenerateResult("r", "stop", p.Usage(1, 2), "hi")
    wire = p.to_wire(result)
    added = {"stop_sequence", "first_token_s"}
    assert not added & set(wire)
    assert set(wire) == {f.name for f in dataclasses.fields(p.GenerateResult)} - added
    assert reference_decode(p.GenerateResult, msgpack.unpackb(msgpack.packb(wire))) == result
    timed = dataclasses.replace(result, first_token_s=0.25)
    assert p.to_wire(timed)["first_token_s"] == 0.25
    assert reference_decode(p.GenerateResult, msgpack.unpackb(msgpack.packb(p.to_wire(timed)))) == timed
