"""The error tree and its one conversion to OpenAI's envelope."""

from __future__ import annotations

import json
import logging

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
