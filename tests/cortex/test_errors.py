"""The error tree and its one conversion to OpenAI's envelope."""

from __future__ import annotations

import json

import pytest

from helexa.roles.cortex.errors import (
    BadRequest,
    ColdLoadFailed,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    envelope,
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
