"""A client's JSON schema checked at the edge, before it costs a neuron anything.

A ``response_format`` / ``text.format`` / Ollama ``format`` schema and a tool's parameters
(``parameters``, Anthropic's ``input_schema``) travel to the backend, which turns them into a
grammar (llama.cpp) or shows them to the model. A schema that is not one (``{"type":
"nonsense"}``) or whose ``$ref`` points nowhere would come back from llama.cpp in its own
words; it is refused here instead, with a 400 naming the field as the client wrote it.

:func:`check_schema` is the one check every surface calls. A schema must be valid against
its meta-schema (the draft its ``$schema`` names, else 2020-12) and each ``$ref`` must be
a JSON pointer into the schema itself (``#/$defs/x``) that resolves, as llama.cpp requires;
and it must stay within OpenAI's documented size limits for structured outputs (enum values,
properties), past which llama.cpp's grammar takes seconds to build. Two more things llama.cpp
cannot turn into a grammar (it answers "failed to parse grammar", naming nothing) are
refused here, by name: a lower bound on repetitions above its grammar parser's limit
(:data:`MAX_REPETITIONS`: ``minItems``, ``minLength``, a pattern's ``{n}``; upper bounds
above it are taken as unbounded), and a ``$ref`` that comes back to itself before the
answer has a character of its own (left recursion: through ``$ref``, ``anyOf`` and
``oneOf`` alone; recursion inside an object or array, a tree, is fine). So is a
``minLength`` above the ``maxLength``, which llama.cpp does not refuse: its converter never
returns, and every request of the model waits behind it. Pure, and cached by
the schema's serialized form: tools are often sent verbatim with every request of a conversation.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from .errors import BadRequest

MAX_CACHED = 1024
"""Distinct schemas whose verdict is kept (least recently used first out)."""

MAX_CACHED_CHARS = 16_384
"""A schema serialized longer than this is checked every time rather than kept: the cache
holds at most ``MAX_CACHED * MAX_CACHED_CHARS`` characters of keys, whatever clients send."""

MAX_DETAIL = 300
"""An error's detail is cut to this many characters (it may quote a long value)."""

_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
"""Keywords whose values are data, not schemas: a ``$ref`` inside one is not a reference."""

MAX_ENUM_VALUES = 1000
"""Enum values in one schema, all its enums together (OpenAI's limit for structured
outputs). llama.cpp compiles a schema's grammar on its one loop, every other request of
the model waiting: 1,000 values took 2.3 s on this 2-core machine, 5,000 took 27 s."""

LONG_ENUM = 250
MAX_LONG_ENUM_CHARS = 7500
"""An enum of more than :data:`LONG_ENUM` values may hold this many characters of strings
at most (OpenAI's limit too)."""

MAX_PROPERTIES = 5000
"""Object properties in one schema, all its objects together (OpenAI's limit)."""

MAX_REPETITIONS = 2000
"""The most repetitions a lower bound may ask for: llama.cpp's grammar parser refuses a
repetition ``{n,...}`` with ``n`` over 2,000 (``MAX_REPETITION_THRESHOLD``); its JSON
schema converter writes ``minLength: n`` as ``{n,...}`` and ``minItems: n`` as an item and
``{n-1,...}`` more (measured: ``minLength`` 2,000 and ``minItems`` 2,001 are the largest
taken). An upper bound over it is taken as no bound at all, so ``maxLength`` and
``maxItems`` have no limit here."""

_PATTERN_REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,\d*)?\}")
"""A regex quantifier ``{n}``, ``{n,}`` or ``{n,m}`` (not an escaped brace): its ``n``."""
_LEFT_KEYWORDS = ("anyOf", "oneOf")
"""Keywords whose subschemas start where the schema starts (llama.cpp writes them as
alternatives), so that a ``$ref`` in one is in "left" position."""


def check_schema(schema: Any, param: str) -> None:
    """Raise :class:`BadRequest` naming ``param`` when ``schema`` is not a usable JSON schema
    (see the module docstring); return quietly when it is."""
    try:
        key = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON at all (the request models rule this out)
        raise BadRequest(f"Invalid value for '{param}': not a JSON schema", param=param) from None
    problem = _problem(key) if len(key) <= MAX_CACHED_CHARS else _problem.__wrapped__(key)
    if problem is not None:
        raise BadRequest(f"Invalid value for '{param}': {problem}", param=param)


@functools.lru_cache(maxsize=MAX_CACHED)
def _problem(serialized: str) -> str | None:
    """What is wrong with the schema serialized as ``serialized``, or None."""
    schema = json.loads(serialized)
    if not isinstance(schema, (dict, bool)):
        return "a JSON schema must be an object"
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"/{p}" for p in exc.path)
        detail = exc.message if len(exc.message) <= MAX_DETAIL else exc.message[:MAX_DETAIL] + "..."
        return f"not a valid JSON schema: {detail}" + (f" (at #{where})" if where else "")
    refs = _refs(schema)
    for ref in refs:
        problem = _ref_problem(schema, ref)
        if problem is not None:
            return problem
    return _size_problem(schema) or _repetition_problem(schema) or _left_recursion(schema, refs)


