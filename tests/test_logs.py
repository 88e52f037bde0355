"""Logging: JSON lines with the request's fields, text with them appended, secrets masked
whatever path they took into a message. (A real cortex's JSON log is scanned for keys in
``tests/e2e/test_logs_e2e.py``.)"""

from __future__ import annotations

import io
import json
import logging

import pytest
import trio

from helexa import logs

KEY = "sk-hlx-0123abcd_SECRETSECRETSECRET"


@pytest.fixture
def captured():
    stream = io.StringIO()
    yield stream
    logs.setup("info")


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_lines_carry_the_bound_request_fields(captured) -> None:
    logs.setup("debug", "json", stream=captured)
    log = logging.getLogger("helexa.test")
    with logs.bound(request_id="r1", portal="acme"):
        with logs.bound(model="m", neuron="n1"):
            log.info("served %d tokens", 5)
        log.warning("after")
    log.debug("outside")
    first, second, third = (json.loads(line) for line in lines(captured))
    assert first["message"] == "served 5 tokens" and first["level"] == "INFO" and first["logger"] == "helexa.test"
    assert (first["request_id"], first["portal"], first["model"], first["neuron"]) == ("r1", "acme", "m", "n1")
    assert second["request_id"] == "r1" and "model" not in second
    assert "request_id" not in third and third["level"] == "DEBUG"
    assert "time" in first


def test_text_lines_append_the_fields(captured) -> None:
    logs.setup("info", "text", stream=captured)
    with logs.bound(request_id="r2", model="m"):
        logging.getLogger("helexa.test").info("hello")
    (line,) = lines(captured)
    assert line.endswith("helexa.test: hello [request_id=r2 model=m]")


def test_keys_tokens_and_bearer_credentials_never_reach_a_log(captured) -> None:
    logs.setup("debug", "json", stream=captured)
    log = logging.getLogger("helexa.test")
    log.info("key %s presented", KEY)
    log.info("header: Authorization: Bearer hlx-admin-abcdef")
    log.info("join token hlx1.abc.def-ghi in a message")
    log.info("server says: non-default args: {'api_key': 'hlx-up-Upstream_key-1'}")  # a supervised server's own line
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        log.exception("failed")
    text = captured.getvalue()
    assert "SECRET" not in text and "hlx-admin-abcdef" not in text and "abc.def-ghi" not in text
    assert "Upstream_key-1" not in text
    assert "sk-hlx-***" in text and "Bearer ***" in text and "hlx1.***" in text and "hlx-up-***" in text
    assert all(json.loads(line) for line in lines(captured))


async def test_fields_follow_the_trio_task_that_bound_them(captured) -> None:
    logs.setup("info", "json", stream=captured)
    log = logging.getLogger("helexa.test")

    async def request(rid: str) -> None:
        with logs.bound(request_id=rid):
            await trio.sleep(0.01)
            log.info("done")

    async with trio.open_nursery() as nursery:
        for rid in ("a", "b", "c"):
            nursery.start_soon(request, rid)
    got = sorted(json.loads(line)["request_id"] for line in lines(captured))
    assert got == ["a", "b", "c"]


@pytest.mark.parametrize(("text", "shown"), [
    ("https://u:p@h.example/a.gguf", "https://***@h.example/a.gguf"),
    ("get https://h.example/a?X-Amz-Signature=s&token=t#x failed", "get https://h.example/a?***#x failed"),
    ("'http://tok@h:80?q=1'", "'http://***@h:80?***'"),
    ("hf://org/repo@main/f.gguf and /a/path?x", "hf://org/repo@main/f.gguf and /a/path?x"),  # nothing secret
])
def test_urls_lose_their_userinfo_and_query_string(text: str, shown: str) -> None:
    assert logs.redact(text) == shown
