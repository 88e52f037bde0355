"""A model config's source on the wire: parsed strictly, optional for old senders."""

from __future__ import annotations

import msgpack
import pytest

from helexa.protocol import DecodeError, ModelConfig, SourceKind, UpsertModelConfig, decode, encode, parse_source

SHA = "0" * 64


@pytest.mark.parametrize(
    ("text", "kind", "repo", "revision", "filename"),
    [
        ("hf://org/repo/model.gguf", SourceKind.HUB, "org/repo", None, "model.gguf"),
        ("hf://org/repo@v1.2/sub/model.gguf", SourceKind.HUB, "org/repo", "v1.2", "sub/model.gguf"),
        ("hf://org/repo", SourceKind.HUB, "org/repo", None, None),
        ("hf://org/repo@0123abc", SourceKind.HUB, "org/repo", "0123abc", None),
        ("https://example.org/m.gguf", SourceKind.URL, None, None, None),
        ("http://127.0.0.1:8000/m.gguf", SourceKind.URL, None, None, None),
        ("/models/m.gguf", SourceKind.PATH, None, None, None),
        ("file:///models/m.gguf", SourceKind.PATH, None, None, None),
    ],
)
def test_sources_parse(text, kind, repo, revision, filename):
    s = parse_source(text)
    assert (s.kind, s.repo, s.revision, s.filename) == (kind, repo, revision, filename)


@pytest.mark.parametrize(
    ("text", "sha256", "why"),
    [
        ("hf://org", None, "ORG/REPO"),
        ("hf://org/repo@/m.gguf", None, "revision"),
        ("hf://org/repo/../x", None, "file path"),
        ("hf://or g/repo/x", None, "repository name"),
        ("hf://org/repo", SHA, "one file"),
        ("ftp://host/x", None, "absolute path"),
        ("models/m.gguf", None, "absolute path"),
        ("https://host", None, "file path"),
        ("http://example.org/m.gguf", None, "needs a sha256"),
        ("https://example.org/m.gguf", "ABC", "64 lowercase hex"),
    ],
)
def test_bad_sources_say_why(text, sha256, why):
    with pytest.raises(ValueError, match=why):
        parse_source(text, sha256=sha256)


def test_plain_http_off_loopback_is_accepted_when_pinned():
    assert parse_source("http://mirror.lan/m.gguf", sha256=SHA).kind is SourceKind.URL


def test_a_source_round_trips_and_an_old_frame_without_one_still_decodes():
    cfg = ModelConfig("m", "llama_cpp", source="hf://org/repo/m.gguf", sha256=SHA)
    assert decode(encode(UpsertModelConfig("c1", cfg))).config == cfg
    raw = msgpack.unpackb(encode(UpsertModelConfig("c1", ModelConfig("m", "llama_cpp"))))
    del raw["config"]["source"], raw["config"]["sha256"]
    assert decode(msgpack.packb(raw)).config == ModelConfig("m", "llama_cpp")


def test_a_malformed_source_is_a_decode_error():
    raw = msgpack.unpackb(encode(UpsertModelConfig("c1", ModelConfig("m", "llama_cpp"))))
    raw["config"]["source"] = "hf://nope"
    with pytest.raises(DecodeError, match="source|ORG/REPO"):
        decode(msgpack.packb(raw))
    raw["config"]["source"] = None
    raw["config"]["sha256"] = SHA
    with pytest.raises(DecodeError, match="sha256 needs a source"):
        decode(msgpack.packb(raw))
