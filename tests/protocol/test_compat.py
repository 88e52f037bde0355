"""Frames for a peer of an earlier release decode there: checked against the wire format of
the release of 2026-11-30 (``tests/fixtures/wire_2026-11-30.json``: each kind's fields, as
that tree's codec accepts them; it refuses a frame with any other and drops the link).

A new cortex sent every embedding a ``truncate`` that such a neuron (or peer) refused,
closing its connection, and a new neuron sent a non-streamed answer's ``first_token_s``
that such a cortex refused the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import msgpack

from helexa.protocol import (
    PROTOCOL_VERSION,
    EmbedRequest,
    GenerateRequest,
    GenerateResult,
    Heartbeat,
    NeuronMetrics,
    Task,
    TokenChunk,
    Usage,
    decode,
    encode,
    kinds,
)
from helexa.protocol import federation  # noqa: F401  (registers the mesh's kinds)
from helexa.protocol.codec import _OMIT_DEFAULT
from helexa.protocol.compat import for_earlier

from earlier_wire import kinds_of

EARLIER = kinds_of("2026-11-30")

HANDLED = {("generate", "cache_scope"), ("embed", "truncate"), ("result", "first_token_s"), ("chunk", "prompt_tokens"),
           ("join", "public_key"), ("join", "signature"), ("join", "cached"), ("heartbeat", "cached")}
"""Fields newer than that release in the frames both keep sending: ``for_earlier`` resets
the first four for such a peer and the heartbeat's cache report, the handshake the join's
three (it sends no key to a cortex of version 1, no cache report to one before version 3)."""

BEFORE_CACHE = kinds_of("2026-12-02")
"""The release of 2026-12-02 (186c5c3; the fixture was made from 001ba7c, wire-identical):
handshake version 2 and ``/helexa/federation/2``,
every field above but the cache report and the first chunk's prompt count."""


def unknown_to_earlier(frame: bytes, earlier: dict[str, list[str]] = EARLIER) -> list[str]:
    """The fields of ``frame`` that the earlier release's codec would refuse."""
    body = msgpack.unpackb(frame, raw=False)
    kind = body.pop("k")
    body.pop("v")
    return sorted(set(body) - set(earlier[kind]))


def test_every_field_added_since_is_left_out_at_its_default_and_each_is_accounted_for():
    """A field added to a message that an earlier peer may get must be an ``added_field``
    (left out while default): a plain field with a default is sent always, and refused
    there. And each one is known to :func:`for_earlier` (or the handshake)."""
    newer = set()
    for kind, cls in kinds().items():
        if kind not in EARLIER:
            continue
        for f in dataclasses.fields(cls):
            if f.name not in EARLIER[kind]:
                assert f.metadata.get(_OMIT_DEFAULT), f"{kind}.{f.name} is not an added_field"
                newer.add((kind, f.name))
    assert newer == HANDLED


def test_what_a_new_build_sends_an_earlier_peer_decodes_there():
    chat = GenerateRequest("r1", "m", Task.CHAT, messages=({"role": "user", "content": "x"},), cache_scope="ab" * 16)
    embed = EmbedRequest("r2", "m", ("a",), truncate=True)
    result = GenerateResult("r3", "stop", Usage(1, 1), text="hi", first_token_s=0.25)
    first = TokenChunk("r4", "Hel", 1, prompt_tokens=56)  # a generation's first chunk: the prompt's count
    for msg in (chat, embed, result, first):
        assert unknown_to_earlier(encode(msg)), msg  # as sent to a peer of this release
        assert unknown_to_earlier(encode(for_earlier(msg))) == []
    assert for_earlier(embed) == EmbedRequest("r2", "m", ("a",))
    assert for_earlier(replace(embed, truncate=False)) == EmbedRequest("r2", "m", ("a",))  # OpenAI's
    assert for_earlier(result).text == "hi" and for_earlier(result).first_token_s is None
    assert for_earlier(first) == TokenChunk("r4", "Hel", 1)
    later = TokenChunk("r4", "lo", 1)
    assert for_earlier(later) is later  # every other chunk goes as it is, not copied


def test_an_embedding_from_a_cortex_before_truncate_is_cut_as_that_cortex_cut():
    """Its frame has no ``truncate``: not said (None), which the backend reads as cut, what
    that release always did; this release's cortex says true or false."""
    old = msgpack.packb({"k": "embed", "v": PROTOCOL_VERSION, "request_id": "r", "model_id": "m", "inputs": ["a"],
                         "trace": ""})
    assert decode(old).truncate is None
    assert decode(encode(EmbedRequest("r", "m", ("a",), truncate=False))).truncate is False


def test_a_heartbeats_cache_report_reaches_only_a_cortex_of_handshake_version_3():
    """The tree of 2026-12-02 (version 2) knows every field above but not the heartbeat's
    ``cached``: its codec would refuse the heartbeat and drop the neuron's connection."""
    beat = Heartbeat(1, NeuronMetrics(), cached=("ab" * 16,))
    assert unknown_to_earlier(encode(beat), BEFORE_CACHE) == ["cached"]
    for version in (1, 2):
        assert unknown_to_earlier(encode(for_earlier(beat, version)), BEFORE_CACHE) == []
        assert for_earlier(beat, version).cached is None
    assert for_earlier(beat, 3) is beat
    assert unknown_to_earlier(encode(Heartbeat(2, NeuronMetrics())), BEFORE_CACHE) == []  # unchanged: left out
    assert decode(encode(Heartbeat(2, NeuronMetrics(), cached=()))).cached == ()  # emptied: said
    # a version-2 peer keeps getting the fields it knows
    chat = GenerateRequest("r1", "m", Task.CHAT, messages=({"role": "user", "content": "x"},), cache_scope="ab" * 16)
    assert for_earlier(chat, 2) is chat
    for kind, fields in BEFORE_CACHE.items():  # and every other kind is as it was
        assert kind in kinds() and (set(fields) == {f.name for f in dataclasses.fields(kinds()[kind])}
                                    or kind in ("join", "heartbeat", "chunk")), kind


def test_a_first_chunks_prompt_count_reaches_only_a_peer_of_version_3():
    """The tree of 2026-12-02 (handshake version 2, ``/helexa/federation/2``) refuses the
    first chunk's ``prompt_tokens``: a neuron of this release streaming to that cortex, or
    this cortex serving it over the mesh, would have its stream dropped at the first token."""
    first = TokenChunk("r1", "Hel", 1, prompt_tokens=42)
    assert unknown_to_earlier(encode(first), BEFORE_CACHE) == ["prompt_tokens"]
    for version in (1, 2):
        assert unknown_to_earlier(encode(for_earlier(first, version)), BEFORE_CACHE) == []
        assert for_earlier(first, version).prompt_tokens is None
    assert for_earlier(first, 3) is first
    later = TokenChunk("r1", "lo", 1)
    assert all(for_earlier(later, version) is later for version in (1, 2, 3))
