"""Hostile Anthropic Messages bodies (hypothesis strategies), in the manner of :mod:`fuzz_bodies`:
the shapes a client sends (system, turns of content blocks, tool_use / tool_result, tools,
tool_choice, sampling) with 0-2 places made hostile, and garbage. Each draws ``(path, body)``."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fuzz_bodies import GARBAGE, SCHEMA, TEXT, _encode, mutated

NAMES = st.sampled_from(["get_weather", "f"])
TEXT_BLOCK = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
IMAGE_BLOCK = st.fixed_dictionaries({"type": st.just("image"), "source": st.one_of(
    st.just({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}),
    st.just({"type": "url", "url": "https://example.invalid/cat.png"}))})
TOOL_RESULT = st.fixed_dictionaries(
    {"type": st.just("tool_result"), "tool_use_id": st.just("toolu_1")},
    optional={"content": st.one_of(TEXT, st.lists(TEXT_BLOCK, max_size=2)), "is_error": st.booleans()})
TOOL_USE = st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.just("toolu_1"), "name": NAMES,
                                  "input": st.sampled_from([{}, {"city": "Paris"}, {"n": 3}])})
USER = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    TEXT, TEXT, st.lists(st.one_of(TEXT_BLOCK, TEXT_BLOCK, IMAGE_BLOCK, TOOL_RESULT), min_size=1, max_size=3))})
ASSISTANT = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(
    TEXT, st.lists(st.one_of(TEXT_BLOCK, TOOL_USE), min_size=1, max_size=2))})
TURNS = st.tuples(st.lists(st.tuples(USER, ASSISTANT), max_size=2), USER).map(
    lambda t: [m for pair in t[0] for m in pair] + [t[1]])
TOOLS = st.lists(st.fixed_dictionaries({"name": NAMES, "input_schema": SCHEMA}, optional={"description": TEXT}),
                 min_size=1, max_size=2, unique_by=lambda t: t["name"])
FIELDS = {
    "system": st.one_of(TEXT, st.lists(TEXT_BLOCK, max_size=2)), "temperature": st.floats(0, 1),
    "top_p": st.floats(0, 1), "top_k": st.integers(0, 50), "stream": st.booleans(),
    "stop_sequences": st.lists(st.text(min_size=1, max_size=5), max_size=3), "tools": TOOLS,
    "metadata": st.just({"user_id": "u"}), "thinking": st.just({"type": "enabled", "budget_tokens": 1024}),
}


def _consistent(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("tools") and "tool_choice" not in body:
        name = body["tools"][0]["name"]
        body["tool_choice"] = [{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": name}][
            len(body["messages"]) % 4]
    return body


def messages_body(models: list[str], *, count: bool = False) -> st.SearchStrategy[Any]:
    required = {"model": st.sampled_from(models), "messages": TURNS}
    if not count:
        required["max_tokens"] = st.integers(1, 8)
    return mutated(st.fixed_dictionaries(required, optional=FIELDS).map(_consistent))


def requests(models: list[str]) -> st.SearchStrategy[tuple[str, bytes]]:
    """Mostly Messages bodies, some count_tokens bodies, some garbage."""
    return st.one_of(
        messages_body(models).map(lambda b: ("/v1/messages", _encode(b))),
        messages_body(models).map(lambda b: ("/v1/messages", _encode(b))),
        messages_body(models, count=True).map(lambda b: ("/v1/messages/count_tokens", _encode(b))),
        st.tuples(st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]), GARBAGE),
    )