def _repetition_problem(schema: Any) -> str | None:
    """A lower bound on repetitions the backend's grammar cannot hold (:data:`MAX_REPETITIONS`), or None."""
    for here in _objects(schema):
        for keyword, most in (("minLength", MAX_REPETITIONS), ("minItems", MAX_REPETITIONS + 1)):
            value = here.get(keyword)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > most:
                return f"{keyword} {value} is more than the {most} the backend's grammar can require"
        least, most = here.get("minLength"), here.get("maxLength")
        if _number(least) and _number(most) and least > most:
            # llama.cpp's converter does not refuse this: it never returns (its loop, and every
            # request of the model, stuck), measured with SmolLM2
            return f"minLength {least} is more than maxLength {most}: no string can match"
        pattern = here.get("pattern")
        if isinstance(pattern, str):
            for match in _PATTERN_REPEAT.finditer(pattern):
                if int(match.group(1)) > MAX_REPETITIONS:
                    return (f"pattern repeats {match.group(0)}: at most {MAX_REPETITIONS} repetitions can be "
                            "required by the backend's grammar")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _left_recursion(schema: Any, refs: list[str]) -> str | None:
    """A ``$ref`` that reaches itself through ``$ref``, ``anyOf`` and ``oneOf`` alone (the
    backend's grammar cannot hold left recursion), or None. The refs all resolve by now."""
    edges = {ref: _left_refs(_resolve(schema, ref)) for ref in set(refs)}
    done: set[str] = set()
    for start in sorted(edges):
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            ref, i = stack.pop()
            if i == 0:
                if ref in on_path:
                    loop = path[path.index(ref):] + [ref]
                    return (f"$ref {ref!r} refers back to itself ({' -> '.join(loop)}) before any other part "
                            "of the answer (left recursion), which the backend cannot turn into a grammar")
                if ref in done:
                    continue
                path.append(ref)
                on_path.add(ref)
            nexts = edges.get(ref, [])
            if i < len(nexts):
                stack.append((ref, i + 1))
                stack.append((nexts[i], 0))
            else:
                path.pop()
                on_path.discard(ref)
                done.add(ref)
    return None


def _left_refs(node: Any) -> list[str]:
    """The ``$ref`` s in left position in ``node``: its own (which the backend follows
    alone, its siblings ignored), else those of its ``anyOf`` / ``oneOf`` alternatives."""
    out: list[str] = []
    stack = [node]
    while stack:
        here = stack.pop()
        if not isinstance(here, dict):
            continue
        if isinstance(ref := here.get("$ref"), str):
            out.append(ref)
            continue
        for keyword in _LEFT_KEYWORDS:
            if isinstance(alternatives := here.get(keyword), list):
                stack.extend(alternatives)
    return out


def _resolve(root: Any, ref: str) -> Any:
    """What the JSON pointer ``ref`` (``#/...``, checked by :func:`_ref_problem`) points at."""
    here = root
    for token in ref[2:].split("/"):
        here = here[token] if isinstance(here, dict) else here[int(token)]
    return here


def _size_problem(schema: Any) -> str | None:
    """What makes the schema too costly to turn into a grammar (:data:`MAX_ENUM_VALUES`,
    :data:`MAX_LONG_ENUM_CHARS`, :data:`MAX_PROPERTIES`), or None."""
    values = properties = 0
    for here in _objects(schema):
        enum = here.get("enum")
        if isinstance(enum, list):
            values += len(enum)
            if len(enum) > LONG_ENUM and sum(len(v) for v in enum if isinstance(v, str)) > MAX_LONG_ENUM_CHARS:
                return f"an enum of {len(enum)} values may hold at most {MAX_LONG_ENUM_CHARS} characters of strings"
        props = here.get("properties")
        if isinstance(props, dict):
            properties += len(props)
    if values > MAX_ENUM_VALUES:
        return f"the schema's enums hold {values} values; at most {MAX_ENUM_VALUES} are allowed"
    if properties > MAX_PROPERTIES:
        return f"the schema has {properties} object properties; at most {MAX_PROPERTIES} are allowed"
    return None


def _refs(node: Any) -> list[str]:
    """Every ``$ref`` in the schema, data keywords skipped."""
    return [ref for here in _objects(node) if isinstance(ref := here.get("$ref"), str)]


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object in the schema (its subschemas, and the objects ``properties`` and
    ``$defs`` hold them in), the values of data keywords (:data:`_DATA_KEYWORDS`) skipped."""
    stack = [node]
    while stack:
        here = stack.pop()
        if isinstance(here, dict):
            yield here
            stack.extend(v for k, v in here.items() if k not in _DATA_KEYWORDS)
        elif isinstance(here, list):
            stack.extend(here)


def _ref_problem(root: Any, ref: str) -> str | None:
    """What stops the backend following ``ref``, or None. llama.cpp follows a JSON pointer
    into the same schema (``#/$defs/x``, ``#/prefixItems/0``), its parts taken literally as
    it takes them (no ``~1`` or percent decoding); not ``#`` itself, an ``$anchor`` or
    another document."""
    if not ref.startswith("#/"):
        return f"$ref {ref!r} is not supported here: a $ref must be a JSON pointer into the same schema (#/...)"
    here = root
    for token in ref[2:].split("/"):
        if isinstance(here, dict) and token in here:
            here = here[token]
        elif isinstance(here, list) and token.isdigit() and int(token) < len(here):
            here = here[int(token)]
        elif "~" in token or "%" in token:
            return (f"$ref {ref!r} is not supported here: the backend takes a pointer's parts literally, without "
                    "~0, ~1 or percent escapes (name the definition without '/', '~' or '%')")
        else:
            return f"$ref {ref!r} does not resolve within the schema"
    if not isinstance(here, (dict, bool)):
        return f"$ref {ref!r} does not point at a schema"
    return None
