"""Generated hostile frames for the control plane and the mesh (the fuzz suite's and
``scripts/fuzz_control.py``'s): each registered message kind's map with its own field names
filled with hostile values (wrong types, integers beyond 64 bits, NaN, huge strings, deep
nesting), fields missing or unknown, kinds swapped, versions out of range, msgpack cut short,
and raw garbage."""

from __future__ import annotations

import dataclasses
import math
import random

import msgpack

from helexa.protocol.codec import kinds

KINDS = kinds()


def _deep(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


HOSTILE: list[object] = [
    None, True, 0, -1, 1.5, math.nan, math.inf, 2**63, -(2**63) - 1, 2**64 + 7, "", "x", "é\u202e\ud7ff",
    "x" * 70_000, b"", b"\x00" * 32, b"\xff" * 5000, [], [1, "a", None], {}, {"a": 1}, {1: 2}, _deep(200),
    {"k": "hello", "v": 1}, ["k", "hello"],
]


def _int_ok(value: object) -> bool:
    return not (isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64)


def _value(rng: random.Random) -> object:
    return rng.choice(HOSTILE)


def structured(rng: random.Random) -> dict:
    """A map shaped like one message kind, with hostile values in some of its fields."""
    kind, cls = rng.choice(sorted(KINDS.items()))
    body: dict = {"k": kind, "v": rng.choice([1, 1, 1, 0, 2, -1, 2**40, "1"])}
    for field in dataclasses.fields(cls):
        roll = rng.random()
        if roll < 0.1:
            continue  # missing
        body[field.name] = _value(rng) if roll < 0.7 else rng.choice([0, 1, "n1", b"\x00" * 32, [], {}])
    if rng.random() < 0.2:
        body[rng.choice(["extra", "", "k2", "\x00"])] = _value(rng)
    if rng.random() < 0.1:
        body["k"] = rng.choice(["", "warp_drive", 7, None, "HELLO", kind + "\x00"])
    return body


def _pack(body: object) -> bytes | None:
    """msgpack of ``body``, or None when msgpack itself cannot carry it (ints past 64 bits)."""
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


def frame(rng: random.Random) -> bytes:
    """One hostile frame (bytes as they go on the wire)."""
    roll = rng.random()
    if roll < 0.65:
        while True:
            packed = _pack(structured(rng))
            if packed is not None:
                break
        if rng.random() < 0.1:
            packed = packed[: rng.randrange(max(1, len(packed)))]  # cut short
        return packed
    if roll < 0.8:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 2, 7, 64, 512])))
    if roll < 0.9:  # msgpack that is not a map, or a map of another shape
        packed = _pack(rng.choice([[1, 2], "hello", 5, None, {"k": None}, {b"k": b"hello"}, {"v": 1}]))
        return packed or b"\xc1"
    return rng.choice([b"\xc1", b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\x92" * 1000 + b"\x01",
                       b"\xc6\xff\xff\xff\xff"])  # invalid byte, huge map/array headers, deep arrays, huge bin
