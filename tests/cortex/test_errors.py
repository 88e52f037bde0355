"""The error tree and its one conversion to OpenAI's envelope."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from helexa.roles.cortex.errors import (
    BadRequest,
    ClientGone,
    ColdLoadFailed,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    client_gone,
    envelope,
    schema_field,
    to_gateway_error,
)
from helexa.roles.cortex.fleet import CommandTimeout, NeuronGone, RemoteError


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (BadRequest("bad", param="x"), 400, "invalid_request_error", None),
        (ModelNotFound("m"), 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLarge("big"), 413, "invalid_request_error", "payload_too_large"),
        (NoCapacity("busy", retry_after=2.5), 503, "service_unavailable", "no_capacity"),
        (ColdLoadFailed("nope"), 503, "service_unavailable", "load_failed"),
        (RemoteError("invalid_request", "bad prompt"), 400, "invalid_request_error", "invalid_request"),
        (RemoteError("out_of_slots", "full", retryable=True), 503, "service_unavailable", "out_of_slots"),
        (RemoteError("backend_crashed", "boom"), 502, "upstream_error", "backend_crashed"),
        (NeuronGone("gone", started=True), 502, "upstream_error", "neuron_gone"),
        (CommandTimeout("slow"), 504, "timeout", "timeout"),
    ],
)
def test_each_error_has_its_status_and_envelope(exc, status, type_, code) -> None:
    got_status, headers, body = envelope(exc)
    error = json.loads(body)["error"]
    assert got_status == status
    assert (error["type"], error["code"]) == (type_, code)
    assert set(error) == {"message", "type", "param", "code"}
    assert (b"content-type", b"application/json") in headers


def test_503_carries_retry_after_rounded_up() -> None:
    _, headers, _ = envelope(NoCapacity("busy", retry_after=2.5))
    assert (b"retry-after", b"3") in headers


def test_an_unexpected_error_says_nothing_about_internals() -> None:
    status, _, body = envelope(KeyError("secret_internal_name"))
    assert status == 500
    assert b"secret_internal_name" not in body and b"Traceback" not in body


def test_a_client_that_went_away_is_no_error_even_in_a_nurserys_group(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="helexa.roles.cortex.errors")
    gone = ClientGone("the client closed the connection")
    assert client_gone(gone) and client_gone(ExceptionGroup("nursery", [gone, ExceptionGroup("inner", [gone])]))
    assert not client_gone(ExceptionGroup("nursery", [gone, KeyError("x")])) and not client_gone(KeyError("x"))
    for exc in (gone, ExceptionGroup("nursery", [gone])):
        assert to_gateway_error(exc).code == "client_gone"
    assert all(r.levelno == logging.DEBUG and not r.exc_info for r in caplog.records) and caplog.records


def test_a_schema_the_neuron_cannot_use_names_the_field_the_client_sent_it_in() -> None:
    """llama.cpp's refusal of a schema as a grammar names nothing the client sent; the
    surface's field names go into ``param`` (tools, or its structured-output field)."""
    refused = RemoteError("invalid_request", "llama.cpp refused the request: Automatic parser generation failed: "
                                             "JSON schema error at #/properties/a: schema must be an object")
    via_tool = RemoteError("invalid_request", "JSON schema error at #/properties/tool_call/properties/arguments")
    fmt_only = SimpleNamespace(tools=(), response_format=object())
    tools_only = SimpleNamespace(tools=(object(),), response_format=None)
    both = SimpleNamespace(tools=(object(),), response_format=object())
    named = schema_field(refused, fmt_only, tools="tools", fmt="text.format")
    assert isinstance(named, BadRequest) and named.param == "text.format" and "'text.format'" in named.message
    assert schema_field(refused, tools_only, tools="tools", fmt="response_format").param == "tools"
    assert schema_field(refused, both, tools="tools", fmt="response_format").param == "response_format"
    assert schema_field(via_tool, both, tools="tools", fmt="response_format").param == "tools"
    # anything else is left as it was
    other = RemoteError("invalid_request", "the prompt is empty")
    assert schema_field(other, both, tools="tools", fmt="response_format") is other
    assert schema_field(refused, SimpleNamespace(tools=(), response_format=None), tools="tools", fmt=None) is refused
