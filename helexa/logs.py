"""Process-wide logging set-up shared by every role.

* ``text`` (the default, for a terminal): ``12:00:01 INFO    helexa.x: message``, followed
  by ``[request_id=... portal=... model=... neuron=...]`` on lines about a request.
* ``json`` (``--log-format json`` or ``log_format = "json"``): one JSON object a line
  (python-json-logger), with ``time``, ``level``, ``logger``, ``message`` and the request's
  fields, and ``trace_id`` / ``span_id`` when a span is recording.

The request's fields come from :func:`bound`, which code on the request path enters as it
learns them (the gateway: request id and portal; the dispatcher: model and neuron; the
neuron: request id and model). They live in a ``contextvars`` variable, so in trio they
follow the task that bound them and its children, never another request.

A record's message is one line: a line break in it (a client's path or model name at DEBUG,
an exception's text) is written as ``\\n``, so no client can forge a line of its own (a
traceback still follows on its own lines); any other control character (a neuron's error
text with a terminal's escape sequences) is escaped too (``\\x1b``).

Secrets never reach a log: every record's text passes through :func:`redact`, which masks
API keys (``sk-hlx-...``), join tokens (``hlx1....``), admin tokens (``hlx-admin-...``), the
keys a neuron draws for the servers it supervises (``hlx-up-...``) and ``Bearer``
credentials, however they got into a message or an exception (a token a client put in a
URL or a model name is as secret as one in a header), and the userinfo and query string of
any URL (a model source's ``https://user:pass@host/...`` or signed ``?X-Amz-Signature=...``;
:func:`redact_url`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

_NOISY = {
    # kad-dht logs this at ERROR constantly (see docs/mesh.md)
    "libp2p.kad_dht": logging.CRITICAL,
    "hypercorn.access": logging.WARNING,
}

FIELDS = ("request_id", "portal", "model", "neuron")
"""The request's fields, on every line logged about it."""

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("helexa_log_fields", default={})

_SECRETS = re.compile(r"(sk-hlx-)[A-Za-z0-9_\-]+|(hlx1\.)[A-Za-z0-9_\-.]+|(hlx-admin-)[A-Za-z0-9_\-]+"
                      r"|(hlx-up-)[A-Za-z0-9_\-]+|((?i:bearer)\s+)[^\s'\",]+")


_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s'\"<>]+")
"""A URL in running text (up to a space or a quote)."""


def redact_url(url: str) -> str:
    """``url`` without its secrets: userinfo (``https://user:pass@host``) and query string
    (a signed URL's ``?X-Amz-Signature=...&token=...``) become ``***``; the scheme, host and
    path stay, so that an operator still sees which file it was."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1 and at < end:
            end = at
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    query = tail.find("?")
    if query != -1:
        fragment = tail.find("#", query)
        tail = tail[:query] + "?***" + (tail[fragment:] if fragment != -1 else "")
    return f"{scheme}://{authority}{tail}"


def redact(text: str) -> str:
    """``text`` with API keys, join tokens, admin tokens, upstream keys, bearer credentials
    and the secrets of URLs (:func:`redact_url`) masked."""
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _SECRETS.sub(lambda m: next(g for g in m.groups() if g) + "***", text)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` (of :data:`FIELDS`) to every line logged in this block (and in the
    tasks it starts)."""
    token = push(**fields)
    try:
        yield
    finally:
        pop(token)


def push(**fields: str | None) -> contextvars.Token[dict[str, str]]:
    """:func:`bound` without a block (where a ``with`` cannot span the code, as across a
    generator's ``yield``): pair with :func:`pop` in a ``finally``."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})


def pop(token: contextvars.Token[dict[str, str]]) -> None:
    _context.reset(token)


def current() -> dict[str, str]:
    """The fields bound here."""
    return dict(_context.get())


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
"""What a log line never carries as it is: line breaks (``\\n``, ``\\r``, and what a
reader may take for one) and the other control characters, escape included (a tab stays)."""


def _escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    return {"\n": "\\n", "\r": "\\r"}.get(ch) or ch.encode("unicode_escape").decode("ascii")


class _ContextFilter(logging.Filter):
    """Puts the bound fields, the trace ids and a redacted message on each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _context.get()
        for name in FIELDS:
            setattr(record, name, fields.get(name))
        record.trace_id = record.span_id = None
        try:
            from opentelemetry import trace

            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id, record.span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        except ImportError:  # pragma: no cover
            pass
        message = record.getMessage()
        clean = redact(message)
        if not clean.isprintable():
            # a path or a name a client chose could forge lines of its own, and a neuron's
            # error text (or a peer's) could carry escape sequences into whatever terminal
            # shows the log (clear the screen, set its title...): each such character as an escape
            clean = _CONTROL.sub(_escape, clean)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class _Redacting(logging.Formatter):
    """Tracebacks and stacks masked too (the message is, by the filter)."""

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return redact(super().formatStack(stack_info))


class _TextFormatter(_Redacting):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None))
        return f"{text} [{extra}]" if extra else text


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class Formatter(_Redacting, JsonFormatter):
        def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord,
                       message_dict: dict[str, Any]) -> None:
            super().add_fields(log_record, record, message_dict)
            for name in (*FIELDS, "trace_id", "span_id"):
                if log_record.get(name) is None:
                    log_record.pop(name, None)

    return Formatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(portal)s %(model)s "
                     "%(neuron)s %(trace_id)s %(span_id)s",
                     rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                     datefmt="%Y-%m-%dT%H:%M:%S%z")


def setup(level: str = "info", fmt: str = "text", *, stream: Any = None) -> None:
    """Configure the root logger: ``level``, ``fmt`` (``text`` or ``json``), on ``stream``
    (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(_json_formatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    for name, lvl in _NOISY.items():
        logging.getLogger(name).setLevel(lvl)
